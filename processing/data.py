"""Speech datasets for fine-tuning: readers that return `audio` + `text` columns, and Whisper feature preparation.

Every reader returns a `datasets.Dataset` (or `IterableDataset` when streaming) whose `audio` column holds what
`modeling_whisper_moe.audio.load_audio` decodes: an absolute file path, or a `{"path", "bytes"}` dict for Hub
datasets. No column keeps a `datasets.Audio` feature, not even `Audio(decode=False)`: datasets>=4 needs torchcodec
to decode *and to encode* one, and a streamed dataset encodes every example after any map or rename.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
from datasets import Audio, Dataset, IterableDataset, Value
from datasets.packaged_modules.folder_based_builder.folder_based_builder import FolderBasedBuilder

from modeling_whisper_moe.audio import load_audio

logger = logging.getLogger(__name__)

AUDIO_COLUMN = "audio"
TEXT_COLUMN = "text"
MANIFEST_PATH_COLUMN = "path"  # audio file, relative to the manifest's folder
SPLIT_COLUMN = "split"
SPEAKER_COLUMN = "speaker"
CSV_HEADER_LINES = 1  # a manifest row's line number in the file is its index + this + 1
MAX_NAMED_IN_ERRORS = 5  # missing files / unknown values listed in an error message before "... and N more"

LIBRISPEECH_TRANSCRIPTS = "*/*/*.trans.txt"  # speaker/chapter/speaker-chapter.trans.txt
LIBRISPEECH_AUDIO_SUFFIX = ".flac"

MAX_LABEL_LENGTH = 448  # Whisper's max_target_positions: decoder positions, prefix and <|endoftext|> included
MAX_AUDIO_SECONDS = 30.0  # Whisper's input window; longer audio would be truncated and no longer match its labels
# Whisper's pretraining text follows the prefix tokens with a leading space (" And so my fellow..."); labels
# without it would use different first tokens than the model learnt.
LABEL_TEXT_PREFIX = " "
# The Arrow storage of `datasets.Audio` as a plain struct: the same {"bytes", "path"} dicts, without torchcodec.
AUDIO_STORAGE = {"bytes": Value("binary"), "path": Value("string")}
ARRAY_COLUMNS = ("input_features", "attention_mask")  # returned as numpy arrays by a prepared Dataset

AnyDataset = Dataset | IterableDataset

__all__ = [
    "AUDIO_COLUMN",
    "TEXT_COLUMN",
    "load_asr_dataset",
    "manifest_columns",
    "prepare_dataset",
    "read_librispeech",
    "read_manifest",
]


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------


def read_manifest(
    csv_path: str | Path,
    split: str | None = None,
    include_speakers: Iterable[str] | str | None = None,
    exclude_speakers: Iterable[str] | str | None = None,
    needs_text: bool = True,
) -> Dataset:
    """Read a CSV manifest with columns `path,text[,split,speaker,...]` into a Dataset: the one manifest reader.

    `path` is relative to the CSV's folder (absolute paths are kept) and becomes the absolute `audio` column; all
    other columns are kept. `split` keeps the rows whose `split` column equals it; `include_speakers` /
    `exclude_speakers` filter on the `speaker` column (compared as strings). `needs_text=False` accepts a manifest
    without `text` (audio to transcribe).

    Raises:
        FileNotFoundError: the CSV, or the audio file of a kept row (named with its line), does not exist.
        ValueError: a missing column, a split or speaker that is not in the file, or no rows left.
    """
    csv_path = Path(csv_path).expanduser().resolve()
    if not csv_path.is_file():
        raise FileNotFoundError(f"Manifest not found: {csv_path}")
    text_columns = {MANIFEST_PATH_COLUMN: str, TEXT_COLUMN: str, SPLIT_COLUMN: str, SPEAKER_COLUMN: str}
    # keep_default_na=False: a transcript such as "NA" or "null" stays text instead of becoming NaN.
    frame = pd.read_csv(csv_path, dtype=text_columns, keep_default_na=False)
    required = (MANIFEST_PATH_COLUMN, TEXT_COLUMN) if needs_text else (MANIFEST_PATH_COLUMN,)
    _require_columns(frame.columns, required, str(csv_path))
    if split is not None:
        frame = _select_values(frame, SPLIT_COLUMN, [split], "split", csv_path, keep=True)
    if include_speakers is not None:
        frame = _select_values(frame, SPEAKER_COLUMN, include_speakers, "include_speakers", csv_path, keep=True)
    if exclude_speakers is not None:
        frame = _select_values(frame, SPEAKER_COLUMN, exclude_speakers, "exclude_speakers", csv_path, keep=False)
    if frame.empty:
        raise ValueError(
            f"No rows left in {csv_path} after filtering (split={split!r}, include_speakers={include_speakers!r}, "
            f"exclude_speakers={exclude_speakers!r})"
        )
    audio = _resolve_audio_paths(frame, csv_path)
    frame = frame.drop(columns=MANIFEST_PATH_COLUMN)
    frame.insert(0, AUDIO_COLUMN, audio)
    return Dataset.from_pandas(frame, preserve_index=False)


def manifest_columns(csv_path: str | Path) -> list[str]:
    """The header of a CSV manifest (e.g. to filter on `split` only when the manifest has that column)."""
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise FileNotFoundError(f"Manifest not found: {csv_path}")
    return list(pd.read_csv(csv_path, nrows=0).columns)


def read_librispeech(root: str | Path) -> Dataset:
    """Read a LibriSpeech folder (`speaker/chapter/speaker-chapter.trans.txt` next to `<utterance id>.flac`).

    Returns a Dataset with columns `audio` (absolute path), `text`, `speaker`, `chapter` and `id`, sorted by id.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"LibriSpeech folder not found: {root}")
    transcripts = sorted(root.glob(LIBRISPEECH_TRANSCRIPTS))
    if not transcripts:
        raise ValueError(f"No LibriSpeech transcripts ({LIBRISPEECH_TRANSCRIPTS}) under {root}")
    rows = [row for transcript in transcripts for row in _read_transcript(transcript)]
    return Dataset.from_list(sorted(rows, key=lambda row: row["id"]))


