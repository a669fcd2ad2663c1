"""Data for fine-tuning Whisper-MoE: dataset readers, Whisper feature preparation, batching and augmentation."""

from .augment import AugmentConfig, WaveformAugmenter
from .collator import SpeechSeq2SeqCollator
from .data import load_asr_dataset, prepare_dataset, read_librispeech, read_manifest
from .text_data import TextPairCollator, prepare_text_pairs, read_text_pairs, split_held_out

__all__ = [
    "AugmentConfig",
    "SpeechSeq2SeqCollator",
    "TextPairCollator",
    "WaveformAugmenter",
    "load_asr_dataset",
    "prepare_dataset",
    "prepare_text_pairs",
    "read_librispeech",
    "read_manifest",
    "read_text_pairs",
    "split_held_out",
]
