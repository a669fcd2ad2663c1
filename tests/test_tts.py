"""Text-to-speech: Whisper log-mel and the Griffin-Lim vocoder on real audio, the parallel model on a tiny random
config, the digit corpus built from FSDD recordings, and the pipeline from a saved folder without the package."""

import random

import numpy as np
import pytest
import soundfile
import torch
from conftest import TINY, run_without_package
from transformers import AutoTokenizer, WhisperFeatureExtractor

from modeling_whisper_moe import WhisperMoEConfig, load_audio
from modeling_whisper_moe.modeling_whisper_moe_tts import MAX_FRAMES_PER_TOKEN, WhisperMoEForTextToSpeech
from modeling_whisper_moe.pipeline_text_to_audio import normalize_tts_text, write_audio
from modeling_whisper_moe.vocoder import HOP_LENGTH, SAMPLING_RATE, log_mel_spectrogram, mel_to_waveform
from processing.metrics import digit_wer, to_digits
from processing.tts_data import (
    AlignedRecordingsDataset,
    SpokenDigitsDataset,
    TextToSpeechCollator,
    aligned_word_frames,
    contains_held_out,
    held_out_sequences,
    is_held_out,
    training_sequence,
)

REDUCTION = 2
TTS_TINY = dict(TINY, num_mel_bins=8, num_experts=4, num_experts_per_tok=2, text_frontend=True, max_text_positions=32)


def tiny_tts(seed: int = 0, **overrides) -> WhisperMoEForTextToSpeech:
    torch.manual_seed(seed)
    config = WhisperMoEConfig(**{**TTS_TINY, "tts_reduction_factor": REDUCTION, **overrides})
    return WhisperMoEForTextToSpeech(config).eval()


@pytest.fixture(scope="module")
def speech_clip(data_dir) -> np.ndarray:
    """Three seconds of a real LJSpeech recording at 16 kHz."""
    path = sorted((data_dir / "ljspeech" / "wavs").glob("*.wav"))[0]
    return load_audio(path, SAMPLING_RATE)[: 3 * SAMPLING_RATE]


# ---------------------------------------------------------------------------------------------------------------------
# Log-mel and vocoder
# ---------------------------------------------------------------------------------------------------------------------


def test_log_mel_matches_whisper_feature_extractor(speech_clip):
    ours = log_mel_spectrogram(torch.from_numpy(speech_clip))
    reference = WhisperFeatureExtractor(feature_size=80)(speech_clip, sampling_rate=SAMPLING_RATE).input_features[0]
    assert ours.shape == (len(speech_clip) // HOP_LENGTH, 80)
    # the last frame's window reaches past the clip: reflect padding here, the extractor's 30 s zero padding there
    np.testing.assert_allclose(ours[:-1].numpy(), reference[:, : ours.shape[0] - 1].T, atol=1e-4)


def test_griffin_lim_round_trip_keeps_the_spectrogram(speech_clip):
    mel = log_mel_spectrogram(torch.from_numpy(speech_clip))
    waveform = mel_to_waveform(mel)
    assert waveform.dtype == torch.float32 and waveform.shape == (mel.shape[0] * HOP_LENGTH,)
    # Griffin-Lim output is peak-normalised, so compare levels relative to each spectrogram's loudest bin
    relative, round_trip = mel - mel.max(), log_mel_spectrogram(waveform)
    error = (round_trip - round_trip.max() - relative).abs().mean().item()
    # the same frames in reverse order have the clip's spectral statistics but not its content
    unrelated = (relative.flip(0) - relative).abs().mean().item()
    assert error < 0.05 and error < unrelated / 5, (error, unrelated)


def test_mel_to_waveform_uses_a_passed_vocoder():
    seen = []

    def vocoder(mel: torch.Tensor) -> torch.Tensor:
        seen.append(mel.shape)
        return torch.ones(mel.shape[0], mel.shape[1] * 10)

    audio = mel_to_waveform(torch.zeros(7, 80), vocoder)
    assert seen == [(1, 7, 80)] and audio.shape == (70,)
    with pytest.raises(TypeError, match="callable"):
        mel_to_waveform(torch.zeros(7, 80), vocoder="hifigan")
    with pytest.raises(ValueError, match="log_mel"):
        mel_to_waveform(torch.zeros(80))


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


def _batch(speakers: int = 0) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    attention_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    durations = torch.tensor([[2, 4, 6], [4, 2, 0]])  # 12 and 6 frames
    labels = torch.randn(2, 12, TTS_TINY["num_mel_bins"], generator=torch.Generator().manual_seed(0))
    labels_mask = (torch.arange(12)[None] < torch.tensor([[12], [6]])).long()
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, durations=durations, labels=labels,
                 labels_mask=labels_mask)  # fmt: skip
    if speakers:
        batch["speaker_embeddings"] = torch.eye(speakers)[:2]
    return batch


