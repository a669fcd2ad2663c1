"""Scores of every evaluation: WER / CER after Whisper's English text normalisation, digit error rates, BLEU / chrF.

Shared by `processing.evaluation` (scripts/evaluate.py) and the training script's
`Seq2SeqTrainer(compute_metrics=...)`, so that a WER logged during training and one measured afterwards mean the
same thing. WER and CER are in percent; the digit error rate is a fraction.

    normalize = english_normalizer()
    error_rates(["Mr. Smith paid $25."], ["mister smith paid twenty five dollars"], normalize)  # wer 0.0
    digit_wer([to_digits("3141")], [to_digits("three, one four one")])  # 0.0
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
from transformers import EvalPrediction
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from processing.tts_data import digits_to_words

IGNORE_INDEX = -100  # label (and padded prediction) id the Trainer and loss ignore
PERCENT = 100.0
NO_SPELLING_MAPPING = "none"
DIGIT_PATTERN = re.compile(r"\d|\b(?:zero|oh|one|two|three|four|five|six|seven|eight|nine)\b")
WORD_DIGITS = {"oh": "0", **{w: str(i) for i, w in enumerate(digits_to_words("0123456789").split())}}
EMPTY_TRANSCRIPT = "<empty>"  # jiwer refuses an empty hypothesis; this one matches no digit
BLEU_CHRF_DECIMALS = 2

Normalizer = Callable[[str], str]

__all__ = [
    "NO_SPELLING_MAPPING",
    "WhisperEnglishNormalizer",
    "bleu_chrf",
    "digit_wer",
    "english_normalizer",
    "english_spelling_mapping",
    "error_rates",
    "make_compute_metrics",
    "normalized_pairs",
    "to_digits",
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


def to_digits(text: str) -> str:
    """'Three, 1 4... one!' -> '3 1 4 1': every digit and digit word, in order, as space-separated digits."""
    found = DIGIT_PATTERN.findall(text.lower())
    return " ".join(WORD_DIGITS.get(token, token) for token in found)


def digit_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Word error rate over digit strings (a fraction); an empty transcript counts every reference digit deleted."""
    output = jiwer.process_words(list(references), [h if h else EMPTY_TRANSCRIPT for h in hypotheses])
    errors = output.substitutions + output.deletions + output.insertions
    return errors / sum(len(reference.split()) for reference in references)


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float | str]:
    """Corpus BLEU and chrF (sacrebleu's defaults, one reference each), rounded, with their sacrebleu signatures."""
    import sacrebleu

    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    return {
        "bleu": round(bleu.corpus_score(list(hypotheses), [list(references)]).score, BLEU_CHRF_DECIMALS),
        "chrf": round(chrf.corpus_score(list(hypotheses), [list(references)]).score, BLEU_CHRF_DECIMALS),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


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
