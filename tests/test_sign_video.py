"""Fingerspelling as rendered RGB video (processing/sign_video.py) through the patch front-end: the drawing, training
with scripts/train.py, and the saved folder answering `pipeline("video-to-text")` on a video file from its own code."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, run_without_package

from modeling_whisper_moe import WhisperMoEForConditionalGeneration, load_video
from processing.sign_data import Augmentation, PoseCollator, compose, read_lexicon
from processing.sign_video import RIGHT_HAND_COLOR, Rendering, render_pose, save_video

RECIPE = REPO_ROOT / "configuration" / "recipes" / "fingerspelling-ase-rgb.json"


@pytest.fixture(scope="module")
def lexicon():
    return read_lexicon("ase")


def test_a_composed_word_is_drawn_as_small_rgb_frames_of_a_moving_hand(lexicon, tmp_path):
    keypoints, visible = compose("cab", lexicon, np.random.default_rng(0), Augmentation())
    rendering = Rendering()
    frames = render_pose(keypoints, visible, rendering)
    assert frames.shape == (len(range(0, len(keypoints), rendering.frame_step)), 64, 64, 3)
    assert frames.dtype == np.uint8 and (frames[:, 0, 0] == 0).all()  # a black background
    assert (frames == RIGHT_HAND_COLOR).all(-1).any(axis=(1, 2)).mean() > 0.9  # the spelling hand, nearly always
    assert np.abs(frames[-1].astype(int) - frames[0]).sum() > 0  # the hand moves
    save_video(frames, tmp_path / "cab.mp4", rendering.fps)
    decoded = load_video(tmp_path / "cab.mp4", fps=rendering.fps, size=rendering.size)
    assert decoded.shape == frames.shape and np.abs(decoded.astype(int) - frames).mean() < 8  # lossy H.264
    batch = PoseCollator(key="pixel_values")([{"pixel_values": frames, "labels": [5]},
                                              {"pixel_values": frames[:4], "labels": [5, 6]}])  # fmt: skip
    assert batch["pixel_values"].shape == (2, len(frames), 64, 64, 3) and batch["attention_mask"].sum(1)[1] == 4
    with pytest.raises(ValueError, match="even height"):
        save_video(frames[:, :63], tmp_path / "odd.mp4", rendering.fps)


VIDEO_REMOTE_SCRIPT = """
import torch
from transformers import pipeline

torch.set_num_threads(1)  # a tiny model: more threads only wait on each other on a busy machine
folder, video_file = sys.argv[1], sys.argv[2]
signer = pipeline("video-to-text", model=folder, trust_remote_code=True)
result = {"file": signer(video_file, max_new_tokens=6)["text"], "module": type(signer).__module__}
try:
    signer("/no/such/clip.mp4")
except FileNotFoundError as error:
    result["missing"] = str(error)
"""


def test_the_train_script_learns_rendered_fingerspelling_into_a_folder_that_reads_video(
    tiny_random_moe, lexicon, tmp_path
):
    """Thirty steps of the RGB recipe on a tiny random model: the loss falls, and the folder, with the package not
    importable, reads an .mp4 of a rendered word through its patch front-end."""
    out = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), str(RECIPE),
               "--model_name_or_path", str(tiny_random_moe), "--output_dir", str(out), "--max_steps", "30",
               "--per_device_train_batch_size", "4", "--learning_rate", "0.005", "--logging_steps", "5",
               "--max_eval_samples", "2", "--save_strategy", "no", "--generation_max_length", "8",
               "--num_threads", "1"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = WhisperMoEForConditionalGeneration.from_pretrained(out).config
    assert config.patch_frontend and not config.pose_frontend
    assert (config.video_size, config.video_patch_size, config.video_token_dropout) == (64, 16, 0.25)
    losses = [entry["loss"] for entry in json.loads((out / "training_record.json").read_text())["log_history"]
              if "loss" in entry]  # fmt: skip
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    keypoints, visible = compose("bad", lexicon, np.random.default_rng(7), Augmentation())
    save_video(render_pose(keypoints, visible), tmp_path / "bad.mp4", Rendering().fps)
    remote = run_without_package(VIDEO_REMOTE_SCRIPT, out, tmp_path / "bad.mp4", tmp_path=tmp_path)
    assert remote["leaked"] == [] and remote["module"].startswith("transformers_modules")
    assert isinstance(remote["file"], str) and "clip.mp4" in remote["missing"]
