"""Data for fine-tuning Whisper-MoE: dataset readers, Whisper feature preparation, batching and augmentation."""

from .augment import AugmentConfig, WaveformAugmenter
from .collator import SpeechSeq2SeqCollator
from .data import load_asr_dataset, prepare_dataset, read_librispeech, read_manifest

__all__ = [
    "AugmentConfig",
    "SpeechSeq2SeqCollator",
    "WaveformAugmenter",
    "load_asr_dataset",
    "prepare_dataset",
    "read_librispeech",
    "read_manifest",
]
