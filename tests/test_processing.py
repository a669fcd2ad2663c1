"""Data side of fine-tuning on real recordings: readers, Whisper features and labels, batching, augmentation."""

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA_DIR
from datasets import Audio, Dataset, IterableDataset

from modeling_whisper_moe import WhisperMoEProcessor, load_audio
from modeling_whisper_moe.modeling_whisper_moe import IGNORE_INDEX
from processing import (
    AugmentConfig,
    SpeechSeq2SeqCollator,
    WaveformAugmenter,
    load_asr_dataset,
    prepare_dataset,
    read_librispeech,
    read_manifest,
)

FSDD_MANIFEST = DATA_DIR / "fsdd" / "manifest.csv"
FSDD_RECORDINGS = DATA_DIR / "fsdd" / "recordings"
LIBRISPEECH = DATA_DIR / "librispeech" / "test-other"
FSDD_ROWS, FSDD_TEST_ROWS, FSDD_SPEAKERS = 2500, 250, 5
RATE = 16_000
MEL_BINS, FRAMES = 80, 3000  # tiny.en's log-mel: 80 bins x 30 s at 100 frames per second
FRAMES_PER_SECOND = 100


@pytest.fixture(scope="module")
def processor(tiny_en_dense: Path) -> WhisperMoEProcessor:
    return WhisperMoEProcessor.from_pretrained(tiny_en_dense)


@pytest.fixture(scope="module")
def special(processor: WhisperMoEProcessor) -> dict[str, int]:
    tokenizer = processor.tokenizer
    names = ("<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>")
    return dict(zip(("sot", "no_timestamps", "eot"), tokenizer.convert_tokens_to_ids(list(names))))


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------


def test_manifest_split_resolves_relative_paths(data_dir: Path) -> None:
    test = read_manifest(FSDD_MANIFEST, split="test")
    assert len(test) == FSDD_TEST_ROWS
    assert set(test["split"]) == {"test"}
    assert {"audio", "text", "speaker", "digit", "duration_s"} <= set(test.column_names)
    assert "path" not in test.column_names
    first = test[0]
    assert first["audio"] == str(FSDD_RECORDINGS.resolve() / "0_george_0.wav")
    assert Path(first["audio"]).is_absolute() and first["text"] == "zero"
    assert len(read_manifest(FSDD_MANIFEST)) == FSDD_ROWS


def test_manifest_speaker_filters(data_dir: Path) -> None:
    without_george = read_manifest(FSDD_MANIFEST, exclude_speakers=["george"])
    assert len(without_george) == FSDD_ROWS * (FSDD_SPEAKERS - 1) // FSDD_SPEAKERS
    assert "george" not in set(without_george["speaker"])
    two = read_manifest(FSDD_MANIFEST, split="test", include_speakers=["lucas", "nicolas"])
    assert len(two) == FSDD_TEST_ROWS * 2 // FSDD_SPEAKERS
    assert set(two["speaker"]) == {"lucas", "nicolas"}
    assert len(read_manifest(FSDD_MANIFEST, include_speakers="jackson")) == FSDD_ROWS // FSDD_SPEAKERS


