"""Whisper's audio constants and its log-mel spectrogram, computed one way for every user.

The speech-recognition pipeline (30 s windows), the text-to-speech targets and the vocoder all use
[`log_mel_spectrogram`]: 80 (or 128) Slaney mel bins up to 8 kHz from a 400-point STFT with a 10 ms hop at 16 kHz,
log10, clipped 80 dB below the loudest bin, scaled by (x + 4) / 4, which is what transformers'
`WhisperFeatureExtractor` computes.
"""

import functools
from typing import Any

import numpy as np
import torch

SAMPLING_RATE = 16_000  # Hz, Whisper's input rate
CHUNK_LENGTH = 30  # seconds in one Whisper input window
N_SAMPLES = CHUNK_LENGTH * SAMPLING_RATE  # samples in a 30 s window
N_FFT = 400  # samples in a 25 ms STFT window
HOP_LENGTH = 160  # samples in the 10 ms hop: 100 frames per second
N_FRAMES = N_SAMPLES // HOP_LENGTH  # mel frames in a 30 s window (3000)
MAX_FREQUENCY = 8_000.0  # Hz, top of the mel filterbank (Nyquist at 16 kHz)
LOG_FLOOR = 1e-10  # mel power floor before log10
DYNAMIC_RANGE = 8.0  # log10 units (80 dB) kept below each utterance's loudest bin
LOG_OFFSET = 4.0  # Whisper scales log10 power as (x + LOG_OFFSET) / LOG_SCALE
LOG_SCALE = 4.0

__all__ = [
    "HOP_LENGTH",
    "N_FFT",
    "N_FRAMES",
    "N_SAMPLES",
    "SAMPLING_RATE",
    "log_mel_30s",
    "log_mel_spectrogram",
    "mel_filters",
]


def mel_filters(num_mel_bins: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Whisper's Slaney mel filterbank, (num_mel_bins, N_FFT // 2 + 1)."""
    return _mel_filters_cpu(num_mel_bins).to(device)


@functools.lru_cache(maxsize=4)
def _mel_filters_cpu(num_mel_bins: int) -> torch.Tensor:
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=num_mel_bins,
        min_frequency=0.0,
        max_frequency=MAX_FREQUENCY,
        sampling_rate=SAMPLING_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.as_tensor(filters.T, dtype=torch.float32)


def stft(waveform: torch.Tensor) -> torch.Tensor:
    """(batch, samples) -> complex (batch, N_FFT // 2 + 1, samples // HOP_LENGTH + 1), centred like Whisper."""
    window = torch.hann_window(N_FFT, device=waveform.device)
    return torch.stft(waveform, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)


def log_mel_spectrogram(
    waveform: torch.Tensor,
    num_mel_bins: int = 80,
    pad_to_frames: int | None = None,
    filters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Whisper's log-mel features of 16 kHz audio.

    waveform: (samples,) or (batch, samples) float -> (frames, num_mel_bins) or (batch, frames, num_mel_bins).
    Without `pad_to_frames`, frames = samples // HOP_LENGTH (Whisper drops the last STFT frame) and the last frames'
    windows see the clip reflected at its end. With it, the result is what the feature extractor gives the clip
    zero-padded to `pad_to_frames` frames (3000: its 30 s window), computed on the clip plus one window of zeros:
    every later frame sees only zeros and takes the value the extractor gives silence. Each utterance is clipped to
    80 dB below its own loudest bin. `filters` (num_mel_bins, N_FFT // 2 + 1) replaces Whisper's filterbank.
    """
    if waveform.dim() not in (1, 2):
        raise ValueError(f"waveform must be (samples,) or (batch, samples), got shape {tuple(waveform.shape)}.")
    batched = waveform.dim() == 2
    waveform = waveform.float() if batched else waveform.float()[None]
    samples = waveform.shape[-1]
    if pad_to_frames is not None:
        if samples > pad_to_frames * HOP_LENGTH:
            raise ValueError(f"{samples} samples do not fit in pad_to_frames={pad_to_frames} frames.")
        # samples up to the first frame whose window (centred, N_FFT wide) lies wholly past the clip
        length = min(pad_to_frames * HOP_LENGTH, -(-(samples + N_FFT) // HOP_LENGTH) * HOP_LENGTH)
        waveform = torch.nn.functional.pad(waveform, (0, length - samples))
    elif samples < N_FFT:
        raise ValueError(f"waveform has {samples} samples; at least {N_FFT} (one STFT window) are needed.")
    filters = mel_filters(num_mel_bins, waveform.device) if filters is None else filters.to(waveform.device)
    power = stft(waveform)[..., :-1].abs() ** 2  # (batch, freq, frames)
    log_spec = (filters @ power).clamp(min=LOG_FLOOR).log10()  # (batch, mel, frames)
    floor = log_spec.amax(dim=(1, 2), keepdim=True) - DYNAMIC_RANGE  # (batch, 1, 1)
    log_spec = torch.maximum(log_spec, floor)
    if pad_to_frames is not None and log_spec.shape[-1] < pad_to_frames:
        silence = torch.maximum(floor, torch.tensor(LOG_FLOOR).log10())  # what the all-zero frames get
        tail = silence.expand(-1, log_spec.shape[1], pad_to_frames - log_spec.shape[-1])
        log_spec = torch.cat([log_spec, tail], dim=-1)
    features = ((log_spec + LOG_OFFSET) / LOG_SCALE).transpose(1, 2)  # (batch, frames, mel)
    return features if batched else features[0]


def log_mel_30s(waveform: np.ndarray, extractor: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper's 30 s log-mel window of a clip of at most 30 s, computed on the clip alone.

    Equals `WhisperFeatureExtractor` (`extractor`, for its mel bins and window) with its default padding to 30 s,
    whose STFT runs over the whole window; here it runs over the clip plus one window of zeros (see
    [`log_mel_spectrogram`]). A 5 s clip costs a sixth of the work.

    waveform: (time,) float at `extractor.sampling_rate` -> input_features (1, num_mel_bins, 3000) float32 and
    attention_mask (1, 3000), 1 on frames of real audio (as the extractor's `return_attention_mask`).
    """
    if len(waveform) > extractor.n_samples:
        raise ValueError(f"log_mel_30s takes at most {extractor.n_samples} samples (30 s), got {len(waveform)}.")
    if getattr(extractor, "dither", 0.0) or getattr(extractor, "do_normalize", False):
        raise ValueError("log_mel_30s reproduces the extractor without dither or normalisation only.")
    if (extractor.n_fft, extractor.hop_length) != (N_FFT, HOP_LENGTH):
        raise ValueError(
            f"log_mel_30s computes Whisper's STFT (n_fft={N_FFT}, hop_length={HOP_LENGTH}), but the extractor has "
            f"n_fft={extractor.n_fft}, hop_length={extractor.hop_length}."
        )
    frames = extractor.nb_max_frames
    filters = torch.from_numpy(np.asarray(extractor.mel_filters, dtype=np.float32)).T
    signal = torch.from_numpy(np.asarray(waveform, dtype=np.float32))
    features = log_mel_spectrogram(signal, filters.shape[0], pad_to_frames=frames, filters=filters)
    attention_mask = torch.zeros(1, frames, dtype=torch.long)
    attention_mask[0, : -(-len(waveform) // HOP_LENGTH)] = 1
    return features.T[None].contiguous(), attention_mask
