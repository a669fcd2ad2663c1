"""Keypoints of a signer from a video file: MediaPipe Holistic run on its frames, as pose-format's `.pose` files store
them.

`extract_keypoints` streams the frames (video.iter_video, one decoded frame at a time) through one Holistic instance
in video mode (it tracks the body and hands from frame to frame instead of detecting them afresh) and keeps the 27
points of pose.select_keypoints. Coordinates follow pose-format's MediaPipe estimator (pose_format/utils/holistic.py):
x and y in pixels of the frame, z as MediaPipe gives it; a body point's confidence is its visibility, a hand's is 1
when the hand was found; a part not found is 0 and not visible. So keypoints from a video and from the `.pose` file
pose-format makes of it agree, and both read alike after pose.normalize_pose.

MediaPipe is an optional install, imported when a video is read (this file ships with trust_remote_code). 0.10.21 is
the last release whose wheel carries the Holistic models of the `solutions` API (later ones ship none, and nothing is
downloaded at run time); its metadata pins numpy<2, but it runs with numpy 2 when installed without its dependencies.
"""

from __future__ import annotations

import itertools

import numpy as np

from .pose import select_keypoints
from .video import VideoSource, iter_video

MEDIAPIPE_INSTALL = (
    'pip install --no-deps mediapipe==0.10.21 && pip install absl-py attrs flatbuffers "protobuf>=4.25.3,<5" '
    "opencv-python-headless matplotlib"
)
# The Holistic components the 27 points come from, in pose-format's order, with their point counts; the face and
# world landmarks are not kept, so they are not laid out
DETECTED_COMPONENTS = (("POSE_LANDMARKS", 33), ("LEFT_HAND_LANDMARKS", 21), ("RIGHT_HAND_LANDMARKS", 21))
BODY_COMPONENT = "POSE_LANDMARKS"  # the only one whose points carry a visibility

__all__ = ["MEDIAPIPE_INSTALL", "extract_keypoints"]


def extract_keypoints(
    video: VideoSource, fps: float | None = None, size: int | tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """MediaPipe Holistic keypoints of the person in `video` (a path or bytes of any file FFmpeg reads).

    Args:
        video, fps, size: as video.iter_video (fps None: every decoded frame; size None: the video's own size).

    Returns:
        (keypoints (frames, 27, 3) float32, visible (frames, 27) bool), as pose.read_pose gives for a `.pose` file.

    Raises:
        ImportError: MediaPipe with the Holistic models is not installed (the message gives the install command).
        FileNotFoundError, video.VideoDecodeError: as iter_video (corrupt, empty or audio-only files, naming them).
    """
    holistic = _holistic_module()
    frames = iter_video(video, fps, size)
    first = next(frames)  # a file that cannot be read fails here, before MediaPipe loads its models
    points, confidence = [], []
    with holistic.Holistic(static_image_mode=False) as tracker:
        for frame in itertools.chain([first], frames):
            height, width = frame.shape[:2]
            found = tracker.process(frame)
            parts = [_landmarks(found, name, count, width, height) for name, count in DETECTED_COMPONENTS]
            points.append(np.concatenate([part[0] for part in parts]))
            confidence.append(np.concatenate([part[1] for part in parts]))
    return select_keypoints(np.stack(points), np.stack(confidence), list(DETECTED_COMPONENTS))


def _landmarks(found, component: str, count: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """One component of a Holistic result -> ((count, 3) points in pixels, (count,) confidence); zeros if absent."""
    landmarks = getattr(found, component.lower())  # e.g. POSE_LANDMARKS -> found.pose_landmarks
    if landmarks is None:
        return np.zeros((count, 3), np.float32), np.zeros(count, np.float32)
    points = np.array([(mark.x * width, mark.y * height, mark.z) for mark in landmarks.landmark], np.float32)
    if component == BODY_COMPONENT:
        return points, np.array([mark.visibility for mark in landmarks.landmark], np.float32)
    return points, np.ones(count, np.float32)


def _holistic_module():
    """mediapipe.solutions.holistic, or an ImportError saying how to install a MediaPipe that has it."""
    try:
        import mediapipe
    except ImportError as error:
        raise ImportError(f"Reading keypoints from video needs MediaPipe 0.10.21: {MEDIAPIPE_INSTALL}") from error
    if not hasattr(mediapipe, "solutions"):  # 0.10.31 and later dropped the solutions API and its models
        raise ImportError(
            f"MediaPipe {mediapipe.__version__} has no Holistic models (the solutions API); "
            f"install 0.10.21: {MEDIAPIPE_INSTALL}"
        )
    return mediapipe.solutions.holistic