def load_asr_dataset(
    name: str,
    config: str | None = None,
    split: str = "train",
    streaming: bool = False,
    audio_column: str = AUDIO_COLUMN,
    text_column: str = TEXT_COLUMN,
    data_dir: str | Path | None = None,
) -> AnyDataset:
    """Load a `datasets` source (e.g. `"audiofolder"` with `data_dir`, or a Hub dataset when online) for ASR.

    The audio and text columns are renamed to `audio` / `text`, other columns are kept. Audio is never decoded by
    `datasets` (see the module docstring): an `Audio` column of a Hub (Arrow / Parquet) dataset is cast to its
    storage struct, so `audio` holds `{"bytes", "path"}` dicts; folder datasets (audiofolder) yield the absolute path
    of each file. Both go straight to `load_audio`. With `streaming=True` an `IterableDataset` is returned and
    nothing is downloaded or decoded ahead of iteration. Generator-based builders other than folders (e.g.
    webdataset) need torchcodec in datasets>=4 and are not supported.
    """
    data_dir = None if data_dir is None else str(Path(data_dir).expanduser())
    builder = datasets.load_dataset_builder(name, config, data_dir=data_dir)
    folder_based = isinstance(builder, FolderBasedBuilder)
    # Folder builders encode every generated example as `Audio` (torchcodec); read as a stream, the column can be
    # re-typed to the plain path string before anything is encoded.
    dataset = datasets.load_dataset(name, config, split=split, streaming=streaming or folder_based, data_dir=data_dir)
    source = f"{name!r} (config={config!r}, split={split!r})"
    _require_columns(dataset.column_names, (audio_column, text_column), source)
    if folder_based:
        dataset = dataset.cast_column(audio_column, Value("string"))
        if not streaming:
            dataset = Dataset.from_list(list(dataset), features=dataset.features)
    elif isinstance((dataset.features or {}).get(audio_column), Audio):
        dataset = dataset.cast_column(audio_column, AUDIO_STORAGE)
    return _rename_columns(dataset, {audio_column: AUDIO_COLUMN, text_column: TEXT_COLUMN}, source)


# ---------------------------------------------------------------------------------------------------------------
# Whisper features and labels
# ---------------------------------------------------------------------------------------------------------------


