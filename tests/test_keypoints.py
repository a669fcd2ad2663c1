"""Keypoints from video files (modeling_whisper_moe/keypoints.py, MediaPipe Holistic), as the video-to-text pipeline
reads them (tests/test_sign.py runs a trained folder's pipeline on a video file).

The person is conftest's portrait_video: a real photograph filmed by a drifting crop window. A rendering of the
lexicon's poses (pose-format's visualizer) is no substitute: MediaPipe finds neither body nor hands in its stick
figure, so no test video here shows hands.
"""

import sys
import types

import av
import numpy as np
import pytest
import torch
from conftest import PORTRAIT_FPS, PORTRAIT_FRAMES, PORTRAIT_HEIGHT, PORTRAIT_STEP, PORTRAIT_WIDTH

from modeling_whisper_moe import load_video
from modeling_whisper_moe.keypoints import extract_keypoints
from modeling_whisper_moe.pipeline_video_to_text import _is_video, _keypoints
from modeling_whisper_moe.pose import POSE_KEYPOINTS, read_pose

SAMPLED_FPS = 5
SAMPLED_FRAMES = 1 + (PORTRAIT_FRAMES - 1) * SAMPLED_FPS // PORTRAIT_FPS  # instants 0, 0.2, ... 1.8 s (last: 1.96)
NOSE, SHOULDERS, HANDS = 0, [1, 2], slice(7, POSE_KEYPOINTS)


@pytest.fixture(scope="module")
def portrait_keypoints(portrait_video):
    return extract_keypoints(portrait_video, fps=SAMPLED_FPS)


def test_a_filmed_person_s_body_is_tracked_at_the_sampled_rate(portrait_video, portrait_keypoints):
    keypoints, visible = portrait_keypoints
    assert keypoints.shape == (SAMPLED_FRAMES, POSE_KEYPOINTS, 3) and visible.shape == (SAMPLED_FRAMES, POSE_KEYPOINTS)
    assert len(keypoints) == len(load_video(portrait_video, fps=SAMPLED_FPS))
    assert visible[:, SHOULDERS].all(1).mean() >= 0.9
    # x and y in pixels of the frame, as pose-format stores them: the nose drifts 2 pixels per filmed frame, up-left
    filmed = np.arange(SAMPLED_FRAMES) * PORTRAIT_FPS / SAMPLED_FPS  # the frame shown at each instant
    for axis in (0, 1):
        assert np.polyfit(filmed, keypoints[:, NOSE, axis], 1)[0] == pytest.approx(-PORTRAIT_STEP, abs=0.5)
    assert not visible[:, HANDS].any() and np.all(keypoints[:, HANDS] == 0)  # her hands are out of the picture


@pytest.fixture(scope="module")
def portrait_pose_file(portrait_video, tmp_path_factory):
    """The `.pose` file pose-format's own MediaPipe estimator makes of the portrait video's sampled frames."""
    from pose_format.utils.holistic import load_holistic

    frames = load_video(portrait_video, fps=SAMPLED_FPS)
    pose = load_holistic(list(frames), fps=SAMPLED_FPS, width=PORTRAIT_WIDTH, height=PORTRAIT_HEIGHT, reuse=False)
    path = tmp_path_factory.mktemp("pose") / "portrait.pose"
    with open(path, "wb") as handle:
        pose.write(handle)
    return path


def test_keypoints_equal_those_of_the_pose_file_pose_format_makes_of_the_same_frames(
    portrait_pose_file, portrait_keypoints
):
    keypoints, visible, _ = read_pose(portrait_pose_file)
    assert np.array_equal(visible, portrait_keypoints[1])
    torch.testing.assert_close(keypoints, portrait_keypoints[0], rtol=1e-5, atol=1e-3)


def test_the_pipeline_tells_video_bytes_from_pose_bytes(portrait_video, portrait_pose_file, portrait_keypoints):
    keypoints, visible = _keypoints(portrait_video.read_bytes(), SAMPLED_FPS)
    assert np.array_equal(keypoints, portrait_keypoints[0]) and np.array_equal(visible, portrait_keypoints[1])
    from_pose = _keypoints(portrait_pose_file.read_bytes(), SAMPLED_FPS)
    assert np.array_equal(from_pose[1], visible)


@pytest.mark.parametrize(
    "suffix, codec", [(".mp4", "libx264"), (".mov", "libx264"), (".mkv", "libx264"), (".webm", "libvpx-vp9"),
                      (".avi", "mjpeg")],
)  # fmt: skip
def test_video_bytes_of_every_container_are_told_from_pose_bytes(suffix, codec, portrait_pose_file, tmp_path):
    path = tmp_path / f"clip{suffix}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=PORTRAIT_FPS)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for packet in [*stream.encode(av.VideoFrame(64, 48, "rgb24")), *stream.encode()]:
            container.mux(packet)
    assert _is_video(path.read_bytes()) and not _is_video(portrait_pose_file.read_bytes())


def test_a_video_without_a_person_gives_frames_with_nothing_visible(data_dir):
    video = data_dir / "misc" / "jfk_video.mov"  # a plain blue picture over the JFK speech
    keypoints, visible = extract_keypoints(video.read_bytes(), fps=1)
    assert len(keypoints) == len(load_video(video, fps=1)) == 11  # 11 s at 1 frame per second
    assert not visible.any() and np.all(keypoints == 0)


def test_without_mediapipe_the_error_gives_the_install_command(portrait_video, monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # makes `import mediapipe` raise ImportError
    with pytest.raises(ImportError, match=r"pip install --no-deps mediapipe==0\.10\.21"):
        extract_keypoints(portrait_video)
    monkeypatch.setitem(sys.modules, "mediapipe", types.SimpleNamespace(__version__="0.10.31"))  # no solutions API
    with pytest.raises(ImportError, match=r"0\.10\.31 has no Holistic models.*mediapipe==0\.10\.21"):
        extract_keypoints(portrait_video)