def test_manifest_errors_name_the_problem(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        read_manifest(tmp_path / "nowhere.csv")
    real = str(FSDD_RECORDINGS / "0_george_0.wav")
    broken = write_manifest(
        tmp_path / "broken.csv", [{"path": real, "text": "zero"}, {"path": "gone.wav", "text": "x"}]
    )
    with pytest.raises(FileNotFoundError, match=r"line 3: .*gone\.wav"):
        read_manifest(broken)
    no_split = write_manifest(tmp_path / "no_split.csv", [{"path": real, "text": "zero"}])
    with pytest.raises(ValueError, match="'split' column"):
        read_manifest(no_split, split="train")
    with pytest.raises(ValueError, match="'speaker' column"):
        read_manifest(no_split, exclude_speakers=["george"])
    with pytest.raises(ValueError, match="valid"):
        read_manifest(FSDD_MANIFEST, split="valid")
    with pytest.raises(ValueError, match="bob"):
        read_manifest(FSDD_MANIFEST, include_speakers=["george", "bob"])
    no_text = write_manifest(tmp_path / "no_text.csv", [{"path": real, "sentence": "zero"}])
    with pytest.raises(ValueError, match=r"\['text'\]"):
        read_manifest(no_text)
    assert read_manifest(no_text, needs_text=False)["audio"] == [real]  # audio to transcribe needs no text
    no_path = write_manifest(tmp_path / "no_path.csv", [{"file": real}])
    with pytest.raises(ValueError, match=r"\['path'\]"):
        read_manifest(no_path, needs_text=False)


def test_librispeech_reader_matches_manifest(data_dir: Path) -> None:
    folder = read_librispeech(LIBRISPEECH)
    manifest = read_manifest(LIBRISPEECH / "manifest.csv")
    assert len(folder) == len(manifest) == 50
    assert dict(zip(folder["audio"], folder["text"])) == dict(zip(manifest["audio"], manifest["text"]))
    assert set(folder["speaker"]) == set(manifest["speaker"])
    assert folder[0]["id"] == Path(folder[0]["audio"]).stem
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        read_librispeech(LIBRISPEECH / "missing-folder")


@pytest.fixture(scope="module")
def audiofolder(tmp_path_factory) -> Path:
    """Four FSDD recordings (8 kHz wav) in the `datasets` audiofolder layout, with a `transcription` column."""
    if not FSDD_RECORDINGS.is_dir():
        pytest.fail(f"FSDD recordings not found at {FSDD_RECORDINGS}; set WHISPER_MOE_DATA")
    folder = tmp_path_factory.mktemp("audiofolder")
    rows = []
    for name, text in (
        ("0_george_0", "zero"),
        ("1_jackson_1", "one"),
        ("7_lucas_2", "seven"),
        ("9_yweweler_3", "nine"),
    ):
        shutil.copy(FSDD_RECORDINGS / f"{name}.wav", folder / f"{name}.wav")
        rows.append({"file_name": f"{name}.wav", "transcription": text, "speaker": name.split("_")[1]})
    write_manifest(folder / "metadata.csv", rows)
    return folder


def test_audiofolder_streaming_yields_decodable_audio(audiofolder: Path) -> None:
    stream = load_asr_dataset("audiofolder", data_dir=audiofolder, streaming=True, text_column="transcription")
    assert isinstance(stream, IterableDataset)
    examples = list(stream)
    assert [example["text"] for example in examples] == ["zero", "one", "seven", "nine"]
    for example in examples:
        audio = load_audio(example["audio"], RATE)
        original = load_audio(audiofolder / Path(example["audio"]).name, RATE)
        assert audio.dtype == np.float32 and audio.shape == original.shape and audio.size > RATE // 4
    eager = load_asr_dataset("audiofolder", data_dir=audiofolder, text_column="transcription")
    assert isinstance(eager, Dataset) and eager["text"] == ["zero", "one", "seven", "nine"]
    assert {"audio", "text", "speaker"} <= set(eager.column_names)
    with pytest.raises(ValueError, match="sentence"):
        load_asr_dataset("audiofolder", data_dir=audiofolder, streaming=True, text_column="sentence")


@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_audio_bytes_stay_undecoded(data_dir: Path, tmp_path: Path, processor, streaming: bool) -> None:
    """Hub datasets store audio as an `Audio` feature of {bytes, path}: it must reach load_audio undecoded."""
    wav = FSDD_RECORDINGS / "8_george_5.wav"
    table = Dataset.from_dict({"audio": [{"bytes": wav.read_bytes(), "path": wav.name}], "sentence": ["eight"]})
    table.cast_column("audio", Audio()).to_parquet(tmp_path / "train.parquet")
    dataset = load_asr_dataset("parquet", data_dir=tmp_path, streaming=streaming, text_column="sentence")
    example = next(iter(dataset))
    assert example["text"] == "eight" and example["audio"]["bytes"] == wav.read_bytes()
    np.testing.assert_array_equal(load_audio(example["audio"], RATE), load_audio(wav, RATE))
    prepared = next(iter(prepare_dataset(dataset, processor)))  # a streamed map must not encode audio either
    assert prepared["input_features"].shape == (MEL_BINS, FRAMES) and prepared["audio"]["path"] == wav.name


# ---------------------------------------------------------------------------------------------------------------
# Features, labels and batches
# ---------------------------------------------------------------------------------------------------------------


def test_prepare_dataset_features_and_labels(data_dir: Path, processor, special) -> None:
    subset = read_manifest(FSDD_MANIFEST, split="test").select(range(0, FSDD_TEST_ROWS, 50))  # one per speaker
    prepared = prepare_dataset(subset, processor)
    assert len(prepared) == len(subset)
    for example, duration in zip(prepared, subset["duration_s"]):
        assert example["input_features"].shape == (MEL_BINS, FRAMES)
        assert example["input_features"].dtype == np.float32
        labels = example["labels"]
        assert labels[:2] == [special["sot"], special["no_timestamps"]] and labels[-1] == special["eot"]
        assert processor.tokenizer.decode(labels[2:-1]) == " " + example["text"]
        assert example["input_length"] == pytest.approx(duration, abs=1e-3)
        assert example["attention_mask"].sum() == math.ceil(duration * FRAMES_PER_SECOND - 1e-6)


def test_collated_batch_pads_labels_with_ignore_index(data_dir: Path, tmp_path: Path, processor, special) -> None:
    texts = ["zero", "one two three four five six", "seven"]
    rows = [
        {"path": str(FSDD_RECORDINGS / f"{digit}_nicolas_0.wav"), "text": text} for digit, text in zip("017", texts)
    ]
    prepared = prepare_dataset(read_manifest(write_manifest(tmp_path / "m.csv", rows)), processor)
    batch = SpeechSeq2SeqCollator(processor, decoder_start_token_id=special["sot"])(list(prepared))
    assert set(batch) == {"input_features", "labels", "attention_mask"}
    assert batch["input_features"].shape == (3, MEL_BINS, FRAMES) and batch["input_features"].dtype == torch.float32
    assert batch["attention_mask"].shape == (3, FRAMES)
    labels = batch["labels"]
    lengths = [len(example["labels"]) - 1 for example in prepared]  # without <|startoftranscript|>
    assert labels.dtype == torch.long and labels.shape == (3, max(lengths))
    assert (labels[:, 0] == special["no_timestamps"]).all()
    for row, length in zip(labels, lengths):
        assert row[length - 1] == special["eot"]  # the real end token survives; pad id is the same token
        assert (row[length:] == IGNORE_INDEX).all() and (row[:length] != IGNORE_INDEX).all()
    assert (labels == IGNORE_INDEX).any()


def test_prepare_dataset_drops_long_labels_and_audio(data_dir: Path, tmp_path: Path, processor) -> None:
    rows = [
        {"path": str(FSDD_RECORDINGS / "3_jackson_0.wav"), "text": "three"},
        {"path": str(FSDD_RECORDINGS / "4_jackson_0.wav"), "text": "four five six seven eight nine"},
    ]
    dataset = read_manifest(write_manifest(tmp_path / "m.csv", rows))
    short = prepare_dataset(dataset, processor, max_label_length=5)
    assert short["text"] == ["three"]
    subset = read_manifest(FSDD_MANIFEST, split="test", include_speakers=["george"]).select(range(10))
    limit = 0.5
    kept = prepare_dataset(subset, processor, max_audio_seconds=limit)
    expected = [path for path, seconds in zip(subset["audio"], subset["duration_s"]) if seconds <= limit]
    assert 0 < len(expected) < len(subset) and kept["audio"] == expected
    with pytest.raises(ValueError, match="dropped all"):
        prepare_dataset(dataset, processor, max_label_length=2)
    with pytest.raises(ValueError, match="max_audio_seconds"):
        prepare_dataset(dataset, processor, max_audio_seconds=45.0)


def test_prepare_streaming_is_lazy_and_filters(audiofolder: Path, processor, special) -> None:
    stream = load_asr_dataset("audiofolder", data_dir=audiofolder, streaming=True, text_column="transcription")
    prepared = prepare_dataset(stream, processor, augment=WaveformAugmenter(seed=0))
    assert isinstance(prepared, IterableDataset)
    examples = list(prepared)
    assert [example["text"] for example in examples] == ["zero", "one", "seven", "nine"]
    assert all(example["input_features"].shape == (MEL_BINS, FRAMES) for example in examples)
    assert all(example["labels"][0] == special["sot"] for example in examples)
    assert list(prepare_dataset(stream, processor, max_label_length=3)) == []  # every label has 4 tokens


# ---------------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def waveform() -> np.ndarray:
    return load_audio(FSDD_RECORDINGS / "5_lucas_10.wav", RATE)


def test_augmentation_is_seeded(waveform: np.ndarray) -> None:
    first, again, other = WaveformAugmenter(seed=3), WaveformAugmenter(seed=3), WaveformAugmenter(seed=4)
    outputs = [first(waveform) for _ in range(6)]
    for out in outputs:
        assert out.dtype == np.float32 and out.ndim == 1 and np.isfinite(out).all()
        np.testing.assert_array_equal(out, again(waveform))
    assert any(out.shape != other(waveform).shape or not np.array_equal(out, other(waveform)) for out in outputs)
    assert not all(np.array_equal(out, outputs[0]) for out in outputs[1:])  # the generator advances


def test_each_augmentation(waveform: np.ndarray) -> None:
    only = dict(speed_prob=0.0, gain_prob=0.0, noise_prob=0.0)
    speed = WaveformAugmenter(AugmentConfig(**{**only, "speed_prob": 1.0}), seed=0)
    for _ in range(4):
        out = speed(waveform)
        assert len(waveform) / 1.1 - 1 <= len(out) <= len(waveform) / 0.9 + 1
    gain = WaveformAugmenter(AugmentConfig(**{**only, "gain_prob": 1.0, "gain_db_min": 6.0, "gain_db_max": 6.0}))
    np.testing.assert_allclose(gain(waveform), waveform * 10 ** (6 / 20), rtol=1e-6)
    noisy = WaveformAugmenter(AugmentConfig(**{**only, "noise_prob": 1.0, "snr_db_min": 10.0, "snr_db_max": 10.0}))
    noise = noisy(waveform) - waveform
    snr_db = 10 * np.log10(np.mean(waveform.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2))
    assert snr_db == pytest.approx(10.0, abs=0.5)
    silence = np.zeros(RATE, dtype=np.float32)
    everything = AugmentConfig(speed_prob=1.0, gain_prob=1.0, noise_prob=1.0)
    quiet = WaveformAugmenter(everything)(silence)
    assert quiet.dtype == np.float32 and np.isfinite(quiet).all() and not quiet.any()
    with pytest.raises(ValueError, match="speed_min"):
        AugmentConfig(speed_min=1.2, speed_max=1.1)
    with pytest.raises(ValueError, match="noise_prob"):
        AugmentConfig(noise_prob=1.5)
