"""Text pairs for training the text front-end to translate: CSV reader, held-out split, token ids, collator.

A pair becomes encoder ids `<|src|> source tokens` (what the translation pipeline feeds the encoder) and labels
`<|tgt|><|transcribe|><|notimestamps|> target tokens <|endoftext|>` (the decoder prompt the model is generated with,
minus `<|startoftranscript|>`, which the model prepends when it shifts labels right).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from datasets import Dataset
from transformers import GenerationConfig

from modeling_whisper_moe.hub import atomic_directory
from modeling_whisper_moe.modeling_whisper_moe import IGNORE_INDEX, text_decoder_prompt
from modeling_whisper_moe.pipeline_translation import encode_source, encode_target

logger = logging.getLogger(__name__)

ID_COLUMN = "id"
HELD_OUT_IDS_FILE = "held_out_ids.json"
# tokens per pair, read by the Trainer's train_sampling_strategy="group_by_length" to batch similar lengths together
LENGTH_COLUMN = "length"

__all__ = [
    "HELD_OUT_IDS_FILE",
    "TextPairCollator",
    "copy_pairs",
    "prepare_text_pairs",
    "read_held_out_ids",
    "read_held_out_pairs",
    "read_text_pairs",
    "split_held_out",
    "write_held_out_ids",
]


def read_text_pairs(csv_path: str | Path, source_column: str, target_column: str) -> Dataset:
    """Read a CSV of sentence pairs into a Dataset with columns `id`, `source`, `target`.

    Rows with an empty side are dropped. Without an `id` column a row's id is its line number.

    Raises:
        FileNotFoundError: no such CSV.
        ValueError: a named column is missing, or no pair is left.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"Text-pair CSV not found: {csv_path}")
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = [column for column in (source_column, target_column) if column not in frame.columns]
    if missing:
        raise ValueError(f"{csv_path} has no column {missing}; its columns are {list(frame.columns)}.")
    ids = frame[ID_COLUMN] if ID_COLUMN in frame.columns else pd.Series(frame.index + 2, dtype=str)
    pairs = pd.DataFrame(
        {"id": ids, "source": frame[source_column].str.strip(), "target": frame[target_column].str.strip()}
    )
    pairs = pairs[(pairs.source != "") & (pairs.target != "")]
    if pairs.empty:
        raise ValueError(f"{csv_path} has no pair with both {source_column!r} and {target_column!r} filled.")
    if pairs.id.duplicated().any():
        raise ValueError(f"{csv_path} repeats ids, e.g. {pairs.id[pairs.id.duplicated()].iloc[0]!r}.")
    return Dataset.from_pandas(pairs.reset_index(drop=True))


def _held_out_rank(pair_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{pair_id}".encode()).hexdigest()


def split_held_out(pairs: Dataset, held_out_size: int, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held_out): the `held_out_size` pairs whose hashed (seed, id) ranks lowest are held out.

    The choice depends on ids and the seed only, not on row order. Training pairs whose source or target sentence
    also occurs in a held-out pair are dropped too, so the held-out score measures sentences never trained on.
    """
    if not 0 < held_out_size < len(pairs):
        raise ValueError(
            f"held_out_size must be between 1 and {len(pairs) - 1} (the pairs less one), got {held_out_size}."
        )
    ranked = sorted(range(len(pairs)), key=lambda index: _held_out_rank(pairs[index]["id"], seed))
    held_out = pairs.select(sorted(ranked[:held_out_size]))
    seen = set(held_out["source"]) | set(held_out["target"])
    train = pairs.select(sorted(ranked[held_out_size:]))
    kept = train.filter(lambda pair: pair["source"] not in seen and pair["target"] not in seen)
    logger.info("Held out %d pairs; dropped %d training pairs sharing a sentence with them", held_out_size,
                len(train) - len(kept))  # fmt: skip
    return kept, held_out


def copy_pairs(pairs: Dataset, fraction: float, seed: int) -> Dataset:
    """A `fraction` of `pairs` (drawn with `seed`) as source -> source copies, ids suffixed `#copy`.

    Mixed into translation training with the decoder prompted in the source language, copying is an easy task whose
    only solution is to read the encoder, meant to teach a new cross-attention where the source tokens are (the
    text-translation recipe uses 20 %; it has not been measured against a run without copies).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"copy fraction must be in (0, 1], got {fraction}.")
    chosen = pairs.shuffle(seed=seed).select(range(max(1, round(fraction * len(pairs)))))
    return chosen.map(lambda pair: {"id": f"{pair['id']}#copy", "target": pair["source"]})


