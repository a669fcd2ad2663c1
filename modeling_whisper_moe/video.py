"""Video reading for WhisperMoE's video inputs: RGB frames of any file FFmpeg decodes (through PyAV).

`iter_video` streams a video frame by frame in bounded memory (one decoded frame at a time, however long the file);
`load_video` collects the frames into one `(frames, height, width, 3)` uint8 array. Both honour the container's
rotation (a phone's portrait clip comes out upright), sample a target frame rate by presentation time (so variable
frame rates give evenly spaced frames), and resize. PyAV is imported when reading (this file ships with
trust_remote_code).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .audio import _import_optional

VideoSource = str | os.PathLike | bytes
RIGHT_ANGLE = 90  # rotation metadata comes in multiples of it (degrees, counter-clockwise)

__all__ = ["VideoDecodeError", "VideoSource", "iter_video", "load_video"]


class VideoDecodeError(ValueError):
    """Raised when a source has no decodable video: corrupt or empty data, an audio-only file, no frames."""


def load_video(source: VideoSource, fps: float | None = None, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """All frames of `source` as one array; see `iter_video` for the arguments.

    Returns:
        `np.ndarray` of shape `(frames, height, width, 3)`, dtype uint8, RGB, upright.
    """
    frames = list(iter_video(source, fps, size))
    return np.stack(frames)


def iter_video(
    source: VideoSource, fps: float | None = None, size: int | tuple[int, int] | None = None
) -> Iterator[np.ndarray]:
    """The frames of `source`, one `(height, width, 3)` uint8 RGB array at a time, upright.

    Args:
        source: a path to any container FFmpeg reads (.mov, .mp4, .mkv, .webm, .avi, ...), or its bytes.
        fps: frames per second to sample: the frame on screen at each of 0, 1/fps, 2/fps, ... seconds (a frame is
            repeated when the video is slower, skipped when faster). None: every decoded frame.
        size: the output size, after rotation: an int makes the shorter side that long (aspect ratio kept, both
            sides even-rounded down to at least 1), a (height, width) pair is exact. None: the video's own size.

    Raises:
        FileNotFoundError: a path that does not exist.
        VideoDecodeError (a ValueError): corrupt or empty data, no video stream, or no decodable frame.
        ValueError: a non-positive fps or size.
    """
    if fps is not None and not (isinstance(fps, int | float) and fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number of frames per second, got {fps!r}")
    _check_size(size)
    name, data = _open_argument(source)
    av = _import_optional("av", "av")
    emitted = 0
    try:
        with av.open(data) as container:
            if not container.streams.video:
                kinds = sorted({stream.type for stream in container.streams}) or ["none"]
                raise VideoDecodeError(f"{name}: no video stream (streams: {', '.join(kinds)})")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in _sampled(container.decode(stream), fps):
                emitted += 1
                yield _to_rgb(frame, size)
    except av.FFmpegError as err:
        raise VideoDecodeError(f"{name}: could not decode video: {err}") from err
    if not emitted:
        raise VideoDecodeError(f"{name}: the video stream has no decodable frames")


def _open_argument(source: VideoSource) -> tuple[str, object]:
    """(a name for errors, what av.open takes)."""
    if isinstance(source, bytes | bytearray):
        if not source:
            raise VideoDecodeError("video bytes: the data is empty (0 bytes)")
        return "video bytes", io.BytesIO(bytes(source))
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Video file not found: {path}")
        if path.stat().st_size == 0:
            raise VideoDecodeError(f"{path}: the file is empty (0 bytes)")
        return str(path), str(path)
    raise TypeError(f"Unsupported video source of type {type(source).__name__}; give a path or bytes")


def _check_size(size: int | tuple[int, int] | None) -> None:
    sides = (size,) if isinstance(size, int) else size
    if size is not None and (len(sides) not in (1, 2) or any(not isinstance(s, int) or s < 1 for s in sides)):
        raise ValueError(f"size must be a positive int (shorter side) or a (height, width) pair, got {size!r}")


def _sampled(frames: Iterator, fps: float | None) -> Iterator:
    """The frame on screen at each multiple of 1 / fps seconds, from the first frame's time (all frames if None)."""
    if fps is None:
        yield from frames
        return
    shown, start, step = None, None, 0
    for frame in frames:
        time = frame.time if frame.time is not None else 0.0
        start = time if start is None else start
        while shown is not None and start + step / fps < time:  # these instants fall before this frame
            yield shown
            step += 1
        shown = frame
    if shown is not None:
        last = shown.time if shown.time is not None else start
        while start + step / fps <= last:
            yield shown
            step += 1


def _to_rgb(frame, size: int | tuple[int, int] | None) -> np.ndarray:
    """The frame as upright RGB at `size` (the displayed orientation's height and width).

    PyAV's `frame.rotation` is the display matrix's angle: the picture is shown turned that many degrees
    counter-clockwise, which is what np.rot90 does per quarter turn."""
    turns = round((frame.rotation or 0) / RIGHT_ANGLE) % 4
    sideways = turns % 2 == 1  # stored width is shown as height
    shown_height, shown_width = (frame.width, frame.height) if sideways else (frame.height, frame.width)
    height, width = _target_size(shown_height, shown_width, size)
    stored_width, stored_height = (height, width) if sideways else (width, height)
    image = frame.to_ndarray(format="rgb24", width=stored_width, height=stored_height)
    return np.ascontiguousarray(np.rot90(image, k=turns)) if turns else image


def _target_size(height: int, width: int, size: int | tuple[int, int] | None) -> tuple[int, int]:
    if size is None:
        return height, width
    if not isinstance(size, int):
        return size[0], size[1]
    scale = size / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))
