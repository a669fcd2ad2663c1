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
from .features import log_mel_30s

# log_mel_30s is re-exported for older imports; its home is features.py
__all__ = ["WhisperMoEProcessor", "log_mel_30s"]


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
