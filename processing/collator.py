"""Batches of prepared examples for Whisper's training forward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modeling_whisper_moe.modeling_whisper_moe import IGNORE_INDEX

__all__ = ["SpeechSeq2SeqCollator"]


@dataclass
class SpeechSeq2SeqCollator:
    """Pads `prepare_dataset` examples into a batch the model's forward takes as keyword arguments.

    Returns `input_features` `(batch, num_mel_bins, frames)` float32, `labels` `(batch, tgt_len)` int64 with
    `IGNORE_INDEX` (-100) on padding and, when every example has one, `attention_mask` `(batch, frames)`: real mel
    frames, which keeps the padding up to 30 s out of the encoder's router losses. Other columns are left out.

    The labels' leading `decoder_start_token_id` (`<|startoftranscript|>`) is dropped when every row starts with it:
    the model shifts labels right and prepends it again, so keeping it would teach the model to predict it.
    Padding is found with the tokenizer's attention mask, not by token id, because Whisper pads with
    `<|endoftext|>` and the real end-of-text token must stay in the labels.
    """

    processor: Any  # a WhisperProcessor: its feature extractor and tokenizer pad the two sides
    decoder_start_token_id: int

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("SpeechSeq2SeqCollator got an empty list of examples")
        features = [{"input_features": example["input_features"]} for example in examples]
        batch = self.processor.feature_extractor.pad(features, return_tensors="pt")
        out = {"input_features": batch["input_features"].to(torch.float32), "labels": self._labels(examples)}
        if all(example.get("attention_mask") is not None for example in examples):
            masks = [np.asarray(example["attention_mask"], dtype=np.int64) for example in examples]
            out["attention_mask"] = torch.from_numpy(np.stack(masks))
        return out

    def _labels(self, examples: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """Token ids `(batch, longest)` with IGNORE_INDEX after each row's end, without a shared start token."""
        ids = [np.asarray(example["labels"], dtype=np.int64).tolist() for example in examples]
        padded = self.processor.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        labels = padded["input_ids"].masked_fill(padded["attention_mask"].ne(1), IGNORE_INDEX)
        if labels.shape[1] > 0 and bool((labels[:, 0] == self.decoder_start_token_id).all()):
            labels = labels[:, 1:]
        return labels.long()
