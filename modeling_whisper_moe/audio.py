"""Audio loading, saving and band-limited resampling for Whisper-MoE.

Everything Whisper needs is float32 mono audio at 16 kHz. `load_audio` turns files (any container soundfile or
FFmpeg/PyAV can read), encoded bytes, arrays and the dict conventions of `datasets` / transformers pipelines into
exactly that; `resample` is a Kaiser-windowed-sinc polyphase resampler written in torch (no scipy/librosa/torchaudio).
`save_audio` writes .wav / .flac (e.g. text-to-speech output) atomically.

soundfile and av are optional at import time (this file ships with trust_remote_code) and imported when decoding.
"""

from __future__ import annotations

import importlib
import io
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .features import SAMPLING_RATE
from .hub import atomic_write

# Resampling filter: a Kaiser-windowed sinc low-pass. With these values the pass band is flat to ~0.84x the lower
# Nyquist frequency (6.7 kHz when going to 16 kHz), -6 dB at 0.92x, and the stop band (~90 dB down) starts at the
# lower Nyquist frequency itself, so nothing aliases.
RESAMPLE_ZERO_CROSSINGS = 32  # sinc zero crossings kept on each side of the centre tap
RESAMPLE_KAISER_BETA = 9.0  # Kaiser window shape; ~90 dB stop-band attenuation
RESAMPLE_ROLLOFF = 0.92  # cut-off frequency as a fraction of the lower of the two Nyquist frequencies
# A rate pair whose gcd-reduced ratio needs a bigger polyphase filter bank than this (e.g. 44_101 -> 16_000)
# is resampled by computing the filter taps per output sample instead, in chunks of this many output samples.
MAX_POLYPHASE_WEIGHTS = 1 << 21
DIRECT_CHUNK_SAMPLES = 1 << 14

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray | torch.Tensor | Mapping[str, Any]

# Formats `save_audio` writes, by file suffix: (libsndfile format, sample encoding). 16-bit PCM plays everywhere and
# FLAC stores no float samples.
SAVE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16")}

__all__ = ["SAMPLING_RATE", "SAVE_FORMATS", "AudioDecodeError", "AudioSource", "load_audio", "resample", "save_audio"]