def prepare_dataset(
    dataset: AnyDataset,
    processor: Any,
    *,
    max_label_length: int = MAX_LABEL_LENGTH,
    max_audio_seconds: float = MAX_AUDIO_SECONDS,
    augment: Callable[[np.ndarray], np.ndarray] | None = None,
    num_proc: int | None = None,
) -> AnyDataset:
    """Add Whisper's model inputs to every example and drop the ones that are too long.

    Each example gains `input_features` `(num_mel_bins, 3000)` float32 log-mel, `attention_mask` `(3000,)` (1 on
    frames of real audio, 0 on the padding up to 30 s), `labels` (token ids: the tokenizer's prefix
    `<|startoftranscript|>[<|lang|><|task|>]<|notimestamps|>`, the text, `<|endoftext|>`) and `input_length`
    (seconds, after augmentation). Set the language / task of a multilingual tokenizer beforehand with
    `processor.tokenizer.set_prefix_tokens(language=..., task=...)`. Other columns are kept.

    Examples with more than `max_label_length` label tokens or more than `max_audio_seconds` of audio are dropped
    and counted in the log. A `Dataset` is mapped eagerly (with `num_proc` processes; ~1 MB of log-mel per example,
    in memory unless the dataset is file-backed) and formatted to return `input_features` / `attention_mask` as
    numpy arrays; `augment` is then drawn once per example. An `IterableDataset` is mapped and filtered lazily:
    nothing is stored and `augment` runs anew on every pass, so `dataset.to_iterable_dataset()` gives fresh
    augmentation each epoch and no feature cache.

    Args:
        processor: a `WhisperProcessor` (e.g. `WhisperMoEProcessor`).
        augment: optional `(time,) float32 -> (time',) float32` waveform transform, for training data only.
    """
    _check_limits(processor, max_label_length, max_audio_seconds)
    _require_columns(dataset.column_names, (AUDIO_COLUMN, TEXT_COLUMN), "the dataset given to prepare_dataset")
    encode = partial(_encode_example, processor=processor, augment=augment)
    streaming = isinstance(dataset, IterableDataset)
    keep = _LengthFilter(max_label_length, max_audio_seconds, log_each_drop=streaming)
    columns = [AUDIO_COLUMN, "labels", "input_length"]
    if streaming:
        return dataset.map(encode).filter(keep, input_columns=columns)
    encoded = dataset.map(encode, num_proc=num_proc, desc="Log-mel features and labels")
    kept = encoded.filter(keep, input_columns=columns, num_proc=num_proc, desc="Length filter")
    dropped = len(encoded) - len(kept)
    logger.info(
        "prepare_dataset: kept %d of %d examples, dropped %d (labels > %d tokens or audio > %.1f s)",
        len(kept),
        len(encoded),
        dropped,
        max_label_length,
        max_audio_seconds,
    )
    if len(kept) == 0:
        raise ValueError(
            f"prepare_dataset dropped all {dropped} examples: every one has labels > max_label_length="
            f"{max_label_length} tokens or audio > max_audio_seconds={max_audio_seconds}"
        )
    # Arrays instead of nested lists: reading and collating a batch of log-mels gets ~15x faster.
    return kept.with_format("numpy", columns=list(ARRAY_COLUMNS), output_all_columns=True)


def _encode_example(
    example: Mapping[str, Any], processor: Any, augment: Callable[[np.ndarray], np.ndarray] | None
) -> dict[str, Any]:
    """One example -> `input_features` (mels, 3000), `attention_mask` (3000,), `labels` and `input_length` (s)."""
    rate = processor.feature_extractor.sampling_rate
    waveform = load_audio(example[AUDIO_COLUMN], rate)
    if augment is not None:
        waveform = augment(waveform)
    features = processor.feature_extractor(
        waveform, sampling_rate=rate, return_attention_mask=True, return_tensors="np"
    )
    text = example[TEXT_COLUMN].strip()
    labels = processor.tokenizer(LABEL_TEXT_PREFIX + text if text else text).input_ids
    return {
        "input_features": features["input_features"][0],
        "attention_mask": features["attention_mask"][0],
        "labels": labels,
        "input_length": len(waveform) / rate,
    }


@dataclass
class _LengthFilter:
    """Predicate on `(audio, labels, input_length)` that keeps examples Whisper can train on, logging drops."""

    max_label_length: int
    max_audio_seconds: float
    log_each_drop: bool  # INFO per drop (streaming: the only count there is), else DEBUG and a summary
    dropped: int = field(default=0, init=False)

    def __call__(self, audio: Any, labels: list[int], input_length: float) -> bool:
        if len(labels) > self.max_label_length:
            reason = f"{len(labels)} label tokens > max_label_length={self.max_label_length}"
        elif input_length > self.max_audio_seconds:
            reason = f"{input_length:.2f} s of audio > max_audio_seconds={self.max_audio_seconds}"
        else:
            return True
        self.dropped += 1
        level = logging.INFO if self.log_each_drop else logging.DEBUG
        logger.log(
            level, "prepare_dataset: dropped %s (%s); %d dropped so far", _audio_name(audio), reason, self.dropped
        )
        return False


