"""Transcribe every row of a CSV manifest to JSON lines, resumably, split over processes (`transcribe-manifest`).

Each finished row is appended to the output and flushed to disk at once, so a crash loses at most the rows being
decoded. A restart reads what the output already holds (a torn last line, left by a crash mid-write, is cut off)
and decodes only the other rows. Under `accelerate launch` (or torchrun) rank r of w takes rows r, r + w, ...,
appends them to its own shard beside the output, and once every rank is done rank 0 merges the shards into the
output in manifest order, written atomically.
"""

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from modeling_whisper_moe.audio import load_audio
from modeling_whisper_moe.hub import atomic_write
from processing.data import AUDIO_COLUMN, read_manifest

logger = logging.getLogger(__name__)

INDEX_KEY = "index"  # a record's row in the manifest (0 = first row after the header): what a restart matches on
Record = dict  # {"index": int, "audio": absolute path, "text": transcript}


def shard_path(output: Path, rank: int, world_size: int) -> Path:
    """The file rank `rank` of `world_size` appends its rows to, beside `output`."""
    return output.with_name(f"{output.stem}.rank{rank}-of-{world_size}{output.suffix}")


def read_records(path: Path) -> dict[int, Record]:
    """The records a JSON-lines file holds, by index; a torn last line (no newline: a crash mid-write) is cut off
    the file, so that appending goes on from the last whole record.

    Raises:
        ValueError: a complete line that is not a record (the file is not one this command wrote).
    """
    if not path.is_file():
        return {}
    data = path.read_bytes()
    *lines, torn = data.split(b"\n")
    records = {}
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            records[int(record[INDEX_KEY])] = record
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}, line {number} is not a transcription record ({error}): {line[:80]!r}") from None
    if torn:
        logger.warning("%s: dropping a torn last line of %d bytes (an interrupted write); it is decoded again",
                       path, len(torn))  # fmt: skip
        with open(path, "r+b") as file:
            file.truncate(len(data) - len(torn))
    return records


def check_records(records: dict[int, Record], audio: list[str], path: Path) -> None:
    """Raise when a record of `path` names other audio than the manifest's row of its index (another manifest)."""
    for index, record in records.items():
        if index >= len(audio) or record.get("audio") != audio[index]:
            expected = audio[index] if index < len(audio) else f"no row (the manifest has {len(audio)})"
            raise ValueError(
                f"{path} holds row {index} for {record.get('audio')!r}, but the manifest's row {index} is {expected}: "
                "it was written for another manifest; choose another output file."
            )


def transcribe_manifest(
    asr: Callable,
    manifest: str | os.PathLike,
    output: str | os.PathLike,
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    generate_kwargs: dict | None = None,
) -> list[int]:
    """Transcribe this rank's rows of `manifest` that `output` (and this rank's shard) do not hold yet, with the ASR
    pipeline `asr` (`generate_kwargs` passed on), appending one record per row as it finishes. Returns the indices
    decoded by this call.

    With `world_size` 1 the records go straight into `output`; otherwise into `shard_path(output, rank, world_size)`,
    which `merge_shards` joins.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}.")
    output = Path(output)
    audio = read_manifest(manifest, needs_text=False)[AUDIO_COLUMN]
    target = output if world_size == 1 else shard_path(output, rank, world_size)
    done = {}
    for path in dict.fromkeys([output, target]):
        records = read_records(path)
        check_records(records, audio, path)
        done.update(records)
    mine = range(rank, len(audio), world_size)
    todo = [index for index in mine if index not in done]
    rate = asr.feature_extractor.sampling_rate
    with (
        open(target, "a", encoding="utf-8") as sink,
        tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"rank {rank}", disable=not progress) as bar,
    ):
        waveforms = ({"raw": load_audio(audio[index], rate), "sampling_rate": rate} for index in todo)
        results = asr(waveforms, batch_size=batch_size, generate_kwargs=generate_kwargs or {}) if todo else []
        for index, result in zip(todo, results):
            record = {INDEX_KEY: index, "audio": audio[index], "text": result["text"].strip()}
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            bar.update()
    return todo


def merge_shards(manifest: str | os.PathLike, output: str | os.PathLike, world_size: int) -> None:
    """Join the `world_size` shards (and what `output` held before) into `output`, one record per row of `manifest`
    in row order, written atomically; then delete the shards.

    Raises:
        RuntimeError: rows that no shard holds (a rank that has not finished).
    """
    output = Path(output)
    audio = read_manifest(manifest, needs_text=False)[AUDIO_COLUMN]
    records = {}
    for path in [output] + [shard_path(output, rank, world_size) for rank in range(world_size)]:
        shard = read_records(path)
        check_records(shard, audio, path)
        records.update(shard)
    missing = sorted(set(range(len(audio))) - set(records))
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(audio)} rows are in no shard of {output} (first: {missing[:5]}).")
    with atomic_write(output) as temporary:
        temporary.write_text("".join(_lines(records)), encoding="utf-8")
    for rank in range(world_size):
        shard_path(output, rank, world_size).unlink(missing_ok=True)


def _lines(records: dict[int, Record]) -> Iterator[str]:
    for index in sorted(records):
        yield json.dumps(records[index], ensure_ascii=False) + "\n"