def test_forward_shapes_and_losses():
    model = tiny_tts(tts_speaker_embedding_dim=3, tts_postnet_layers=2).train()
    output = model(**_batch(speakers=3))
    assert output.spectrogram.shape == (2, 12, TTS_TINY["num_mel_bins"])
    assert output.frames_mask.sum(-1).tolist() == [12, 6] and output.log_durations.shape == (2, 3)
    parts = output.mel_loss + output.duration_loss + output.aux_loss
    torch.testing.assert_close(output.loss, parts)
    assert output.encoder_aux_loss is not None and output.decoder_z_loss is not None
    output.loss.backward()
    assert model.encoder.embed_text_tokens.weight.grad is not None and model.speech.mel_head.weight.grad is not None


def test_padding_changes_nothing():
    model = tiny_tts(tts_speaker_embedding_dim=3, tts_postnet_layers=2)
    batch = _batch(speakers=3)
    together = model(**batch)
    alone = model(input_ids=batch["input_ids"][1:, :2], durations=batch["durations"][1:, :2],
                  speaker_embeddings=batch["speaker_embeddings"][1:])  # fmt: skip
    torch.testing.assert_close(alone.spectrogram[0], together.spectrogram[1, :6])
    # labels on padding frames and ids on padding tokens do not reach the loss
    noisy = dict(batch, labels=batch["labels"].clone(), input_ids=batch["input_ids"].clone())
    noisy["labels"][1, 6:] = 100.0
    noisy["input_ids"][1, 2] = 42
    torch.testing.assert_close(model(**noisy).loss, together.loss)


def test_generation_stops_with_finite_mel_of_predicted_length():
    model = tiny_tts()
    input_ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    mels = model.generate_speech(input_ids, attention_mask)
    log_durations = model(input_ids, attention_mask).log_durations
    expected = model.durations_from_log(log_durations, attention_mask).sum(-1).tolist()
    assert [mel.shape[0] for mel in mels] == expected
    for mel, tokens in zip(mels, (4, 2)):
        assert torch.isfinite(mel).all() and mel.shape[1] == TTS_TINY["num_mel_bins"]
        assert tokens * REDUCTION <= mel.shape[0] <= tokens * MAX_FRAMES_PER_TOKEN and mel.shape[0] % REDUCTION == 0
    faster = model.generate_speech(input_ids, attention_mask, speed=3.0)
    assert all(fast.shape[0] <= slow.shape[0] for fast, slow in zip(faster, mels))


def test_configuration_errors_name_the_problem():
    with pytest.raises(ValueError, match="tts_reduction_factor"):
        WhisperMoEConfig(**TTS_TINY, tts_reduction_factor=0)
    with pytest.raises(ValueError, match="tts_speaker_embedding_dim"):
        WhisperMoEConfig(**TTS_TINY, tts_speaker_embedding_dim=-1)
    with pytest.raises(ValueError, match="text_frontend"):
        WhisperMoEForTextToSpeech(WhisperMoEConfig(**{**TTS_TINY, "text_frontend": False}))
    model = tiny_tts(tts_speaker_embedding_dim=3)
    with pytest.raises(ValueError, match="speaker_embeddings"):
        model(**dict(_batch(), speaker_embeddings=torch.zeros(2, 5)))
    with pytest.raises(ValueError, match="multiples of tts_reduction_factor"):
        model(**dict(_batch(), durations=torch.tensor([[3, 4, 6], [4, 2, 0]])))
    with pytest.raises(ValueError, match="labels cover"):
        model(**dict(_batch(), labels=torch.zeros(2, 10, TTS_TINY["num_mel_bins"])))


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def test_held_out_sequences_never_occur_in_training():
    evaluated = held_out_sequences(50, seed=0)
    assert len(set(evaluated)) == 50 and all(is_held_out(s) and len(s) == 4 for s in evaluated)
    assert held_out_sequences(50, seed=0) == evaluated
    rng = random.Random(0)
    for _ in range(500):
        sequence = training_sequence(rng, 1, 8)
        assert not contains_held_out(sequence)
        assert not any(held in sequence for held in evaluated)