def _check_limits(processor: Any, max_label_length: int, max_audio_seconds: float) -> None:
    window = processor.feature_extractor.chunk_length
    if not 0 < max_audio_seconds <= window:
        raise ValueError(
            f"max_audio_seconds must be in (0, {window}] (the feature extractor's window), got {max_audio_seconds}"
        )
    if max_label_length < 1:
        raise ValueError(f"max_label_length must be a positive number of tokens, got {max_label_length}")


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _require_columns(columns: Iterable[str] | None, required: Iterable[str], source: str) -> None:
    """Raise naming the missing columns of `source`; `columns=None` (a stream of unknown features) passes."""
    if columns is None:
        return
    columns = list(columns)
    missing = [column for column in required if column not in columns]
    if missing:
        raise ValueError(f"{source} has no column(s) {missing}; its columns are {columns}")


def _select_values(
    frame: pd.DataFrame, column: str, values: Iterable[str] | str, flag: str, csv_path: Path, keep: bool
) -> pd.DataFrame:
    """Keep (or drop, `keep=False`) the rows whose `column` is one of `values`; unknown values raise."""
    if column not in frame.columns:
        raise ValueError(f"{flag} needs a {column!r} column, but {csv_path} has only {list(frame.columns)}")
    wanted = {str(values)} if isinstance(values, str) else {str(value) for value in values}
    present = set(frame[column].astype(str))
    unknown = sorted(wanted - present)
    if unknown:
        raise ValueError(
            f"{flag}={sorted(wanted)}: {unknown} not found in column {column!r} of {csv_path}; "
            f"it has {_shorten(sorted(present))}"
        )
    return frame[frame[column].astype(str).isin(wanted) == keep]


def _resolve_audio_paths(frame: pd.DataFrame, csv_path: Path) -> list[str]:
    """Absolute audio paths of the manifest rows; raises naming the lines whose file does not exist."""
    paths = [(csv_path.parent / path).resolve() for path in frame[MANIFEST_PATH_COLUMN]]
    missing = [
        f"line {index + CSV_HEADER_LINES + 1}: {path}" for index, path in zip(frame.index, paths) if not path.is_file()
    ]
    if missing:
        raise FileNotFoundError(f"{len(missing)} audio file(s) of {csv_path} not found: {_shorten(missing)}")
    return [str(path) for path in paths]


def _read_transcript(transcript: Path) -> list[dict[str, str]]:
    rows = []
    for number, line in enumerate(transcript.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        utterance, _, text = line.strip().partition(" ")
        audio = transcript.parent / f"{utterance}{LIBRISPEECH_AUDIO_SUFFIX}"
        if not text:
            raise ValueError(f"{transcript}, line {number}: expected '<utterance id> <text>', got {line!r}")
        if not audio.is_file():
            raise FileNotFoundError(f"{transcript}, line {number}: audio file {audio} not found")
        speaker, chapter = transcript.parent.parent.name, transcript.parent.name
        rows.append({"audio": str(audio), "text": text, "speaker": speaker, "chapter": chapter, "id": utterance})
    return rows


def _rename_columns(dataset: AnyDataset, renames: Mapping[str, str], source: str) -> AnyDataset:
    renames = {old: new for old, new in renames.items() if old != new}
    taken = [new for new in renames.values() if new in (dataset.column_names or [])]
    if taken:
        raise ValueError(f"{source}: cannot rename {list(renames)} to {taken}, a column of that name exists")
    return dataset.rename_columns(renames) if renames else dataset


def _audio_name(audio: Any) -> str:
    if isinstance(audio, Mapping):
        return str(audio.get("path") or "<audio bytes>")
    return str(audio)


def _shorten(items: list[str]) -> str:
    shown = ", ".join(str(item) for item in items[:MAX_NAMED_IN_ERRORS])
    more = len(items) - MAX_NAMED_IN_ERRORS
    return f"{shown} ... and {more} more" if more > 0 else shown


def read_json(path: str | Path, what: str):
    """The JSON document at `path`; `what` names the file in the errors ("Recipe", "WLASL file")."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from error
