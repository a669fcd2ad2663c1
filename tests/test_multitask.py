"""The generalist (one WhisperMoE for speech recognition, text translation and text-to-speech, and sign language
through its pose front-end) on tiny random configs, its one-task-per-batch data, the training script end to end, and
the pipelines from a saved folder."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, TINY, run_without_package
from transformers import (
    AutoModelForSpeechSeq2Seq,
    AutoModelForTextToSpectrogram,
    AutoTokenizer,
    WhisperFeatureExtractor,
)

from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration, load_audio
from modeling_whisper_moe.modeling_whisper_moe_tts import WhisperMoEForSpeechAndText, WhisperMoEForTextToSpeech
from modeling_whisper_moe.vocoder import SAMPLING_RATE
from processing.multitask import (
    MultiTaskCollator,
    RecognitionCollator,
    SpokenDigitsRecognitionDataset,
    TaskBatchSampler,
    TaskMixture,
    interleave,
    recognition_example,
)
from processing.tts_data import TextToSpeechCollator, contains_held_out, digits_to_words

GENERALIST_TINY = dict(
    TINY, num_experts=4, num_experts_per_tok=2, text_frontend=True, max_text_positions=12, tts_reduction_factor=2,
    tts_speaker_embedding_dim=3, tts_postnet_layers=2, variable_length_audio=True,
)  # fmt: skip
MELS = TINY["num_mel_bins"]


def tiny_generalist(seed: int = 0, **overrides) -> WhisperMoEForSpeechAndText:
    torch.manual_seed(seed)
    return WhisperMoEForSpeechAndText(WhisperMoEConfig(**{**GENERALIST_TINY, **overrides})).eval()


def speech_batch() -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "durations": torch.tensor([[2, 4, 2], [4, 2, 0]]),
        "spectrogram_labels": torch.randn(2, 8, MELS),
        "spectrogram_mask": torch.tensor([[1] * 8, [1] * 6 + [0] * 2]),
        "speaker_embeddings": torch.eye(3)[:2],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Model: one encoder-decoder, three tasks
# ---------------------------------------------------------------------------------------------------------------------


def test_speech_output_runs_through_the_shared_encoder_and_decoder_layers():
    generalist = tiny_generalist()
    tts = WhisperMoEForTextToSpeech(generalist.config).eval()
    state = generalist.state_dict()
    renamed = {"model.decoder.layer_norm.": "decoder_layer_norm.", "model.decoder.layers.": "decoder_layers.",
               "model.encoder.": "encoder."}  # fmt: skip
    mapped = {}
    for name, value in state.items():
        for old, new in renamed.items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        mapped[name] = value
    missing, _ = tts.load_state_dict(mapped, strict=False)
    assert missing == []
    batch = speech_batch()
    names = {"spectrogram_labels": "labels", "spectrogram_mask": "labels_mask"}
    ours, theirs = generalist(**batch), tts(**{names.get(k, k): v for k, v in batch.items()})
    torch.testing.assert_close(ours.spectrogram, theirs.spectrogram)
    torch.testing.assert_close(ours.loss, theirs.loss)
    # and the decoder layers that speak are the ones that write text
    generalist.model.decoder.layers[0].self_attn.q_proj.weight.data.normal_()
    assert not torch.allclose(generalist(**batch).spectrogram, ours.spectrogram)


def test_text_output_is_whisper_moe_unchanged():
    generalist = tiny_generalist()
    plain = WhisperMoEForConditionalGeneration(generalist.config).eval()
    plain.load_state_dict({k: v for k, v in generalist.state_dict().items() if k.startswith(("model.", "proj_out"))})
    features = torch.randn(2, MELS, 20)
    audio = {"input_features": features, "attention_mask": torch.ones(2, 20, dtype=torch.long)}
    text = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    labels = torch.tensor([[10, 11, 2], [12, 2, -100]])
    for inputs in (audio, text):
        ours, theirs = generalist(**inputs, labels=labels), plain(**inputs, labels=labels)
        torch.testing.assert_close(ours.logits, theirs.logits)
        torch.testing.assert_close(ours.loss, theirs.loss)


def test_every_task_trains_the_shared_experts():
    model = tiny_generalist().train()
    shared = model.model.decoder.layers[0].mlp.experts.fc1_weight
    text = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[10, 11, 2]])}
    audio = {"input_features": torch.randn(1, MELS, 20), "labels": torch.tensor([[10, 11, 2]])}
    for inputs in (speech_batch(), text, audio):
        model.zero_grad()
        model(**inputs).loss.backward()
        assert shared.grad is not None and shared.grad.abs().sum() > 0


def test_speech_output_needs_text_only_inputs():
    model = tiny_generalist()
    batch = speech_batch()
    with pytest.raises(ValueError, match="input_features"):
        model(**batch, input_features=torch.randn(2, MELS, 20))
    with pytest.raises(ValueError, match="pass input_ids"):
        model(durations=batch["durations"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="pass durations too"):
        model(input_ids=batch["input_ids"], speaker_embeddings=batch["speaker_embeddings"])
    with pytest.raises(ValueError, match="text_frontend"):
        WhisperMoEForSpeechAndText(WhisperMoEConfig(**{**GENERALIST_TINY, "text_frontend": False}))


def test_auto_classes_pick_the_generalist_by_architecture(tmp_path):
    generalist, tts = tiny_generalist(), WhisperMoEForTextToSpeech(WhisperMoEConfig(**GENERALIST_TINY))
    generalist.save_pretrained(tmp_path / "generalist")
    tts.save_pretrained(tmp_path / "tts")
    config = json.loads((tmp_path / "generalist" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSpeechSeq2Seq"].endswith("WhisperMoEForSpeechAndText")
    assert config["auto_map"]["AutoModelForTextToSpectrogram"].endswith("WhisperMoEForSpeechAndText")
    # with this package importable its registration answers; it must still tell the two folders apart
    assert type(AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "generalist")) is WhisperMoEForSpeechAndText
    assert type(AutoModelForTextToSpectrogram.from_pretrained(tmp_path / "generalist")) is WhisperMoEForSpeechAndText
    assert type(AutoModelForTextToSpectrogram.from_pretrained(tmp_path / "tts")) is WhisperMoEForTextToSpeech
    loaded = AutoModelForTextToSpectrogram.from_pretrained(tmp_path / "generalist").eval()
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded.generate_speech(ids)[0], generalist.generate_speech(ids)[0])


# ---------------------------------------------------------------------------------------------------------------------
# Data: one task per batch
# ---------------------------------------------------------------------------------------------------------------------


def test_interleave_spreads_each_task_over_the_run():
    schedule = interleave({"asr": 8, "translation": 10, "tts": 24})
    assert Counter(schedule) == {"asr": 8, "translation": 10, "tts": 24}
    for task, count in (("asr", 8), ("tts", 24)):
        positions = [i for i, t in enumerate(schedule) if t == task]
        gaps = np.diff(positions)
        assert gaps.max() - gaps.min() <= 2 and positions[0] < len(schedule) / count + 1


def test_task_batch_sampler_yields_one_task_batches_of_its_size():
    sizes = {"asr": 10, "translation": 7, "tts": 50}
    sampler = TaskBatchSampler(sizes, {"asr": 4, "translation": 3, "tts": 2}, {"asr": 5, "translation": 3, "tts": 6})
    batches = list(sampler)
    assert len(batches) == len(sampler) == 14
    bounds = {"asr": (0, 10), "translation": (10, 17), "tts": (17, 67)}
    drawn = Counter()
    for batch, task in zip(batches, sampler.schedule):
        low, high = bounds[task]
        assert (
            all(low <= index < high for index in batch) and len(batch) == {"asr": 4, "translation": 3, "tts": 2}[task]
        )
        drawn[task] += 1
    assert drawn == {"asr": 5, "translation": 3, "tts": 6}
    # without replacement until a task's items run out: the first 10 asr draws are the 10 items
    asr = [i for batch, task in zip(batches, sampler.schedule) if task == "asr" for i in batch]
    assert sorted(asr[:10]) == list(range(10))
    assert batches == list(sampler)  # deterministic
    sampler.set_epoch(1)
    assert batches != list(sampler)
    with pytest.raises(ValueError, match="no data"):
        TaskBatchSampler({"asr": 3}, {"asr": 1, "tts": 1}, {"asr": 1, "tts": 1})
    with pytest.raises(ValueError, match="at least 1"):
        TaskBatchSampler({"asr": 3}, {"asr": 0}, {"asr": 1})


def test_mixture_and_collator_keep_tasks_apart(tiny_en_dense, fsdd_bank):
    tokenizer = AutoTokenizer.from_pretrained(tiny_en_dense)
    tts_items = [
        {"input_ids": torch.tensor([5, 6]), "durations": torch.tensor([2, 2]), "labels": torch.zeros(4, 80),
         "speaker_embeddings": torch.ones(2)},
    ]  # fmt: skip
    asr = SpokenDigitsRecognitionDataset(fsdd_bank, tokenizer, 3, 1, 3, (2, 4), seed=0)
    mixture = TaskMixture({"asr": asr, "tts": tts_items})
    assert len(mixture) == 4 and mixture.sizes() == {"asr": 3, "tts": 1}
    assert mixture[3]["task"] == "tts" and mixture[0]["task"] == "asr"
    with pytest.raises(IndexError):
        mixture[4]
    collate = MultiTaskCollator({"asr": RecognitionCollator(), "tts": TextToSpeechCollator(0)}, ["tts"])
    speech = collate([mixture[3]])
    assert speech["task"] == "tts" and "labels" not in speech
    assert speech["spectrogram_labels"].shape == (1, 4, 80) and speech["spectrogram_mask"].sum() == 4
    text = collate([mixture[0], mixture[1]])
    assert text["task"] == "asr" and text["labels"].dtype == torch.long
    with pytest.raises(ValueError, match="one task"):
        collate([mixture[0], mixture[3]])
    with pytest.raises(ValueError, match="empty"):
        TaskMixture({"asr": asr, "tts": []})


def test_recognition_examples_match_whisper_features_on_real_frames(data_dir, tiny_en_dense):
    tokenizer = AutoTokenizer.from_pretrained(tiny_en_dense)
    clip = load_audio(data_dir / "fsdd" / "recordings" / "3_jackson_7.wav", SAMPLING_RATE)
    example = recognition_example(clip, "three", tokenizer)
    reference = WhisperFeatureExtractor(feature_size=80)(clip, sampling_rate=SAMPLING_RATE).input_features[0]
    frames = example["input_features"].shape[1]
    assert frames == len(clip) // 160
    np.testing.assert_allclose(example["input_features"][:, :-1].numpy(), reference[:, : frames - 1], atol=1e-4)
    assert tokenizer.decode(example["labels"], skip_special_tokens=True).strip() == "three"
    assert example["labels"][-1] == tokenizer.eos_token_id
    short = recognition_example(clip[:4000], "three", tokenizer)
    batch = RecognitionCollator()([example, short])
    assert batch["input_features"].shape == (2, 80, frames)
    assert batch["attention_mask"].sum(-1).tolist() == [frames, short["input_features"].shape[1]]
    short_frames = short["input_features"].shape[1]
    assert (batch["input_features"][1, :, short_frames:] == short["input_features"].max() - 2.0).all()
    # padded to Whisper's 30 s window, a clip's features are what the feature extractor gives it
    window = RecognitionCollator(pad_to_frames=3000)([short])
    expected = WhisperFeatureExtractor(feature_size=80)(clip[:4000], sampling_rate=SAMPLING_RATE).input_features[0]
    real = np.r_[
        0 : short_frames - 1, short_frames + 2 : 3000
    ]  # the three frames whose windows straddle its end differ
    np.testing.assert_allclose(window["input_features"][0].numpy()[:, real], expected[:, real], atol=1e-4)
    assert window["attention_mask"].sum() == short_frames
    with pytest.raises(ValueError, match="pad_to_frames"):
        RecognitionCollator(pad_to_frames=10)([short])
    with pytest.raises(ValueError, match="shorter than one"):
        recognition_example(clip[:10], "three", tokenizer)


def test_synthetic_recognition_sequences_skip_held_out_ones(fsdd_bank, tiny_en_dense):
    tokenizer = AutoTokenizer.from_pretrained(tiny_en_dense)
    dataset = SpokenDigitsRecognitionDataset(fsdd_bank, tokenizer, 40, 4, 6, (2, 4), seed=1)
    for index in range(40):
        words = tokenizer.decode(dataset[index]["labels"], skip_special_tokens=True).split()
        digits = "".join(str(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"].index(w))
                         for w in words)  # fmt: skip
        assert 4 <= len(digits) <= 6 and not contains_held_out(digits) and digits_to_words(digits) == " ".join(words)


# ---------------------------------------------------------------------------------------------------------------------
# Training script and pipelines from the saved folder
# ---------------------------------------------------------------------------------------------------------------------

PIPELINES_SCRIPT = """
import sys
import numpy as np
from transformers import pipeline