class AudioDecodeError(ValueError):
    """Raised when neither soundfile nor PyAV can decode an audio source (corrupt data, no audio stream...)."""


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def load_audio(source: AudioSource, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Load `source` as float32 mono audio at `sampling_rate` Hz.

    Args:
        source: one of
            - a path (`str` / `os.PathLike`) to any file soundfile (wav, flac, ogg, mp3...) or PyAV (m4a/aac, mp3,
              mp4/mov/mkv video: the first audio stream) can decode;
            - the raw bytes of such a file;
            - a numpy array or torch tensor, assumed to be at `sampling_rate` already, shaped `(time,)` or
              `(time, channels)` / `(channels, time)` (the shorter axis is taken as channels);
            - a dict `{"array" or "raw": samples, "sampling_rate": int}` (datasets / pipeline convention, resampled
              from that rate) or `{"path": ..., "bytes": ...}` (a `datasets.Audio` column without decoding);
            - a torchcodec `AudioDecoder` (what `datasets>=4` yields for decoded audio columns).
        sampling_rate: target rate in Hz.

    Returns:
        `np.ndarray` of shape `(time,)`, dtype float32: channels are averaged, integer PCM is scaled to [-1, 1] and
        any source rate is resampled to `sampling_rate`.

    Raises:
        FileNotFoundError: a path that does not exist.
        AudioDecodeError (a ValueError): undecodable data or a file without an audio stream.
        ValueError: empty audio, NaN/inf samples or a non-positive sampling rate.
    """
    _check_rate(sampling_rate, "sampling_rate")
    samples, source_rate, name, channel_axis = _read_source(source, sampling_rate)
    _check_rate(source_rate, f"sampling rate of {name}")
    mono = _to_mono_float32(samples, name, channel_axis)
    return resample(mono, source_rate, sampling_rate)


def save_audio(
    path: str | os.PathLike, waveform: np.ndarray | torch.Tensor, sampling_rate: int = SAMPLING_RATE
) -> Path:
    """Write `waveform` to `path` as 16-bit PCM, in the format its suffix names (see `SAVE_FORMATS`).

    The file is written to a temporary sibling and renamed into place, so `path` never holds half a file.

    Args:
        path: destination ending in `.wav` or `.flac`; missing parent folders are created.
        waveform: float samples in [-1, 1] shaped `(time,)`, or `(time, channels)` / `(channels, time)` (the shorter
            axis is taken as channels). Samples beyond +-1 are clipped: 16-bit PCM has no headroom.
        sampling_rate: rate of `waveform` in Hz.

    Returns:
        The path written.

    Raises:
        ValueError: an unsupported suffix, empty audio, NaN/inf or non-numeric samples, a bad shape or sampling rate.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() not in SAVE_FORMATS:
        raise ValueError(f"Cannot write {path}: unsupported suffix {path.suffix!r}; use one of {sorted(SAVE_FORMATS)}")
    _check_rate(sampling_rate, "sampling_rate")
    samples = _to_frames_by_channels(waveform, str(path))
    file_format, subtype = SAVE_FORMATS[path.suffix.lower()]
    soundfile = _import_optional("soundfile", "soundfile")
    with atomic_write(path) as temporary:
        soundfile.write(temporary, samples, sampling_rate, format=file_format, subtype=subtype)
    return path


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling of `audio` from `orig_sr` to `target_sr` Hz along the last axis.

    The rate ratio is reduced by its gcd to `up / down` (44.1 kHz -> 16 kHz is 160 / 441) and the signal is filtered
    with a Kaiser-windowed sinc low-pass whose cut-off sits below the lower of the two Nyquist frequencies (an
    anti-aliasing filter when downsampling, an anti-imaging one when upsampling). The `up` polyphase branches of that
    filter are applied as one strided `torch.nn.functional.conv1d`; rate pairs with a huge reduced ratio (e.g.
    44_101 -> 16_000) gather per-output taps instead.

    Args:
        audio: array of shape `(..., time)`.
        orig_sr: rate of `audio` in Hz.
        target_sr: wanted rate in Hz.

    Returns:
        float32 array of shape `(..., ceil(time * target_sr / orig_sr))`.
    """
    _check_rate(orig_sr, "orig_sr")
    _check_rate(target_sr, "target_sr")
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr or audio.shape[-1] == 0:
        return np.ascontiguousarray(audio)
    gcd = math.gcd(int(orig_sr), int(target_sr))
    up, down = int(target_sr) // gcd, int(orig_sr) // gcd
    signal = torch.from_numpy(np.ascontiguousarray(audio.reshape(-1, audio.shape[-1])))
    if up * (down + 2 * _half_width_taps(up, down)) <= MAX_POLYPHASE_WEIGHTS:
        out = _resample_polyphase(signal, up, down)
    else:
        out = _resample_direct(signal, up, down)
    return out.numpy().reshape(*audio.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------------------------
# Resampling internals
# ---------------------------------------------------------------------------------------------------------------


def _cutoff(up: int, down: int) -> float:
    """Low-pass cut-off as a fraction of the input Nyquist frequency."""
    return RESAMPLE_ROLLOFF * min(1.0, up / down)


def _half_width_taps(up: int, down: int) -> int:
    """Number of input samples the filter reaches on each side of an output sample's position."""
    return math.ceil(RESAMPLE_ZERO_CROSSINGS / _cutoff(up, down))


def _windowed_sinc(offsets: torch.Tensor, up: int, down: int) -> torch.Tensor:
    """Filter taps at `offsets` (input samples from the output position; any shape, float64), unit DC gain."""
    cutoff = _cutoff(up, down)
    half_width = RESAMPLE_ZERO_CROSSINGS / cutoff
    inside = offsets.abs() <= half_width
    ratio = (offsets / half_width).clamp(-1.0, 1.0)
    beta = torch.tensor(RESAMPLE_KAISER_BETA, dtype=torch.float64)
    window = torch.special.i0(beta * torch.sqrt(1.0 - ratio**2)) / torch.special.i0(beta)
    return torch.where(inside, cutoff * torch.sinc(cutoff * offsets) * window, torch.zeros_like(offsets))


def _resample_polyphase(signal: torch.Tensor, up: int, down: int) -> torch.Tensor:
    """Resample `signal` `(batch, time)` by `up / down` with one strided conv; returns `(batch, n_out)` float32.

    Output sample `j = m * up + p` sits at input position `m * down + p * down / up`, so branch `p` is a fixed
    filter slid over the input with stride `down`: a conv1d with `up` output channels, interleaved afterwards.
    """
    batch, length = signal.shape
    pad = _half_width_taps(up, down)
    kernel_size = down + 2 * pad
    taps = torch.arange(kernel_size, dtype=torch.float64) - pad
    phases = torch.arange(up, dtype=torch.float64) * down / up
    # conv1d is a correlation: weight[p, 0, i] multiplies input sample m * down + i - pad.
    weight = _windowed_sinc(taps[None, :] - phases[:, None], up, down).to(torch.float32)[:, None, :]
    n_out = -(-length * up // down)
    n_frames = -(-n_out // up)
    right = max(0, (n_frames - 1) * down + kernel_size - length - pad)
    padded = torch.nn.functional.pad(signal[:, None, :], (pad, right))
    frames = torch.nn.functional.conv1d(padded, weight, stride=down)  # (batch, up, n_frames)
    return frames.transpose(1, 2).reshape(batch, -1)[:, :n_out]


def _resample_direct(signal: torch.Tensor, up: int, down: int) -> torch.Tensor:
    """Same result as `_resample_polyphase` without the zero taps the strided conv needs (for huge `up`).

    Output `j` sits at input position `j * down / up`; its fractional part depends on `j % up` only, so one row of
    taps per phase is computed once and gathered for each chunk of outputs.
    """
    batch, length = signal.shape
    pad = _half_width_taps(up, down)
    n_taps = 2 * pad + 2
    windows = torch.nn.functional.pad(signal, (pad, pad + 1)).unfold(-1, n_taps, 1)  # (batch, length + 1, n_taps)
    n_out = -(-length * up // down)
    phases = torch.arange(min(up, n_out), dtype=torch.int64)
    frac = (phases * down % up).to(torch.float64) / up
    table = _windowed_sinc(torch.arange(n_taps, dtype=torch.float64) - pad - frac[:, None], up, down).float()
    chunks = []
    for start in range(0, n_out, DIRECT_CHUNK_SAMPLES):
        index = torch.arange(start, min(start + DIRECT_CHUNK_SAMPLES, n_out), dtype=torch.int64)
        chunks.append(torch.einsum("bnt,nt->bn", windows[:, index * down // up], table[index % up]))
    return torch.cat(chunks, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Source handling
# ---------------------------------------------------------------------------------------------------------------


def _check_rate(rate: Any, what: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Integral) or rate <= 0:
        raise ValueError(f"{what} must be a positive integer number of Hz, got {rate!r}")


def _read_source(source: AudioSource, default_rate: int) -> tuple[Any, int, str, int | None]:
    """Returns `(samples, sampling_rate, name for messages, channel axis or None to guess)`."""
    if isinstance(source, Mapping):
        return _read_mapping(source)
    if isinstance(source, (str, os.PathLike)):
        return _read_path(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = f"<{len(source)} bytes of encoded audio>"
        return (*_decode(bytes(source), name), name, None)
    if isinstance(source, (np.ndarray, torch.Tensor, list, tuple)):
        return source, default_rate, f"array of shape {tuple(np.shape(source))}", None
    if hasattr(source, "get_all_samples"):  # torchcodec AudioDecoder
        decoded = source.get_all_samples()
        return decoded.data, int(decoded.sample_rate), type(source).__name__, 0
    raise TypeError(f"Unsupported audio source of type {type(source).__name__}")


def _read_mapping(source: Mapping[str, Any]) -> tuple[Any, int, str, int | None]:
    name = str(source.get("path") or "audio dict")
    samples = source.get("array") if source.get("array") is not None else source.get("raw")
    if samples is not None:
        if source.get("sampling_rate") is None:
            raise ValueError(f"{name}: a dict with 'array'/'raw' samples also needs a 'sampling_rate' key")
        return samples, source["sampling_rate"], name, None
    if source.get("bytes") is not None:
        return (*_decode(bytes(source["bytes"]), name), name, None)
    if source.get("path") is not None:
        return _read_path(source["path"])
    raise ValueError(
        f"An audio dict needs 'array'/'raw' + 'sampling_rate', or 'path'/'bytes'; got keys {list(source)}"
    )


def _read_path(path: str | os.PathLike) -> tuple[np.ndarray, int, str, int | None]:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Audio file not found: {path}")
    return (*_decode(path, str(path)), str(path), None)


def _to_mono_float32(samples: Any, name: str, channel_axis: int | None) -> np.ndarray:
    """`(time,)` / `(time, ch)` / `(ch, time)` samples -> validated float32 `(time,)`, int PCM scaled to [-1, 1]."""
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu()
        samples = (samples.float() if samples.is_floating_point() else samples).numpy()
    samples = np.asarray(samples)
    if samples.ndim not in (1, 2):
        raise ValueError(f"{name}: expected audio of shape (time,) or (time, channels), got {samples.shape}")
    if np.issubdtype(samples.dtype, np.integer):
        samples = _int_pcm_to_float(samples)
    elif not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"{name}: audio samples must be numbers, got dtype {samples.dtype}")
    if samples.ndim == 2:
        axis = channel_axis if channel_axis is not None else int(np.argmin(samples.shape))
        samples = samples.mean(axis=axis)
    if samples.size == 0:
        raise ValueError(f"{name}: the audio is empty (0 samples)")
    if not np.isfinite(samples).all():
        raise ValueError(f"{name}: the audio contains NaN or infinite samples")
    return samples.astype(np.float32, copy=False)


def _int_pcm_to_float(samples: np.ndarray) -> np.ndarray:
    """Integer PCM (any width, signed or unsigned) -> float64 in [-1, 1)."""
    info = np.iinfo(samples.dtype)
    half_range = (int(info.max) - int(info.min) + 1) / 2
    return (samples.astype(np.float64) - (info.min + half_range)) / half_range


def _to_frames_by_channels(waveform: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """Validated float32 samples shaped `(time,)` or `(time, channels)`, clipped to [-1, 1], for soundfile."""
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu().float().numpy()
    samples = np.asarray(waveform)
    if np.issubdtype(samples.dtype, np.integer):
        samples = _int_pcm_to_float(samples)
    elif not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"{name}: audio samples must be numbers, got dtype {samples.dtype}")
    if samples.ndim not in (1, 2):
        raise ValueError(f"{name}: expected audio of shape (time,) or (time, channels), got {samples.shape}")
    if samples.size == 0:
        raise ValueError(f"{name}: the audio is empty (0 samples), nothing to write")
    if not np.isfinite(samples).all():
        raise ValueError(f"{name}: the audio contains NaN or infinite samples")
    if samples.ndim == 2 and samples.shape[0] < samples.shape[1]:
        samples = samples.T  # (channels, time) -> (time, channels)
    return np.clip(samples.astype(np.float32), -1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------


def _import_optional(module: str, pip_name: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"Decoding audio files needs the `{pip_name}` package: pip install {pip_name}") from err


def _decode(data: Path | bytes, name: str) -> tuple[np.ndarray, int]:
    """Decode a file or encoded bytes to `((time,) float32 mono, rate)`, trying soundfile, then PyAV."""
    failures, missing = [], []
    for decoder in (_decode_with_soundfile, _decode_with_pyav):
        try:
            return decoder(data)
        except AudioDecodeError as err:
            failures.append(str(err))
        except ImportError as err:
            missing.append(str(err))
    if missing:
        raise ImportError(f"Could not decode {name} ({'; '.join(failures)}). {' '.join(missing)}")
    raise AudioDecodeError(f"Could not decode audio from {name}: tried {'; '.join(failures)}")


def _decode_with_soundfile(data: Path | bytes) -> tuple[np.ndarray, int]:
    soundfile = _import_optional("soundfile", "soundfile")
    try:
        samples, rate = soundfile.read(
            io.BytesIO(data) if isinstance(data, bytes) else data, dtype="float32", always_2d=True
        )
    except (soundfile.SoundFileError, RuntimeError, TypeError) as err:
        raise AudioDecodeError(f"soundfile: {err}") from err
    return samples.mean(axis=1), int(rate)  # (time, channels) -> (time,)


def _decode_with_pyav(data: Path | bytes) -> tuple[np.ndarray, int]:
    av = _import_optional("av", "av")
    try:
        with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as container:
            if not container.streams.audio:
                kinds = sorted({stream.type for stream in container.streams}) or ["none"]
                raise AudioDecodeError(f"PyAV: no audio stream (streams: {', '.join(kinds)})")
            stream = container.streams.audio[0]
            # Converts any sample format (s16, packed...) to planar float; keeps rate and channel layout.
            to_float = av.AudioResampler(format="fltp")
            planes = []
            for frame in container.decode(stream):
                planes.extend(out.to_ndarray() for out in to_float.resample(frame))
            planes.extend(out.to_ndarray() for out in to_float.resample(None))  # flush
            rate = stream.codec_context.sample_rate
    except av.FFmpegError as err:
        raise AudioDecodeError(f"PyAV: {err}") from err
    if not planes:
        return np.zeros(0, dtype=np.float32), int(rate or SAMPLING_RATE)
    return np.concatenate(planes, axis=1).mean(axis=0), int(rate)  # (channels, time) -> (time,)