def write_held_out_ids(ids: Sequence[str], folder: str | Path, record: Mapping[str, Any]) -> Path:
    """Write `{..record, "ids": [...]}` to folder/held_out_ids.json, atomically; returns the file's path."""
    with atomic_directory(folder) as staging:
        (staging / HELD_OUT_IDS_FILE).write_text(json.dumps({**record, "ids": list(ids)}, indent=1) + "\n")
    return Path(folder) / HELD_OUT_IDS_FILE


def read_held_out_ids(path: str | Path) -> dict[str, Any]:
    """The record `write_held_out_ids` wrote (a folder holding held_out_ids.json, or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / HELD_OUT_IDS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No held-out ids at {path}; train.py writes them next to the model.")
    return json.loads(path.read_text(encoding="utf-8"))


def read_held_out_pairs(
    record: Mapping[str, Any], base_dir: str | Path, csv_path: str | Path | None = None, limit: int | None = None
) -> Dataset:
    """The pairs a held-out record names (its first `limit` ids), in the record's order, as `read_text_pairs` gives
    them. The CSV is `csv_path` or the record's, which train.py stores as given: a relative one that does not exist
    from here is looked up under `base_dir` (where training ran).

    Raises:
        ValueError: an id of the record is not in the CSV.
    """
    csv_path = Path(csv_path or record["csv"])
    if not csv_path.is_absolute() and not csv_path.exists():
        csv_path = Path(base_dir) / csv_path
    pairs = read_text_pairs(csv_path, record["source_column"], record["target_column"])
    row_of = {pair_id: row for row, pair_id in enumerate(pairs["id"])}
    ids = record["ids"][:limit]
    missing = [pair_id for pair_id in ids if pair_id not in row_of]
    if missing:
        raise ValueError(f"{len(missing)} held-out ids are not in {csv_path}, e.g. {missing[0]!r}.")
    return pairs.select([row_of[pair_id] for pair_id in ids])


def prepare_text_pairs(
    pairs: Dataset,
    tokenizer,
    generation_config: GenerationConfig,
    src_lang: str,
    tgt_lang: str,
    max_source_length: int,
    max_label_length: int,
) -> Dataset:
    """Token ids for training: `input_ids` (encoder), `labels` (decoder) and their total `length`; pairs longer
    than the limits are dropped and counted."""
    prompt = text_decoder_prompt(generation_config, tgt_lang)[1:]  # the model prepends <|startoftranscript|>
    end = generation_config.eos_token_id

    def encode(pair: Mapping[str, str]) -> dict[str, list[int] | int]:
        input_ids = encode_source(tokenizer, generation_config, pair["source"], src_lang)
        labels = [*prompt, *encode_target(tokenizer, pair["target"]), end]
        return {"input_ids": input_ids, "labels": labels, LENGTH_COLUMN: len(input_ids) + len(labels)}

    encoded = pairs.map(encode, remove_columns=[c for c in pairs.column_names if c != "id"])
    fits = encoded.filter(
        lambda ex: len(ex["input_ids"]) <= max_source_length and len(ex["labels"]) <= max_label_length
    )
    if len(fits) < len(encoded):
        logger.info("Dropped %d of %d pairs longer than %d source / %d label tokens", len(encoded) - len(fits),
                    len(encoded), max_source_length, max_label_length)  # fmt: skip
    if len(fits) == 0:
        raise ValueError(
            f"No pair fits max_source_length={max_source_length} and max_label_length={max_label_length}."
        )
    return fits


@dataclass
class TextPairCollator:
    """Pads `prepare_text_pairs` examples: `input_ids` (batch, src_len) with `pad_token_id` and `attention_mask`
    (batch, src_len), 1 = real token; `labels` (batch, tgt_len) with IGNORE_INDEX (-100) on padding."""

    pad_token_id: int

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("TextPairCollator got an empty list of examples")
        input_ids = self._pad([example["input_ids"] for example in examples], self.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": self._pad([[1] * len(example["input_ids"]) for example in examples], 0),
            "labels": self._pad([example["labels"] for example in examples], IGNORE_INDEX),
        }

    @staticmethod
    def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
        longest = max(len(row) for row in rows)
        return torch.tensor([[*row, *[value] * (longest - len(row))] for row in rows], dtype=torch.long)
