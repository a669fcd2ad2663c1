"""Word and character error rates after Whisper's English text normalisation.

Shared by `scripts/evaluate.py` and the training script's `Seq2SeqTrainer(compute_metrics=...)`, so that a WER
logged during training and one measured afterwards mean the same thing. All rates are in percent.

    normalize = english_normalizer()
    error_rates(["Mr. Smith paid $25."], ["mister smith paid twenty five dollars"], normalize)  # wer 0.0
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
from transformers import EvalPrediction
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

IGNORE_INDEX = -100  # label (and padded prediction) id the Trainer and loss ignore
PERCENT = 100.0
NO_SPELLING_MAPPING = "none"

Normalizer = Callable[[str], str]

__all__ = [
    "NO_SPELLING_MAPPING",
    "WhisperEnglishNormalizer",
    "english_normalizer",
    "english_spelling_mapping",
    "error_rates",
    "make_compute_metrics",
    "normalized_pairs",
]


class WhisperEnglishNormalizer(EnglishTextNormalizer):
    """Whisper's `EnglishTextNormalizer` that remembers where its British->American spelling map came from."""

    def __init__(self, spelling_mapping: dict[str, str], spelling_mapping_source: str) -> None:
        super().__init__(spelling_mapping)
        self.spelling_mapping_source = spelling_mapping_source


def english_spelling_mapping(model_dir: str | Path | None = None) -> tuple[dict[str, str], str]:
    """The British->American spelling map for Whisper's English normaliser, and where it came from.

    transformers does not ship it. It is looked up in a model folder's `normalizer.json` (what Hub Whisper
    tokenizers carry), then in openai-whisper's `whisper/normalizers/english.json` when that package is installed.
    Without either the map is empty and the source is `"none"`; the rest of the normalisation (numbers, "Mr." ->
    "mister", punctuation, case) still applies.
    """
    candidates = [Path(model_dir) / "normalizer.json"] if model_dir else []
    spec = importlib.util.find_spec("whisper")
    if spec and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "normalizers" / "english.json")
    for candidate in candidates:
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8")), str(candidate)
    return {}, NO_SPELLING_MAPPING


def english_normalizer(model_dir: str | Path | None = None) -> WhisperEnglishNormalizer:
    """Whisper's English normaliser with the best spelling map available (see `english_spelling_mapping`).

    `normalizer.spelling_mapping_source` names the file the map was read from, or `"none"`.
    """
    return WhisperEnglishNormalizer(*english_spelling_mapping(model_dir))


def normalized_pairs(
    references: Sequence[str], hypotheses: Sequence[str], normalize: Normalizer | None
) -> tuple[list[str], list[str]]:
    """Normalised (references, hypotheses), leaving out pairs whose reference normalises to nothing.

    Raises:
        ValueError: the two lists differ in length, or no reference is left to score.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    normalize = normalize or (lambda text: text)
    pairs = [(normalize(ref), normalize(hyp)) for ref, hyp in zip(references, hypotheses)]
    pairs = [(ref, hyp) for ref, hyp in pairs if ref.strip()]
    if not pairs:
        raise ValueError(f"all {len(references)} references are empty after normalisation; nothing to score")
    return [ref for ref, _ in pairs], [hyp for _, hyp in pairs]


def error_rates(
    references: Sequence[str], hypotheses: Sequence[str], normalize: Normalizer | None
) -> dict[str, float]:
    """Corpus WER and CER in percent, `{"wer": ..., "cer": ...}`, with jiwer after `normalize` (None: as given).

    Utterances whose reference is empty after normalisation are left out (WER is undefined for them).
    """
    refs, hyps = normalized_pairs(references, hypotheses, normalize)
    return {"wer": PERCENT * jiwer.wer(refs, hyps), "cer": PERCENT * jiwer.cer(refs, hyps)}


def _restore_padding(ids: Any, pad_token_id: int) -> np.ndarray:
    """(batch, length) ids with the Trainer's -100 fill replaced by `pad_token_id`, so that they decode."""
    ids = np.asarray(ids)
    return np.where(ids == IGNORE_INDEX, pad_token_id, ids)


def make_compute_metrics(tokenizer: Any, normalize: Normalizer | None) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `compute_metrics` for `Seq2SeqTrainer` with `predict_with_generate=True`, returning WER/CER in percent.

    `EvalPrediction.predictions` holds the generated ids (batch, generated_len) and `label_ids` the labels
    (batch, label_len); both come padded with -100 (labels by the collator, predictions by the Trainer when it
    concatenates batches), which is turned back into the pad token before decoding without special tokens.
    `tokenizer` is a Whisper tokenizer, or a processor carrying one as `.tokenizer`.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predictions = prediction.predictions
        if isinstance(predictions, tuple):  # some models return (ids, extra outputs)
            predictions = predictions[0]
        hypotheses = tokenizer.batch_decode(_restore_padding(predictions, pad_token_id), skip_special_tokens=True)
        references = tokenizer.batch_decode(
            _restore_padding(prediction.label_ids, pad_token_id), skip_special_tokens=True
        )
        return error_rates(references, hypotheses, normalize)

    return compute_metrics