folder, clip = sys.argv[1], sys.argv[2]
asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
translator = pipeline("translation", model=folder, trust_remote_code=True)
tts = pipeline("text-to-audio", model=folder, trust_remote_code=True)
signer = pipeline("video-to-text", model=folder, trust_remote_code=True)
speech = tts("three one four")
keypoints = np.random.default_rng(0).normal(size=(12, 27, 3))
result = {
    "models": [type(p.model).__name__ for p in (asr, translator, tts, signer)],
    "spelled": signer(keypoints, max_new_tokens=4)["text"],
    "transcript": asr(clip, generate_kwargs={"max_new_tokens": 4})["text"],
    "translation": translator("Good morning.", src_lang="en", tgt_lang="de", max_new_tokens=4)[0]["translation_text"],
    "samples": len(speech["audio"]), "sampling_rate": speech["sampling_rate"],
}
"""


@pytest.fixture
def recipe(data_dir, tmp_path) -> Path:
    """The multi-task recipe on the shared data; the tests give sizes and steps as flags."""
    settings = {
        "base": str(REPO_ROOT / "configuration" / "recipes" / "multitask-digits.json"),
        "train_manifest": str(data_dir / "fsdd" / "manifest.csv"),
        "report_to": "none",
        "save_strategy": "no",
        "text_pairs_csv": str(data_dir / "translation" / "tatoeba_en_de.csv"),
        "remove_unused_columns": False,
    }
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(settings))
    return path


@pytest.fixture
def sign_recipe(recipe, data_dir, tmp_path) -> Path:
    """The multi-task recipe with sign language (video_to_text, fingerspelling) as a fourth task."""
    settings = {**json.loads(recipe.read_text()),
                "base": str(REPO_ROOT / "configuration" / "recipes" / "multitask-digits-sign.json"),
                "sign_words_csv": [str(data_dir / "translation" / "tatoeba_en_de.csv")]}  # fmt: skip
    path = tmp_path / "sign-recipe.json"
    path.write_text(json.dumps(settings))
    return path


def test_training_script_trains_every_task_into_one_loadable_folder(base_moe, data_dir, sign_recipe, tmp_path):
    from processing.train import main

    out = tmp_path / "generalist"
    tiny = ["--d_model", "32", "--ffn_dim", "48", "--encoder_layers", "1", "--decoder_layers", "1",
            "--attention_heads", "2", "--task_steps", "2", "3", "2", "2", "--task_batch_sizes", "2", "2", "2", "2",
            "--asr_synthetic_examples", "4", "--voices", "en-us", "--speeds", "160", "--pitches", "50",
            "--sign_examples", "4", "--logging_steps", "1"]  # fmt: skip
    whisper = str(base_moe.parent / "whisper-base")
    metrics = main([str(sign_recipe), "--output_dir", str(out), "--tokenizer_name_or_path", whisper, *tiny])
    assert metrics["train_wall_seconds"] > 0
    record = json.loads((out / "training_record.json").read_text())
    assert record["tasks"] == {
        "asr": {"steps": 2, "batch_size": 2},
        "translation": {"steps": 3, "batch_size": 2},
        "tts": {"steps": 2, "batch_size": 2},
        "video_to_text": {"steps": 2, "batch_size": 2},
    }
    assert WhisperMoEForSpeechAndText.from_pretrained(out).config.pose_frontend
    assert json.loads((out / "held_out_ids.json").read_text())["tgt_lang"] == "de"
    card = (out / "README.md").read_text()
    assert 'pipeline("translation"' in card and 'pipeline("text-to-audio"' in card
    clip = data_dir / "fsdd" / "recordings" / "0_george_0.wav"
    result = run_without_package(PIPELINES_SCRIPT, out, clip, tmp_path=tmp_path)
    assert result["leaked"] == []
    assert result["models"] == ["WhisperMoEForSpeechAndText"] * 4
    assert all(isinstance(result[key], str) for key in ("transcript", "translation", "spelled"))
    assert result["sampling_rate"] == SAMPLING_RATE and result["samples"] > 0
    # one task alone keeps that task's steps and batch size from the full recipe
    single = main([str(sign_recipe), "--output_dir", str(tmp_path / "asr"), "--tasks", "asr",
                   "--tokenizer_name_or_path", whisper, *tiny])  # fmt: skip
    assert json.loads((tmp_path / "asr" / "training_record.json").read_text())["tasks"] == {
        "asr": {"steps": 2, "batch_size": 2}
    }
    assert single["train_wall_seconds"] > 0
    with pytest.raises(ValueError, match="distinct names"):
        main([str(sign_recipe), "--output_dir", str(tmp_path / "x"), "--tasks", "asr", "speak", *tiny])


def test_task_plan_keeps_each_tasks_steps_when_some_are_picked():
    from processing.arguments import TaskArguments, task_plan

    listed = ["tts", "translation", "asr"]
    full = TaskArguments(tasks=listed, task_steps=[30, 20, 10], task_batch_sizes=[16, 32, 8])
    assert task_plan(full, listed) == (
        {"tts": 30, "translation": 20, "asr": 10},
        {"tts": 16, "translation": 32, "asr": 8},
    )
    picked = TaskArguments(tasks=["asr"], task_steps=[30, 20, 10], task_batch_sizes=[16, 32, 8])
    assert task_plan(picked, listed) == ({"asr": 10}, {"asr": 8})
    with pytest.raises(ValueError, match="for each of"):
        task_plan(TaskArguments(tasks=["asr", "tts"], task_steps=[5], task_batch_sizes=[1]), listed)
    with pytest.raises(ValueError, match="distinct names"):
        task_plan(TaskArguments(tasks=["asr", "asr"], task_steps=[5, 5], task_batch_sizes=[1, 1]), listed)


def test_training_can_start_from_upcycled_whisper_base(base_moe, data_dir, recipe, tmp_path):
    """model_name_or_path: the generalist takes base's encoder, decoder and head; with a negligible learning rate it
    still transcribes real speech as base does, in 30 s windows, and the one folder also speaks."""
    from transformers import pipeline

    from processing.train import main

    out = tmp_path / "generalist-base"
    main([str(recipe), "--output_dir", str(out), "--model_name_or_path", str(base_moe), "--text_encoder_layers", "2",
          "--task_steps", "1", "1", "1", "--task_batch_sizes", "1", "2", "2", "--asr_synthetic_examples", "2",
          "--voices", "en-us", "--speeds", "160", "--pitches", "50", "--learning_rate", "1e-9"])  # fmt: skip
    model = WhisperMoEForSpeechAndText.from_pretrained(out)
    assert model.config.text_encoder_layers == 2 and not model.config.variable_length_audio
    assert model.config.num_experts == 8 and model.config.d_model == 512
    asr = pipeline("automatic-speech-recognition", model=str(out), trust_remote_code=True)
    text = asr(str(data_dir / "misc" / "jfk.flac"), generate_kwargs={"language": "en"})["text"].lower()
    assert "ask not what your country can do for you" in text
    tts = pipeline("text-to-audio", model=str(out), trust_remote_code=True)
    assert len(tts("three one")["audio"]) > 0
