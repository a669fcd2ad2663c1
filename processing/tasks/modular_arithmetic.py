"""Modular arithmetic as text, the task grokking was found on (Power et al., 2022, arXiv 2201.02177).

Every equation "a + b" of residues a, b in 0..p-1 (or -, *, /) is a text pair through the encoder's text front-end,
with target "c" = (a op b) mod p: encoder `<|en|> a + b`, decoder `<|en|><|transcribe|><|notimestamps|> c
<|endoftext|>` (the translation task's prompt and tokens, `text_data.prepare_text_pairs`). A seeded
`arithmetic_train_fraction` of the equations trains, the rest are held out. The metric is exact-match accuracy on
both, from one teacher-forced forward: a row counts when every label token is the argmax of its logits, and then
greedy decoding writes exactly that target (each step's argmax follows correct previous tokens). It can only
under-count greedy decoding, by a row whose argmax somewhere is a token generation suppresses (timestamps).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from datasets import Dataset
from transformers import EvalPrediction

from modeling_whisper_moe.modeling_whisper_moe import IGNORE_INDEX
from processing.tasks.base import Task, TaskContext, TaskData, register_task
from processing.tasks.translation import add_text_languages
from processing.text_data import TextPairCollator, prepare_text_pairs

LANGUAGE = "en"  # the prompt's language token on both sides
OPERATIONS = ("+", "-", "*", "/")  # "/": a times the inverse of b mod p (b != 0)
TRAIN_SPLIT, HELD_OUT_SPLIT = "train", "held_out"  # the evaluation's datasets: metrics eval_train_*, eval_held_out_*


def equations(modulus: int, operation: str) -> list[tuple[int, int, int]]:
    """Every (a, b, (a op b) mod p) with a, b in 0..p-1 (b != 0 for division)."""
    if modulus < 2:
        raise ValueError(f"arithmetic_modulus must be at least 2, got {modulus}.")
    if operation not in OPERATIONS:
        raise ValueError(f"arithmetic_operation must be one of {OPERATIONS}, got {operation!r}.")
    if operation == "/" and any(modulus % d == 0 for d in range(2, int(modulus**0.5) + 1)):
        raise ValueError(f"division needs a prime arithmetic_modulus (every b != 0 invertible), got {modulus}.")
    results = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "*": lambda a, b: a * b,
        "/": lambda a, b: a * pow(b, -1, modulus),
    }[operation]
    divisors = range(1, modulus) if operation == "/" else range(modulus)
    return [(a, b, results(a, b) % modulus) for a in range(modulus) for b in divisors]


def split_equations(rows: list[tuple[int, int, int]], train_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a `train_fraction` of `rows` drawn with `seed`, and the rest; both non-empty."""
    count = round(train_fraction * len(rows))
    if not 0 < count < len(rows):
        raise ValueError(
            f"arithmetic_train_fraction={train_fraction} leaves no training or no held-out equation of {len(rows)}."
        )
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled[:count]), sorted(shuffled[count:])


def as_pairs(rows: list[tuple[int, int, int]], operation: str) -> Dataset:
    """Text pairs `id`, `source` ("a + b"), `target` ("c")."""
    return Dataset.from_dict(
        {
            "id": [f"{a}{operation}{b}" for a, b, _ in rows],
            "source": [f"{a} {operation} {b}" for a, b, _ in rows],
            "target": [str(c) for _, _, c in rows],
        }
    )


def build_data(context: TaskContext) -> TaskData:
    args = context.data
    rows = equations(args.arithmetic_modulus, args.arithmetic_operation)
    train, held_out = split_equations(rows, args.arithmetic_train_fraction, context.seed)
    add_text_languages(context.model.generation_config, context.tokenizer, (LANGUAGE,))
    encode = dict(tokenizer=context.tokenizer, generation_config=context.model.generation_config, src_lang=LANGUAGE,
                  tgt_lang=LANGUAGE, max_source_length=args.max_source_length,
                  max_label_length=args.max_label_length)  # fmt: skip
    prepared = {name: prepare_text_pairs(as_pairs(split, args.arithmetic_operation), **encode)
                for name, split in ((TRAIN_SPLIT, train), (HELD_OUT_SPLIT, held_out))}  # fmt: skip
    scored = {name: data.select(range(min(args.max_eval_samples or len(data), len(data))))
              for name, data in prepared.items()}  # fmt: skip
    return TaskData(prepared[TRAIN_SPLIT], scored)


def build_collator(context: TaskContext) -> TextPairCollator:
    return TextPairCollator(context.model.config.pad_token_id)


def argmax_ids(outputs, labels: torch.Tensor) -> torch.Tensor:
    """(batch, tgt_len) argmax of the logits: all the metric needs of an evaluation batch."""
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    return logits.argmax(dim=-1)


def exact_match(prediction: EvalPrediction) -> dict[str, float]:
    """{"accuracy": share of rows whose every label token is predicted} (padding, -100, is not scored)."""
    predicted, labels = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)
    correct = ((predicted == labels) | (labels == IGNORE_INDEX)).all(axis=1)
    return {"accuracy": float(correct.mean())}


MODULAR_ARITHMETIC = register_task(
    Task(
        "modular_arithmetic",
        build_data,
        build_collator,
        build_metrics=lambda context: exact_match,
        preprocess_logits=argmax_ids,
    )
)
