"""Video reading (modeling_whisper_moe/video.py): containers, rotation, frame-rate sampling, resizing, bad input.

The clips are written here with PyAV's own encoders: a picture whose quadrants have known colours, so orientation and
resizing can be checked by colour, and whose frame index is written in a corner so sampling can be checked too.
"""

from fractions import Fraction

import av
import numpy as np
import pytest

from modeling_whisper_moe import iter_video, load_video
from modeling_whisper_moe.video import VideoDecodeError

HEIGHT, WIDTH = 48, 64
MILLISECOND = Fraction(1, 1000)
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _picture(index: int) -> np.ndarray:
    """Top half red, bottom half blue, a green strip on the left; the frame index as the brightness of the
    bottom-right corner block (index * 20)."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[: HEIGHT // 2] = RED
    image[HEIGHT // 2 :] = BLUE
    image[:, :8] = GREEN
    image[-16:, -16:] = min(255, index * 20)
    return image


def _write(path, codec: str, times: list[float], rotation: int | None = None, rate: int = 10):
    """A clip whose frame i is shown from times[i] seconds (irregular times: a variable frame rate)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = WIDTH, HEIGHT
        stream.pix_fmt = {"mjpeg": "yuvj420p", "prores_ks": "yuv422p10le"}.get(codec, "yuv420p")
        stream.time_base = MILLISECOND  # any frame times (the muxer may change the stream's once it starts)
        stream.codec_context.max_b_frames = 0  # frames in presentation order: the muxer needs rising timestamps
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index, time in enumerate(times):
            frame = av.VideoFrame.from_ndarray(_picture(index), format="rgb24")
            frame.pts = round(time * 1000)
            frame.time_base = MILLISECOND
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _colour(pixel: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(round(value / 255)) * 255 for value in pixel)


def _index(frame: np.ndarray) -> int:
    return round(float(frame[-6:, -6:].mean()) / 20)


@pytest.mark.parametrize(
    "suffix, codec", [(".mp4", "libx264"), (".mov", "prores_ks"), (".mkv", "libx264"), (".webm", "libvpx-vp9"),
                      (".avi", "mjpeg")],
)  # fmt: skip
def test_every_container_gives_rgb_frames_in_order(suffix, codec, tmp_path):
    path = _write(tmp_path / f"clip{suffix}", codec, [i / 10 for i in range(6)])
    video = load_video(path)
    assert video.shape == (6, HEIGHT, WIDTH, 3) and video.dtype == np.uint8
    assert [_index(frame) for frame in video] == list(range(6))
    assert _colour(video[0, 2, 30]) == RED and _colour(video[0, -20, 30]) == BLUE and _colour(video[0, 5, 2]) == GREEN
    assert np.array_equal(load_video(path.read_bytes()), video)  # bytes read the same


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_metadata_is_honoured(rotation, tmp_path):
    video = load_video(_write(tmp_path / "phone.mp4", "libx264", [0.0, 0.1], rotation=rotation))
    upright = np.rot90(_picture(0), k=rotation // 90)  # the picture shown turned counter-clockwise
    assert video.shape[1:3] == upright.shape[:2]
    for y, x in ((2, 2), (2, -3), (-3, 2), (-3, -3), (upright.shape[0] // 2 - 6, upright.shape[1] // 2 - 6)):
        assert _colour(video[0, y, x]) == _colour(upright[y, x])


def test_a_variable_frame_rate_is_sampled_by_time(tmp_path):
    times = [0.0, 0.05, 0.4, 0.45, 0.5, 1.0]  # bursts and gaps
    path = _write(tmp_path / "vfr.mkv", "libx264", times)
    assert [_index(frame) for frame in load_video(path)] == list(range(6))  # fps=None: every frame
    # at 10 fps the frame on screen at 0.0, 0.1, ..., 1.0 s
    shown = [max(i for i, t in enumerate(times) if t <= step / 10 + 1e-9) for step in range(11)]
    assert [_index(frame) for frame in load_video(path, fps=10)] == shown


def test_resizing_keeps_the_aspect_or_takes_the_given_size(tmp_path):
    path = _write(tmp_path / "clip.mp4", "libx264", [0.0, 0.1])
    assert load_video(path, size=24).shape == (2, 24, 32, 3)  # shorter side 24
    assert load_video(path, size=(20, 10)).shape == (2, 20, 10, 3)
    rotated = _write(tmp_path / "portrait.mp4", "libx264", [0.0], rotation=90)
    assert load_video(rotated, size=24).shape == (1, 32, 24, 3)  # the size applies to the upright picture


def test_frames_stream_one_at_a_time(tmp_path):
    path = _write(tmp_path / "long.mp4", "libx264", [i / 25 for i in range(250)], rate=25)
    frames = iter_video(path, fps=5)
    first = next(frames)  # decoded without reading the rest
    assert first.shape == (HEIGHT, WIDTH, 3)
    assert 1 + sum(1 for _ in frames) == 50


def test_bad_sources_raise_clear_errors(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mov").write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty"):
        load_video(tmp_path / "empty.mov")
    with pytest.raises(VideoDecodeError, match="could not decode"):
        load_video(b"\x00\x01 not a video at all" * 100)
    with pytest.raises(VideoDecodeError, match="no video stream \\(streams: audio\\)"):
        load_video(data_dir / "librispeech" / "test-other" / "1688" / "142285" / "1688-142285-0000.flac")
    path = _write(tmp_path / "clip.mp4", "libx264", [0.0])
    corrupt = path.read_bytes()[: len(path.read_bytes()) // 3]
    with pytest.raises(VideoDecodeError):
        load_video(corrupt)
    with pytest.raises(ValueError, match="fps"):
        load_video(path, fps=0)
    with pytest.raises(ValueError, match="size"):
        load_video(path, size=(0, 4))


@pytest.mark.parametrize("name", ["big_buck_bunny_small.mp4", "jfk_video.mov"])
def test_real_files_decode_and_a_truncated_copy_names_itself(name, data_dir, tmp_path):
    path = data_dir / "misc" / name
    video = load_video(path, fps=5, size=112)
    assert video.ndim == 4 and video.shape[0] >= 5 and min(video.shape[1:3]) == 112 and video.std() > 10
    truncated = tmp_path / f"truncated-{name}"
    truncated.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(VideoDecodeError, match=f"truncated-{name}"):
        load_video(truncated)
