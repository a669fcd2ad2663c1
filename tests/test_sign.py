"""Sign language: keypoint selection and normalisation (pose.py), the encoder's pose front-end, fingerspelling data
from the real letter clips of spoken-to-signed (processing/sign_data.py), training and the video-to-text pipeline."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, run_without_package, tiny_batch, tiny_moe, tiny_moe_config

from modeling_whisper_moe import WhisperMoEForConditionalGeneration
from modeling_whisper_moe.keypoints import extract_keypoints
from modeling_whisper_moe.packing import plan_clip_packing
from modeling_whisper_moe.pose import (
    BODY_POINTS,
    HAND_POINTS,
    HOLISTIC_COMPONENTS,
    POSE_KEYPOINTS,
    normalize_pose,
    pose_values,
    read_pose,
    read_spelling,
    select_keypoints,
    spell,
)
from processing.evaluation.video_to_text import alignment, score
from processing.routing import router_statistics, router_token_masks
from processing.sign_data import (
    Augmentation,
    FingerspellingDataset,
    PoseCollator,
    compose,
    is_held_out,
    lexicon_dir,
    read_lexicon,
    split_words,
)

HOLISTIC_POINTS = sum(count for _, count in HOLISTIC_COMPONENTS)  # 586


@pytest.fixture(scope="module")
def lexicon():
    return read_lexicon("ase")


def test_the_27_kept_points_are_body_and_both_hands():
    frames = np.zeros((2, HOLISTIC_POINTS, 3), np.float32)
    frames[..., 0] = np.arange(HOLISTIC_POINTS)  # x = the point's index
    frames[..., 1] = 1.0
    kept, visible = select_keypoints(frames)
    left, right = 33 + 478, 33 + 478 + 21
    expected = [*BODY_POINTS, *(left + i for i in HAND_POINTS), *(right + i for i in HAND_POINTS)]
    assert kept.shape == (2, POSE_KEYPOINTS, 3) and kept[0, :, 0].tolist() == expected
    assert visible.all()
    confidence = np.ones((2, HOLISTIC_POINTS))
    confidence[1, left : left + 21] = 0  # the left hand not found in frame 1
    _, visible = select_keypoints(frames, confidence)
    assert visible[0].all() and not visible[1, 7:17].any() and visible[1, 17:].all()


def test_normalisation_removes_where_the_signer_stands_and_how_far(lexicon):
    keypoints, visible = lexicon["b"]
    moved = keypoints * 2.5 + np.array([40.0, -12.0, 3.0], np.float32)  # nearer the camera, elsewhere in the frame
    torch.testing.assert_close(
        normalize_pose(moved, visible), normalize_pose(keypoints, visible), rtol=1e-4, atol=1e-4
    )
    normalised = normalize_pose(keypoints, visible)
    shoulders = normalised[:, 1, :2] - normalised[:, 2, :2]
    assert np.median(np.linalg.norm(shoulders, axis=-1)) == pytest.approx(1.0, rel=1e-4)
    assert np.all(normalised[~visible] == 0)
    values = pose_values(keypoints, visible)
    assert values.shape == (len(keypoints), POSE_KEYPOINTS, 4) and np.array_equal(values[..., 3], visible)


def test_the_lexicon_reads_every_asl_letter_from_its_real_pose_files(lexicon):
    assert sorted(lexicon) == [chr(code) for code in range(ord("a"), ord("z") + 1)]
    for keypoints, visible in lexicon.values():
        assert keypoints.shape[1:] == (POSE_KEYPOINTS, 3) and len(keypoints) >= 10
        assert visible[:, 1:3].all()  # the shoulders are always seen
        assert visible[:, 7:].any()  # a hand is
    path = next((lexicon_dir() / "ase").glob("*.pose"))
    from_bytes = read_pose(path.read_bytes())
    from_path = read_pose(path)
    assert np.array_equal(from_bytes[0], from_path[0]) and from_path[2] == 25.0


def test_composed_words_vary_and_held_out_words_are_never_trained(lexicon):
    plain, _ = compose("cab", lexicon, np.random.default_rng(0), None)
    assert len(plain) == sum(len(lexicon[letter][0]) for letter in "cab")
    first, _ = compose("cab", lexicon, np.random.default_rng(1), Augmentation())
    again, _ = compose("cab", lexicon, np.random.default_rng(1), Augmentation())
    other, _ = compose("cab", lexicon, np.random.default_rng(2), Augmentation())
    assert np.array_equal(first, again) and (len(first) != len(other) or not np.allclose(first, other))
    words = ["above", "cab", "hello", "zebra", "naïve", "x"]
    train, held_out = split_words(words, set(lexicon))
    assert "naïve" not in train + held_out  # letters the alphabet has no clip for
    assert set(train).isdisjoint(held_out) and all(is_held_out(word) for word in held_out)
    assert is_held_out("above") and not is_held_out("hello")  # the split is a fixed hash, the same everywhere


def test_the_pose_front_end_ignores_padding_and_leaves_audio_alone(tmp_path):
    model = tiny_moe()
    batch = tiny_batch()
    with torch.no_grad():
        audio_before = model(**batch).logits
    model.add_pose_frontend()
    assert model.config.pose_frontend
    values = torch.randn(2, 9, POSE_KEYPOINTS, 4)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    labels = torch.randint(4, 90, (2, 5))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, audio_before)
        padded = model(pose_values=values, attention_mask=mask, labels=labels).logits[1]
        alone = model(pose_values=values[1:, :6], labels=labels[1:]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded, info = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and reloaded.config.pose_frontend
    with pytest.raises(ValueError, match="pose_values must be"):
        model(pose_values=torch.randn(1, 4, 5, 4), labels=labels[:1])


POSE_LENGTHS = [9, 3, 7, 2, 9, 5]  # frames per clip; packed into rows of 9: (9) (9) (7 2) (5 3)


def _pose_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (batch, longest, 27, 4) keypoints, garbage past each clip's end, and the (batch, longest) frame mask."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(len(lengths), max(lengths), POSE_KEYPOINTS, 4, generator=generator)
    return values, (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()


def _packed_and_padded(**overrides):
    packed = tiny_moe(pose_frontend=True, pack_pose=True, output_router_logits=True, **overrides)
    padded = tiny_moe(pose_frontend=True, pack_pose=False, output_router_logits=True, **overrides)
    padded.load_state_dict(packed.state_dict())
    return packed, padded


def test_packed_pose_clips_get_their_padded_and_alone_outputs_routing_and_losses():
    packed, padded = _packed_and_padded()
    values, mask = _pose_batch(POSE_LENGTHS)
    labels = torch.randint(4, 90, (len(POSE_LENGTHS), 5))
    labels[0, -2:] = -100
    with torch.no_grad():
        out_packed = packed(pose_values=values, attention_mask=mask, labels=labels)
        out_padded = padded(pose_values=values, attention_mask=mask, labels=labels)
        alone = packed.get_encoder()(pose_values=values[3:4, :2]).last_hidden_state[0]
    real = mask.bool()
    encoded = out_packed.encoder_last_hidden_state
    torch.testing.assert_close(encoded[real], out_padded.encoder_last_hidden_state[real], rtol=1e-5, atol=1e-5)
    assert encoded[~real].abs().sum() == 0
    torch.testing.assert_close(encoded[3, :2], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_packed.logits, out_padded.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_packed.aux_loss, out_padded.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_packed.loss, out_padded.loss, rtol=1e-5, atol=1e-6)
    # each real frame's router logits and experts, found through the packing plan; row padding is masked out
    packing = plan_clip_packing(mask)
    assert packing.source.shape == (4, max(POSE_LENGTHS))  # 35 frames in 4 rows of 9 instead of 6 rows
    layout = router_token_masks(packed.config, {"pose_values": values, "attention_mask": mask})["encoder"]
    with torch.no_grad():
        router_mask = packed.get_encoder()(pose_values=values, attention_mask=mask).router_mask
    assert torch.equal(layout, packing.real) and torch.equal(router_mask, layout.reshape(-1).long())
    for logits_packed, logits_padded in zip(out_packed.encoder_router_logits, out_padded.encoder_router_logits):
        at_real = logits_padded[packing.source[packing.real]]  # padded rows are flat (batch * frames) tokens
        torch.testing.assert_close(logits_packed[packing.real.reshape(-1)], at_real, rtol=1e-5, atol=1e-6)
        top_packed = logits_packed[packing.real.reshape(-1)].topk(2).indices
        assert torch.equal(top_packed, at_real.topk(2).indices)
    stats_packed = router_statistics(out_packed.encoder_router_logits, 2, layout)
    stats_padded = router_statistics(out_padded.encoder_router_logits, 2, mask)
    for layer_packed, layer_padded in zip(stats_packed, stats_padded, strict=True):
        assert layer_packed == pytest.approx(layer_padded, rel=1e-5)


def test_packed_pose_clips_train_as_padded_ones_and_refuse_what_reads_across_clips():
    packed, padded = _packed_and_padded()
    values, mask = _pose_batch(POSE_LENGTHS, seed=1)
    labels = torch.randint(4, 90, (len(POSE_LENGTHS), 4))
    for model in (packed, padded):
        model(pose_values=values, attention_mask=mask, labels=labels).loss.backward()
    for (name, weight), other in zip(packed.named_parameters(), padded.parameters()):
        if weight.grad is not None or other.grad is not None:
            torch.testing.assert_close(weight.grad, other.grad, rtol=1e-4, atol=1e-6, msg=name)
    left_padded = mask.flip(-1)
    with pytest.raises(ValueError, match="right-padded"):
        packed.get_encoder()(pose_values=values, attention_mask=left_padded)
    with pytest.raises(ValueError, match="packed pose clips"):
        tiny_moe_config(pose_frontend=True, conv_module=True, conv_kernel_size=3)
    tiny_moe_config(pose_frontend=True, conv_module=True, conv_kernel_size=3, pack_pose=False)  # padded: allowed
    with pytest.raises(ValueError, match="packed pose clips"):
        tiny_moe(encoder_ttt_layers=[0]).add_pose_frontend()


def test_packed_pose_clips_generate_the_text_they_generate_padded(tiny_random_moe):
    from modeling_whisper_moe import WhisperMoEProcessor
    from processing.tasks.translation import add_text_languages

    tokenizer = WhisperMoEProcessor.from_pretrained(tiny_random_moe).tokenizer
    model = WhisperMoEForConditionalGeneration.from_pretrained(tiny_random_moe).add_pose_frontend().eval()
    add_text_languages(model.generation_config, tokenizer, ("en",))
    values, mask = _pose_batch([30, 8, 17, 25], seed=2)
    generated = {}
    for pack_pose in (True, False):
        model.config.pack_pose = pack_pose
        generated[pack_pose] = model.generate_from_pose(values, mask, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(generated[True], generated[False])
    alone = model.generate_from_pose(values[1:2, :8], max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(alone[0], generated[False][1])


def test_fingerspelling_batches(lexicon, tiny_random_moe):
    from modeling_whisper_moe import WhisperMoEProcessor

    tokenizer = WhisperMoEProcessor.from_pretrained(tiny_random_moe).tokenizer
    data = FingerspellingDataset(["cab", "hello"], lexicon, size=4, prompt=[7, 8], tokenizer=tokenizer, eos_id=9,
                                 seed=0)  # fmt: skip
    items = [data[i] for i in range(4)]
    assert {item["word"] for item in items} <= {"cab", "hello"}
    for item in items:
        assert item["labels"][:2] == [7, 8] and item["labels"][-1] == 9
        assert tokenizer.decode(item["labels"][2:-1]).strip() == " ".join(item["word"])  # a token per letter
        assert len(item["labels"]) == 3 + len(item["word"])
    batch = PoseCollator()(items)
    frames = [len(item["pose_values"]) for item in items]
    assert batch["pose_values"].shape == (4, max(frames), POSE_KEYPOINTS, 4)
    assert batch["attention_mask"].sum(1).tolist() == frames


SIGN_REMOTE_SCRIPT = """
import numpy as np
from transformers import pipeline