def test_dataset_durations_count_every_frame(fsdd_bank, tiny_en_dense):
    tokenizer = AutoTokenizer.from_pretrained(tiny_en_dense)
    dataset = SpokenDigitsDataset(fsdd_bank, tokenizer, num_examples=8, min_digits=2, max_digits=4,
                                  pause_frames=(2, 6), frames_multiple=3)  # fmt: skip
    items = [dataset[i] for i in range(8)]
    for item in items:
        assert item["durations"].sum() == item["labels"].shape[0]
        assert (item["durations"] % 3 == 0).all() and (item["durations"] > 0).all()
        assert item["labels"].shape[1] == 80 and item["speaker_embeddings"].sum() == 1
    assert torch.equal(dataset[3]["labels"], items[3]["labels"])  # deterministic per index
    # the ids are what the pipeline's tokenisation of the same words gives
    words = tokenizer.decode(items[0]["input_ids"]).strip()
    piped = tokenizer(" " + normalize_tts_text(words), add_special_tokens=False).input_ids
    assert piped == items[0]["input_ids"].tolist()
    batch = TextToSpeechCollator(tokenizer.pad_token_id, speaker_dropout=0.0)(items)
    assert batch["labels"].shape[:2] == batch["labels_mask"].shape
    assert batch["labels_mask"].sum().item() == sum(item["labels"].shape[0] for item in items)


def test_word_timings_become_frames_on_the_decoder_grid():
    # words start at 0, 0.31 and 0.62 s of a 100-frame clip; grid of 3 frames
    assert aligned_word_frames([0.0, 0.31, 0.62], 100, [1, 1, 1], 3) == [30, 33, 36]
    assert aligned_word_frames([0.0, 0.01, 0.62], 100, [1, 1, 1], 3) is None  # second word would get no frames
    assert aligned_word_frames([0.0, 0.05], 100, [3, 1], 3) is None  # 6 frames cannot hold 3 tokens of 3


def test_aligned_recordings_give_exact_durations(data_dir, tiny_en_dense):
    tokenizer = AutoTokenizer.from_pretrained(tiny_en_dense)
    path = data_dir / "ljspeech" / "wavs" / "LJ001-0002.wav"  # "in being comparatively modern."
    alignment = {
        "path": str(path),
        "words": ["in", "being", "comparatively", "modern."],
        "starts": [0, 0.24, 0.56, 1.24],
    }
    dataset = AlignedRecordingsDataset([alignment], speaker=1, num_speakers=2, tokenizer=tokenizer, frames_multiple=3)
    item = dataset[0]
    assert tokenizer.decode(item["input_ids"]) == " in being comparatively modern."
    assert item["durations"].sum() == item["labels"].shape[0] and (item["durations"] % 3 == 0).all()
    assert item["speaker_embeddings"].tolist() == [0.0, 1.0]


def test_text_normalisation_and_digit_scoring():
    assert normalize_tts_text("Call 911,  NOW") == "call nine one one , now"
    assert to_digits("Three, 1 4... one!") == "3 1 4 1"
    assert to_digits("3141.") == "3 1 4 1" and to_digits("someone") == ""
    assert digit_wer(["3 1 4 1"], ["3 1 4 1"]) == 0.0
    assert digit_wer(["3 1 4 1", "2 7"], ["3 1 4", ""]) == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match="non-empty"):
        normalize_tts_text("  ")


def test_write_audio_is_readable_and_rejects_unknown_formats(tmp_path):
    audio = np.sin(np.linspace(0, 100, SAMPLING_RATE)).astype(np.float32) * 0.5
    for suffix in (".wav", ".flac"):
        path = write_audio(tmp_path / f"tone{suffix}", audio)
        read, rate = soundfile.read(path, dtype="float32")
        assert rate == SAMPLING_RATE and np.abs(read - audio).max() < 1e-3
    with pytest.raises(ValueError, match="mp3"):
        write_audio(tmp_path / "tone.mp3", audio)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tone.flac", "tone.wav"]  # no temporary left behind


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline from a saved folder
# ---------------------------------------------------------------------------------------------------------------------

