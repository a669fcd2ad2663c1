"""The pose front-end: per-frame body and hand keypoints of a signer, as encoder inputs of WhisperMoE.

A sign-language video reduced to keypoints (MediaPipe Holistic, as pose-format's `.pose` files store them) keeps what
signs are made of, hand shapes and movement, and drops the signer's looks and background: small, fast and largely
signer-invariant (OpenHands reaches ~90 % on INCLUDE with pose models). Of Holistic's 543 landmarks this keeps 27, as
OpenHands does: nose, shoulders, elbows and wrists from the body, and per hand the wrist, the thumb tip and the base
and tip of each finger. `normalize_pose` centres each frame on the midpoint of the shoulders and divides by the
shoulder width (median over the clip), so the same sign gives the same numbers wherever the signer stands and however
far from the camera; a point not detected in a frame is 0 and marked missing.

`PoseFrontend` turns (frames, 27, 3) normalised points and their visibility into one encoder input per frame (a
linear map of the flattened points, plus Whisper's sinusoidal encoder positions); the encoder's layers and experts
then read it as they read audio or text.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .configuration_whisper_moe import WhisperMoEConfig

# MediaPipe Holistic as pose-format lays it out: components in this order, with these many points
HOLISTIC_COMPONENTS = (
    ("POSE_LANDMARKS", 33),
    ("FACE_LANDMARKS", 478),
    ("LEFT_HAND_LANDMARKS", 21),
    ("RIGHT_HAND_LANDMARKS", 21),
    ("POSE_WORLD_LANDMARKS", 33),
)
BODY_POINTS = (0, 11, 12, 13, 14, 15, 16)  # nose, left/right shoulder, elbow, wrist (MediaPipe Pose indices)
HAND_POINTS = (0, 4, 5, 8, 9, 12, 13, 16, 17, 20)  # wrist, thumb tip, base and tip of index, middle, ring, pinky
POSE_KEYPOINTS = len(BODY_POINTS) + 2 * len(HAND_POINTS)  # 27
POSE_DIMS = 3  # x, y, z
LEFT_SHOULDER, RIGHT_SHOULDER = 1, 2  # their places among the kept points
MIN_SHOULDER_WIDTH = 1e-6  # below it the shoulders were not seen: the frame scale falls back to 1


def holistic_indices(components: list[tuple[str, int]] | None = None) -> np.ndarray:
    """Where the 27 kept points sit among a Holistic pose's points (the components' order and sizes; pose-format's
    `header.components` names and point counts, HOLISTIC_COMPONENTS by default)."""
    offsets, start = {}, 0
    for name, count in components or HOLISTIC_COMPONENTS:
        offsets[name] = start
        start += count
    missing = {"POSE_LANDMARKS", "LEFT_HAND_LANDMARKS", "RIGHT_HAND_LANDMARKS"} - set(offsets)
    if missing:
        raise ValueError(f"a pose needs MediaPipe Holistic's body and hand components; missing {sorted(missing)}")
    return np.array(
        [offsets["POSE_LANDMARKS"] + i for i in BODY_POINTS]
        + [offsets["LEFT_HAND_LANDMARKS"] + i for i in HAND_POINTS]
        + [offsets["RIGHT_HAND_LANDMARKS"] + i for i in HAND_POINTS]
    )


def select_keypoints(
    points: np.ndarray, confidence: np.ndarray | None = None, components: list[tuple[str, int]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The 27 kept points of a Holistic pose: points (frames, all points, >= 3) or (frames, 1 person, ...), and their
    visibility (frames, 27) bool (confidence above 0 when given, else any coordinate non-zero)."""
    points = np.asarray(points, dtype=np.float32)
    if points.ndim == 4:  # pose-format's (frames, people, points, dims): the first person
        points = points[:, 0]
        confidence = None if confidence is None else np.asarray(confidence)[:, 0]
    if points.ndim != 3 or points.shape[-1] < POSE_DIMS:
        raise ValueError(f"expected keypoints of shape (frames, points, 3), got {points.shape}")
    indices = holistic_indices(components)
    kept = points[:, indices, :POSE_DIMS]
    if confidence is not None:
        visible = np.asarray(confidence)[:, indices] > 0
    else:
        visible = np.abs(kept).sum(-1) > 0
    return kept, visible & np.isfinite(kept).all(-1)