folder, pose_file, video, keypoints_file, corrupt, audio_only = sys.argv[1:7]
signer = pipeline("video-to-text", model=folder, trust_remote_code=True)
result = {"file": signer(pose_file, max_new_tokens=4)["text"],
          "module": type(signer).__module__,
          "video": signer(video, fps=5, max_new_tokens=4)["text"],
          "video_keypoints": signer(dict(np.load(keypoints_file)), max_new_tokens=4)["text"]}
for name, path in (("missing", "/no/such/clip.mp4"), ("corrupt", corrupt), ("audio_only", audio_only)):
    try:
        signer(path)
    except (ValueError, OSError) as error:
        result[name] = str(error)
"""


def test_the_train_script_learns_video_to_text_into_a_folder_the_pipeline_reads(
    tiny_random_moe, portrait_video, data_dir, tmp_path
):
    """Two steps of the fingerspelling recipe on a tiny random model: the folder has the pose front-end and answers
    `pipeline("video-to-text")` from its own code, for a `.pose` file and for a video file (as for the keypoints
    MediaPipe finds in it); a missing, corrupt or audio-only file is named in the error."""
    out = tmp_path / "out"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"),
               str(REPO_ROOT / "configuration" / "recipes" / "fingerspelling-ase.json"),
               "--model_name_or_path", str(tiny_random_moe), "--output_dir", str(out), "--max_steps", "2",
               "--per_device_train_batch_size", "2", "--max_eval_samples", "2", "--save_strategy", "no",
               "--generation_max_length", "8"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert WhisperMoEForConditionalGeneration.from_pretrained(out).config.pose_frontend
    pose_file = next((lexicon_dir() / "ase").glob("*.pose"))
    keypoints_file = tmp_path / "keypoints.npz"
    keypoints, visible = extract_keypoints(portrait_video, fps=5)
    np.savez(keypoints_file, keypoints=keypoints, visible=visible)
    corrupt = tmp_path / "corrupt.mov"
    corrupt.write_bytes(portrait_video.read_bytes()[:48] + bytes(range(256)) * 8)  # a header, then noise
    audio_only = data_dir / "misc" / "jfk.m4a"
    remote = run_without_package(
        SIGN_REMOTE_SCRIPT, out, pose_file, portrait_video, keypoints_file, corrupt, audio_only, tmp_path=tmp_path
    )
    assert remote["leaked"] == [] and remote["module"].startswith("transformers_modules")
    assert isinstance(remote["file"], str) and remote["video"] == remote["video_keypoints"]
    assert "clip.mp4" in remote["missing"] and "not found" in remote["missing"]
    assert "corrupt.mov" in remote["corrupt"] and "decode" in remote["corrupt"]
    assert "jfk.m4a" in remote["audio_only"] and "no video stream" in remote["audio_only"]
    report = tmp_path / "sign.json"
    evaluate = [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), "--tasks", "video_to_text", "--model",
                str(out), "--sign_words", "3", "--output_json", str(report)]  # fmt: skip
    proc = subprocess.run(evaluate, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    system = json.loads(report.read_text())["reports"]["video_to_text"]["systems"][0]
    assert (
        system["held_out_words"] == 3
        and 0 <= system["cer"]
        and all(is_held_out(e["word"]) for e in system["examples"])
    )


def test_spelled_letters_read_back_as_words():
    assert spell("hello") == "h e l l o"
    assert read_spelling(" h e l l o  w o r l d") == "hello world"


def test_letter_error_rates_and_confusions():
    assert alignment("hello", "helo") == [("h", "h"), ("e", "e"), ("l", "<del>"), ("l", "l"), ("o", "o")]
    assert alignment("cab", "xcab")[0] == ("<ins>", "x")
    scored = score(["hello", "cab"], [" Hello.", "cob"])
    assert scored["cer"] == pytest.approx(100 / 8) and scored["wer"] == 50.0
    assert scored["confusion"]["a"] == {"o": 1} and scored["confusion"]["l"] == {"l": 2}


def test_the_video_to_text_pipeline_refuses_a_model_without_pose_front_end(tiny_random_moe):
    from transformers import pipeline

    with pytest.raises(ValueError, match="no pose front-end"):
        pipeline("video-to-text", model=str(tiny_random_moe), trust_remote_code=True)
