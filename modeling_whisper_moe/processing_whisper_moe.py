"""WhisperMoEProcessor: transformers' WhisperProcessor that also takes audio files, bytes and any sampling rate."""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from transformers import WhisperProcessor

from .audio import load_audio

__all__ = ["WhisperMoEProcessor", "log_mel_30s"]

MEL_POWER_FLOOR = 1e-10  # Whisper clamps mel power here before log10
DYNAMIC_RANGE = 8.0  # log10 units below the loudest frame that Whisper keeps


class WhisperMoEProcessor(WhisperProcessor):
    """Whisper feature extractor + tokenizer, with audio accepted in any form `load_audio` understands.

    `processor(audio, text=None, sampling_rate=None, **kwargs)` where `audio` is a path, encoded bytes, a
    `{"array"|"raw", "sampling_rate"}` or `{"path", "bytes"}` dict, a 1-D array / tensor / list of floats, or a list
    of any of these (a batch; a 2-D array is a batch of rows, as in `WhisperFeatureExtractor`). `sampling_rate` is
    the rate of raw arrays (default: the feature extractor's, 16 kHz); they are resampled when it differs, and
    files are decoded at their own rate and resampled. Audio gives `input_features` of shape
    `(batch, num_mel_bins, 3000)`; text is tokenized as in `WhisperProcessor` (as `labels` when audio is given too).
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        audio = args[0] if args else kwargs.pop("audio", None)
        if audio is not None:
            target_rate = self.feature_extractor.sampling_rate
            source_rate = kwargs.pop("sampling_rate", None)
            source_rate = target_rate if source_rate is None else source_rate
            audio = self.load_audio(audio, source_rate, target_rate)
            kwargs["sampling_rate"] = target_rate
        return super().__call__(audio, *args[1:], **kwargs)

    @staticmethod
    def load_audio(audio: Any, sampling_rate: int, target_rate: int) -> np.ndarray | list[np.ndarray]:
        """Decode / resample one clip or a batch to float32 mono `(time,)` arrays at `target_rate`."""
        if _is_batch(audio):
            return [_load_one(clip, sampling_rate, target_rate) for clip in audio]
        return _load_one(audio, sampling_rate, target_rate)


def _is_batch(audio: Any) -> bool:
    if isinstance(audio, (list, tuple)):
        return len(audio) > 0 and not isinstance(audio[0], numbers.Number)
    return isinstance(audio, (np.ndarray, torch.Tensor)) and audio.ndim == 2


def _load_one(clip: Any, sampling_rate: int, target_rate: int) -> np.ndarray:
    if not isinstance(clip, (str, os.PathLike, bytes, bytearray, memoryview, Mapping)):
        clip = {"array": clip, "sampling_rate": sampling_rate}  # raw samples at the caller's rate
    return load_audio(clip, target_rate)


def log_mel_30s(waveform: np.ndarray, extractor: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper's 30 s log-mel window of a clip of at most 30 s, computed on the clip alone.

    Equals `WhisperFeatureExtractor` with its default padding to 30 s, whose STFT runs over the whole window: here
    it runs over the clip plus one window of zeros, and every later frame, which sees only zeros, takes the floor
    value the extractor gives silence (the loudest frame's log-mel minus 8). A 5 s clip costs a sixth of the work.

    waveform: (time,) float at `extractor.sampling_rate` -> input_features (1, num_mel_bins, 3000) float32 and
    attention_mask (1, 3000), 1 on frames of real audio (as the extractor's `return_attention_mask`).
    """
    n_fft, hop, frames = extractor.n_fft, extractor.hop_length, extractor.nb_max_frames
    if len(waveform) > extractor.n_samples:
        raise ValueError(f"log_mel_30s takes at most {extractor.n_samples} samples (30 s), got {len(waveform)}.")
    if getattr(extractor, "dither", 0.0) or getattr(extractor, "do_normalize", False):
        raise ValueError("log_mel_30s reproduces the extractor without dither or normalisation only.")
    # samples up to the first frame whose window (centred, n_fft wide) lies wholly past the clip
    length = min(extractor.n_samples, -(-(len(waveform) + n_fft) // hop) * hop)
    signal = torch.zeros(length, dtype=torch.float32)
    signal[: len(waveform)] = torch.from_numpy(np.asarray(waveform, dtype=np.float32))
    stft = torch.stft(signal, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()  # (n_fft // 2 + 1, length // hop)
    mel = torch.from_numpy(np.asarray(extractor.mel_filters, dtype=np.float32)).T @ power
    log_spec = mel.clamp(min=MEL_POWER_FLOOR).log10()
    floor = log_spec.max() - DYNAMIC_RANGE
    silence = torch.maximum(floor, torch.tensor(MEL_POWER_FLOOR).log10())  # what the all-zero frames get
    features = torch.full((1, mel.shape[0], frames), float((silence + 4.0) / 4.0))
    features[0, :, : log_spec.shape[1]] = (torch.maximum(log_spec, floor) + 4.0) / 4.0
    attention_mask = torch.zeros(1, frames, dtype=torch.long)
    attention_mask[0, : -(-len(waveform) // hop)] = 1
    return features, attention_mask