def normalize_pose(keypoints: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """(frames, 27, 3) points -> the same, centred on the shoulders' midpoint and divided by the clip's median
    shoulder width; missing points are 0. A clip whose shoulders are never seen is centred on its visible points."""
    keypoints = np.where(visible[..., None], keypoints, np.nan)
    left, right = keypoints[:, LEFT_SHOULDER], keypoints[:, RIGHT_SHOULDER]
    both = visible[:, LEFT_SHOULDER] & visible[:, RIGHT_SHOULDER]
    if both.any():
        centre = np.nanmedian((left[both] + right[both]) / 2, axis=0)
        width = float(np.median(np.linalg.norm((left - right)[both, :2], axis=-1)))
    else:
        centre = np.nanmean(keypoints.reshape(-1, POSE_DIMS), axis=0) if visible.any() else np.zeros(POSE_DIMS)
        width = 1.0
    scale = width if width > MIN_SHOULDER_WIDTH else 1.0
    normalised = (keypoints - centre) / scale
    return np.nan_to_num(normalised, nan=0.0).astype(np.float32)


class PoseFrontend(nn.Module):
    """(batch, frames, 27, 3) normalised keypoints and (batch, frames, 27) visibility -> (batch, frames, d_model):
    one linear map of each frame's points and visibility flags, then the encoder's sinusoidal positions."""

    def __init__(self, config: WhisperMoEConfig):
        super().__init__()
        self.proj = nn.Linear(POSE_KEYPOINTS * (POSE_DIMS + 1), config.d_model)
        self.norm = nn.LayerNorm(config.d_model)

    def forward(self, pose_values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """pose_values: (batch, frames, 27, 4): x, y, z and visibility; positions: (frames, d_model)."""
        if pose_values.shape[-2:] != (POSE_KEYPOINTS, POSE_DIMS + 1):
            raise ValueError(
                f"pose_values must be (batch, frames, {POSE_KEYPOINTS}, {POSE_DIMS + 1}) keypoints with visibility "
                f"(see pose.pose_values), got {tuple(pose_values.shape)}"
            )
        frames = pose_values.flatten(-2).to(self.proj.weight.dtype)  # (batch, frames, 108)
        return self.norm(self.proj(frames)) + positions


def pose_values(keypoints: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """What the front-end reads per frame: normalised (frames, 27, 3) points and visibility -> (frames, 27, 4)."""
    return np.concatenate([normalize_pose(keypoints, visible), visible[..., None].astype(np.float32)], axis=-1)


def spell(word: str) -> str:
    """A fingerspelled word as the decoder writes it: one letter per token ("hello" -> "h e l l o"), so each letter
    clip the encoder reads lines up with one output token."""
    return " ".join(word.strip())


def read_spelling(text: str) -> str:
    """The decoder's letters joined back into words ("h e l l o" -> "hello"; a double space separates words)."""
    return " ".join(part.replace(" ", "") for part in text.strip().split("  "))


def add_pose_frontend(model: nn.Module) -> nn.Module:
    """Give a WhisperMoE's encoder a pose front-end (new weights) and set `config.pose_frontend`; in place. Audio and
    text inputs are untouched."""
    encoder = model.get_encoder()
    if not model.config.pose_frontend:
        model.config.check_pose_packing(pose_frontend=True)
        reference = encoder.layer_norm.weight
        encoder.embed_pose = PoseFrontend(model.config).to(reference.device, reference.dtype)
        model.config.pose_frontend = True
    return model


def read_pose(source: str | os.PathLike | bytes) -> tuple[np.ndarray, np.ndarray, float]:
    """A pose-format `.pose` file (path or bytes) of MediaPipe Holistic -> (keypoints (frames, 27, 3), visible
    (frames, 27), frames per second). Needs the `pose-format` package (pip install pose-format)."""
    try:
        from pose_format import Pose
    except ImportError as error:
        raise ImportError("Reading .pose files needs the `pose-format` package: pip install pose-format") from error
    name = "pose bytes" if isinstance(source, bytes | bytearray) else str(source)
    if not isinstance(source, bytes | bytearray):
        if not Path(source).is_file():
            raise FileNotFoundError(f"Pose file not found: {source}")
        source = Path(source).read_bytes()
    if not source:
        raise ValueError(f"{name}: the file is empty (0 bytes)")
    try:
        pose = Pose.read(bytes(source))
    except Exception as error:  # pose-format raises struct / value / index errors on bad data
        raise ValueError(f"{name}: not a readable .pose file ({type(error).__name__}: {error})") from error
    components = [(component.name, len(component.points)) for component in pose.header.components]
    data = pose.body.data
    points = np.ma.filled(data, 0.0) if isinstance(data, np.ma.MaskedArray) else np.asarray(data)
    if points.shape[0] == 0:
        raise ValueError(f"{name}: the pose has no frames")
    keypoints, visible = select_keypoints(points, np.asarray(pose.body.confidence), components)
    return keypoints, visible, float(pose.body.fps)
