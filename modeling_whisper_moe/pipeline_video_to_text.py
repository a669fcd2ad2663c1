"""Sign language to text for WhisperMoE folders with a pose or a patch front-end, shipped inside them as a custom
pipeline.

    signer = pipeline("video-to-text", model="you/whisper-moe-fingerspelling-ase", trust_remote_code=True)
    signer("hello.pose")                                 # a pose-format file of MediaPipe Holistic keypoints
    signer({"keypoints": points, "visible": visible})    # (frames, 27 or 543+, 3) arrays, as pose.select_keypoints
    # {"text": "hello"}

The keypoints are normalised to the signer's shoulders (pose.normalize_pose) and read by the encoder's pose
front-end; the decoder writes English text after <|en|><|transcribe|><|notimestamps|>. A folder with a patch
front-end (`config.patch_frontend`) reads RGB video instead: `signer("clip.mp4")` decodes it with `load_video` at the
config's `video_fps` and `video_size`, and a (frames, height, width, 3) array is read as it is (patches.read_clip).
"""

import os

import numpy as np
import torch

from .patches import read_clip
from .pipeline_translation import FrontendPipeline
from .pose import POSE_KEYPOINTS, pose_values, read_pose, read_spelling, select_keypoints

OUTPUT_LANGUAGE = "en"
MAX_NEW_TOKENS = 32  # a fingerspelled word or phrase; a looping model stops here


class WhisperMoEVideoToTextPipeline(FrontendPipeline):
    """Keypoints of a signer (a `.pose` file, its bytes, or arrays) -> `{"text": ...}`. Options: `max_new_tokens`,
    `num_beams`, or `generate_kwargs`."""

    refusal = "has no pose front-end, so it cannot read sign language; train one with the video_to_text task"

    def _sanitize_parameters(self, max_new_tokens=None, num_beams=None, generate_kwargs=None, **kwargs):
        forward = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            forward["max_new_tokens"] = max_new_tokens
        if num_beams is not None:
            forward["num_beams"] = num_beams
        return {}, forward, {}

    @property
    def frontend_field(self) -> str:
        """The front-end this folder reads sign language with: RGB frames (patches) or keypoints (pose)."""
        return "patch_frontend" if getattr(self.model.config, "patch_frontend", False) else "pose_frontend"

    def preprocess(self, inputs) -> dict:
        if self.frontend_field == "patch_frontend":  # frames, (1, frames, height, width, 3)
            return {"pixel_values": torch.as_tensor(read_clip(self.model.config, inputs))[None].to(self.device)}
        keypoints, visible = _keypoints(inputs)
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


def _keypoints(inputs) -> tuple[np.ndarray, np.ndarray]:
    """(keypoints (frames, 27, 3), visible (frames, 27)) of a pipeline input."""
    if isinstance(inputs, str | os.PathLike | bytes | bytearray):
        if isinstance(inputs, str | os.PathLike) and not str(inputs).endswith(".pose"):
            raise ValueError(
                f"{inputs}: the video-to-text pipeline reads pose-format .pose files (MediaPipe Holistic keypoints) "
                "or keypoint arrays; extract keypoints from a video with MediaPipe Holistic first."
            )
        keypoints, visible, _ = read_pose(inputs)
        return keypoints, visible
    if isinstance(inputs, dict) and "keypoints" in inputs:
        points = np.asarray(inputs["keypoints"], dtype=np.float32)
        visible = inputs.get("visible")
    elif isinstance(inputs, np.ndarray | torch.Tensor):
        points, visible = np.asarray(inputs, dtype=np.float32), None
    else:
        raise TypeError(
            "video-to-text takes a .pose path or bytes, a (frames, points, 3) keypoint array, or "
            f"{{'keypoints': ..., 'visible': ...}}, got {type(inputs).__name__}"
        )
    if points.ndim != 3 or points.shape[0] == 0 or points.shape[-1] < 3:
        raise ValueError(f"keypoints must be (frames > 0, points, 3), got {points.shape}")
    if points.shape[1] == POSE_KEYPOINTS:  # already the 27 kept points
        seen = np.abs(points).sum(-1) > 0 if visible is None else np.asarray(visible, dtype=bool)
        return points[..., :3], seen
    return select_keypoints(points, None if visible is None else np.asarray(visible, dtype=np.float32))
