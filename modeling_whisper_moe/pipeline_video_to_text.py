"""Sign language to text for WhisperMoE folders with a pose or a patch front-end, shipped inside them as a custom
pipeline.

    signer = pipeline("video-to-text", model="you/whisper-moe-fingerspelling-ase", trust_remote_code=True)
    signer("hello.pose")                                 # a pose-format file of MediaPipe Holistic keypoints
    signer({"keypoints": points, "visible": visible})    # (frames, 27 or 543+, 3) arrays, as pose.select_keypoints
    signer("hello.mov")                                  # a video (path or bytes): keypoints by MediaPipe Holistic
    # {"text": "hello"}

A video's keypoints come from keypoints.extract_keypoints (MediaPipe, an optional install) and then go the way of
arrays. The keypoints are normalised to the signer's shoulders (pose.normalize_pose) and read by the encoder's pose
front-end; the decoder writes English text after <|en|><|transcribe|><|notimestamps|>. A folder with a patch
front-end (`config.patch_frontend`) reads RGB video instead: `signer("clip.mp4")` decodes it with `load_video` at the
config's `video_fps` and `video_size`, and a (frames, height, width, 3) array is read as it is (patches.read_clip).
"""

import os

import numpy as np
import torch

from .keypoints import extract_keypoints
from .patches import read_clip
from .pipeline_translation import FrontendPipeline
from .pose import POSE_KEYPOINTS, pose_values, read_pose, read_spelling, select_keypoints

OUTPUT_LANGUAGE = "en"
MAX_NEW_TOKENS = 32  # a fingerspelled word or phrase; a looping model stops here
# Frames per second a video is sampled at: the rate of the letter clips the pose front-end learns from
# (spoken-to-signed's lexicon), so that a letter spans as many frames in a video as in training
VIDEO_FPS = 25
POSE_SUFFIX = ".pose"
# How bytes of the video containers read here begin: ISO media (.mp4, .mov) has a box type after a 4-byte size,
# Matroska (.mkv, .webm) the EBML magic, AVI a RIFF header naming AVI; any other bytes are read as a .pose file
ISO_MEDIA_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
EBML_MAGIC = b"\x1a\x45\xdf\xa3"


class WhisperMoEVideoToTextPipeline(FrontendPipeline):
    """Keypoints of a signer (a `.pose` file, a video file, their bytes, or arrays) -> `{"text": ...}`. Options:
    `fps` (the rate a video is sampled at, VIDEO_FPS by default), `max_new_tokens`, `num_beams`, or
    `generate_kwargs`."""

    refusal = "has no pose front-end, so it cannot read sign language; train one with the video_to_text task"

    def _sanitize_parameters(self, fps=None, max_new_tokens=None, num_beams=None, generate_kwargs=None, **kwargs):
        forward = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            forward["max_new_tokens"] = max_new_tokens
        if num_beams is not None:
            forward["num_beams"] = num_beams
        return {} if fps is None else {"fps": fps}, forward, {}

    @property
    def frontend_field(self) -> str:
        """The front-end this folder reads sign language with: RGB frames (patches) or keypoints (pose)."""
        return "patch_frontend" if getattr(self.model.config, "patch_frontend", False) else "pose_frontend"

    def preprocess(self, inputs, fps: float = VIDEO_FPS) -> dict:
        if self.frontend_field == "patch_frontend":  # frames at the config's rate, (1, frames, height, width, 3)
            return {"pixel_values": torch.as_tensor(read_clip(self.model.config, inputs))[None].to(self.device)}
        keypoints, visible = _keypoints(inputs, fps)
        values = torch.as_tensor(pose_values(keypoints, visible))[None]  # (1, frames, 27, 4)
        return {"pose_values": values.to(self.device, self.model.dtype)}

    def _forward(self, model_inputs: dict, **generate_kwargs) -> dict:
        generate_kwargs.setdefault("max_new_tokens", MAX_NEW_TOKENS)
        if "pixel_values" in model_inputs:
            tokens = self.model.generate_from_video(model_inputs["pixel_values"], language=OUTPUT_LANGUAGE,
                                                    **generate_kwargs)  # fmt: skip
            return {"tokens": tokens}
        tokens = self.model.generate_from_pose(
            model_inputs["pose_values"], language=OUTPUT_LANGUAGE, **generate_kwargs
        )
        return {"tokens": tokens}

    def postprocess(self, model_outputs: dict) -> dict:
        text = self.tokenizer.decode(model_outputs["tokens"][0], skip_special_tokens=True)
        return {"text": read_spelling(text)}


def _keypoints(inputs, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(keypoints (frames, 27, 3), visible (frames, 27)) of a pipeline input; a video is sampled at `fps`."""
    if isinstance(inputs, str | os.PathLike | bytes | bytearray):
        if _is_video(inputs):
            return extract_keypoints(inputs, fps)
        keypoints, visible, _ = read_pose(inputs)
        return keypoints, visible
    if isinstance(inputs, dict) and "keypoints" in inputs:
        points = np.asarray(inputs["keypoints"], dtype=np.float32)
        visible = inputs.get("visible")
    elif isinstance(inputs, np.ndarray | torch.Tensor):
        points, visible = np.asarray(inputs, dtype=np.float32), None
    else:
        raise TypeError(
            "video-to-text takes a .pose or video path or bytes, a (frames, points, 3) keypoint array, or "
            f"{{'keypoints': ..., 'visible': ...}}, got {type(inputs).__name__}"
        )
    if points.ndim != 3 or points.shape[0] == 0 or points.shape[-1] < 3:
        raise ValueError(f"keypoints must be (frames > 0, points, 3), got {points.shape}")
    if points.shape[1] == POSE_KEYPOINTS:  # already the 27 kept points
        seen = np.abs(points).sum(-1) > 0 if visible is None else np.asarray(visible, dtype=bool)
        return points[..., :3], seen
    return select_keypoints(points, None if visible is None else np.asarray(visible, dtype=np.float32))


def _is_video(source: str | os.PathLike | bytes | bytearray) -> bool:
    """A path not ending in .pose, or bytes that begin as a .mp4 / .mov / .mkv / .webm / .avi file does."""
    if isinstance(source, str | os.PathLike):
        return not str(source).lower().endswith(POSE_SUFFIX)
    head = bytes(source[:12])
    avi = head[:4] == b"RIFF" and head[8:11] == b"AVI"
    return head[4:8] in ISO_MEDIA_BOXES or head.startswith(EBML_MAGIC) or avi