PIPELINE_SCRIPT = """
import sys, soundfile
from transformers import AutoModel, AutoModelForTextToSpectrogram, pipeline

folder, out = sys.argv[1], sys.argv[2]
tts = pipeline("text-to-audio", model=folder, trust_remote_code=True)
speech = tts("3 1 4", output_path=out)
voiced = tts("three one", speaker_embeddings=[0.0, 1.0, 0.0])
written, rate = soundfile.read(out, dtype="float32")
result = {
    "dtype": str(speech["audio"].dtype), "ndim": speech["audio"].ndim, "samples": len(speech["audio"]),
    "sampling_rate": speech["sampling_rate"], "finite": bool(abs(speech["audio"]).max() < float("inf")),
    "voiced_samples": len(voiced["audio"]), "written_samples": len(written), "written_rate": rate,
    "model": type(tts.model).__name__, "pipeline": type(tts).__name__,
    "auto_model": type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__,
    "auto_tts": type(AutoModelForTextToSpectrogram.from_pretrained(folder, trust_remote_code=True)).__name__,
}
"""


def test_pipeline_from_saved_folder_without_the_package(tiny_en_dense, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_en_dense)
    model = tiny_tts(vocab_size=len(tokenizer), num_mel_bins=80, tts_speaker_embedding_dim=3)
    folder = tmp_path / "tts"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = run_without_package(PIPELINE_SCRIPT, folder, tmp_path / "speech.wav", tmp_path=tmp_path)
    assert result["leaked"] == []
    assert result["model"] == result["auto_model"] == result["auto_tts"] == "WhisperMoEForTextToSpeech"
    assert result["pipeline"] == "WhisperMoETextToAudioPipeline"
    assert result["dtype"] == "float32" and result["ndim"] == 1 and result["finite"]
    assert result["sampling_rate"] == result["written_rate"] == SAMPLING_RATE
    # "3 1 4" is three tokens, each at least one decoder step of REDUCTION frames of HOP_LENGTH samples
    assert result["samples"] >= 3 * REDUCTION * HOP_LENGTH and result["samples"] % (REDUCTION * HOP_LENGTH) == 0
    assert result["written_samples"] == result["samples"] and result["voiced_samples"] > 0


def test_folder_with_old_speech_key_names_loads_the_same(tmp_path):
    """Folders saved before the speech parts moved under `speech.` load with every weight in place."""
    from safetensors.torch import load_file, save_file

    model = tiny_tts(tts_speaker_embedding_dim=3, tts_postnet_layers=2).eval()
    model.save_pretrained(tmp_path)
    weights_file = tmp_path / "model.safetensors"
    new_keys = load_file(weights_file)
    assert any(key.startswith("speech.mel_head.") for key in new_keys)
    old_keys = {key.removeprefix("speech."): value for key, value in new_keys.items()}
    save_file(old_keys, weights_file, metadata={"format": "pt"})
    loaded, info = WhisperMoEForTextToSpeech.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    input_ids = torch.tensor([[3, 4, 5]])
    expected = model.generate_speech(input_ids)[0]
    torch.testing.assert_close(loaded.generate_speech(input_ids)[0], expected)
    # the folder's own code maps the old names too, where this package cannot be imported
    remote = run_without_package(OLD_KEYS_SCRIPT, tmp_path, tmp_path=tmp_path)
    assert remote["leaked"] == [] and remote["missing"] == [] and remote["unexpected"] == []
    torch.testing.assert_close(torch.tensor(remote["mel"]), expected, rtol=1e-4, atol=1e-5)


OLD_KEYS_SCRIPT = """
import torch
from transformers import AutoModelForTextToSpectrogram

model, info = AutoModelForTextToSpectrogram.from_pretrained(sys.argv[1], trust_remote_code=True,
                                                            output_loading_info=True)
result = {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
          "mel": model.eval().generate_speech(torch.tensor([[3, 4, 5]]))[0].tolist()}
"""
