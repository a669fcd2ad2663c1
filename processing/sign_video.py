"""Fingerspelling as RGB video: composed words' keypoints rendered to small frames for the encoder's patch front-end.

There is no real sign-language RGB video here, so the lexicon's real poses are drawn instead: each composed word
(sign_data.compose, with its augmentation) is normalised to the signer's shoulders, framed in a fixed box of
shoulder widths, and drawn as a skeleton (body grey, left hand red, right hand blue) by pose-format's
`PoseVisualizer` (which needs OpenCV: `pip install whisper-moe[sign]`) on a black square. These are moving-hand
videos that exercise the patch front-end end to end; they are rendered skeletons, not camera video, so what a model
learns from them says nothing about real footage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from modeling_whisper_moe.hub import atomic_write
from modeling_whisper_moe.modeling_whisper_moe import WhisperMoEForConditionalGeneration
from modeling_whisper_moe.pose import BODY_POINTS, HAND_POINTS, normalize_pose, spell
from processing.sign_data import FingerspellingDataset, compose

LEXICON_FPS = 25.0  # the spoken-to-signed lexicon's clips
BACKGROUND = (0, 0, 0)
BODY_COLOR, LEFT_HAND_COLOR, RIGHT_HAND_COLOR = (160, 160, 160), (255, 64, 64), (64, 128, 255)  # RGB
# places among the kept points (pose.py): nose, left/right shoulder, elbow, wrist
BODY_LIMBS = [(1, 2), (1, 3), (3, 5), (2, 4), (4, 6)]
# places among a hand's 10 kept points: wrist, thumb tip, then base and tip of index, middle, ring, pinky
HAND_LIMBS = [(0, 1), (0, 2), (2, 3), (0, 4), (4, 5), (0, 6), (6, 7), (0, 8), (8, 9), (2, 4), (4, 6), (6, 8)]


@dataclass(frozen=True)
class Rendering:
    """How a composed word becomes frames.

    Defaults: 64 x 64 pixels; every 5th frame of the 25 fps clips (5 fps, ~5 frames a letter, enough to see J and Z
    move); the box spans 2.2 shoulder widths, from 1.4 left of the shoulders' midpoint (image left) and 0.8 above
    it: the lexicon's points lie within x -1.27..0.73 and y -0.63..1.31 (nose to elbows), and a hand (~0.4 shoulder
    widths) spans ~12 pixels, within one 16-pixel patch.
    """

    size: int = 64
    frame_step: int = 5
    box_left: float = -1.4
    box_top: float = -0.8
    box_side: float = 2.2
    thickness: int = 1

    @property
    def fps(self) -> float:
        return LEXICON_FPS / self.frame_step


def render_pose(keypoints: np.ndarray, visible: np.ndarray, rendering: Rendering = Rendering()) -> np.ndarray:
    """(frames, 27, 3) raw keypoints and (frames, 27) visibility -> (frames / frame_step, size, size, 3) uint8 RGB."""
    try:
        from pose_format import Pose
        from pose_format.numpy import NumPyPoseBody
        from pose_format.pose_header import PoseHeader, PoseHeaderComponent, PoseHeaderDimensions
        from pose_format.pose_visualizer import PoseVisualizer
    except ImportError as error:
        raise ImportError("Rendering poses needs pose-format and OpenCV: pip install 'whisper-moe[sign]'") from error
    step = slice(None, None, rendering.frame_step)
    normalised, seen = normalize_pose(keypoints, visible)[step], visible[step]
    corner = np.array([rendering.box_left, rendering.box_top])
    pixels = (normalised[..., :2] - corner) / rendering.box_side * rendering.size  # (frames, 27, 2)
    components = [
        PoseHeaderComponent("BODY", [str(i) for i in BODY_POINTS], BODY_LIMBS, [BODY_COLOR], "XYC"),
        PoseHeaderComponent("LEFT_HAND", [str(i) for i in HAND_POINTS], HAND_LIMBS, [LEFT_HAND_COLOR], "XYC"),
        PoseHeaderComponent("RIGHT_HAND", [str(i) for i in HAND_POINTS], HAND_LIMBS, [RIGHT_HAND_COLOR], "XYC"),
    ]
    header = PoseHeader(0.1, PoseHeaderDimensions(rendering.size, rendering.size), components)
    body = NumPyPoseBody(rendering.fps, pixels[:, None].astype(np.float32), seen[:, None].astype(np.float32))
    drawn = PoseVisualizer(Pose(header, body), thickness=rendering.thickness).draw(background_color=BACKGROUND)
    return np.stack([frame[..., ::-1] for frame in drawn])  # the visualizer draws BGR (OpenCV's order)


def save_video(frames: np.ndarray, path: str | os.PathLike, fps: float, codec: str = "libx264") -> None:
    """(frames, height, width, 3) uint8 RGB -> a video file (H.264 in the container `path`'s suffix names), written
    atomically; height and width must be even (4:2:0 chroma)."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames must be (frames, even height, even width, 3) RGB, got {frames.shape}")
    with atomic_write(path) as temporary, av.open(str(temporary), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


class RenderedFingerspellingDataset(FingerspellingDataset):
    """FingerspellingDataset's words, drawn as video: items hold `pixel_values` (frames, size, size, 3) uint8 instead
    of `pose_values`, for the patch front-end."""

    def __init__(self, *args, rendering: Rendering = Rendering(), **kwargs):
        super().__init__(*args, **kwargs)
        self.rendering = rendering

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index, 1])
        word = self.word(index)
        keypoints, visible = compose(word, self.lexicon, rng, self.augment)
        tokens = self.tokenizer.encode(" " + spell(word), add_special_tokens=False)
        return {"pixel_values": render_pose(keypoints, visible, self.rendering),
                "labels": [*self.prompt, *tokens, self.eos_id], "word": word}  # fmt: skip


SIGN_FRONTENDS = ("pose", "patches")  # what the video_to_text task feeds the encoder (DataArguments.sign_frontend)
VIDEO_CONFIG_FIELDS = ("video_patch_size", "video_tubelet_frames", "video_token_dropout")  # ModelArguments' overrides


def rendering_of(data_args: object) -> Rendering:
    """The rendering a run's DataArguments (or its training record's "data") ask for."""
    get = data_args.get if isinstance(data_args, dict) else lambda name, default: getattr(data_args, name, default)
    default = Rendering()
    return Rendering(size=get("sign_video_size", default.size), frame_step=get("sign_video_frame_step",
                                                                               default.frame_step))  # fmt: skip


def check_sign_frontend(name: str) -> str:
    if name not in SIGN_FRONTENDS:
        raise ValueError(f"sign_frontend must be one of {SIGN_FRONTENDS}, got {name!r}")
    return name


def add_sign_video_frontend(model: WhisperMoEForConditionalGeneration, model_args: object, data_args: object) -> None:
    """Give `model` the patch front-end for rendered fingerspelling: the ModelArguments' video fields that are set,
    and the rendering's frame size and rate as what its pipeline reads a video file at."""
    rendering = rendering_of(data_args)
    if not model.config.patch_frontend:
        for name in VIDEO_CONFIG_FIELDS:
            if getattr(model_args, name, None) is not None:
                setattr(model.config, name, getattr(model_args, name))
        model.config.video_size, model.config.video_fps = rendering.size, rendering.fps
    model.add_patch_frontend()
