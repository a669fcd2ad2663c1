"""`whisper-moe transcribe-manifest`: every row exactly once after a crash and a restart, torn last lines repaired,
and the rows split over two `accelerate launch` processes whose shards rank 0 merges."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from processing.manifest_transcription import merge_shards, read_records, shard_path, transcribe_manifest

ROWS = 6  # the shortest test-other utterances (1.7-2.9 s): a restart's worth of rows at unit-test cost
POLL_S = 0.05  # how often the test looks at the output of the run it kills


@pytest.fixture(scope="module")
def manifest(data_dir, tmp_path_factory) -> Path:
    """A CSV of ROWS test-other clips with a path column only (no reference text: audio to transcribe)."""
    source = data_dir / "librispeech/test-other"
    with open(source / "manifest.csv", newline="", encoding="utf-8") as file:
        rows = sorted(csv.DictReader(file), key=lambda row: float(row["duration_s"]))[:ROWS]
    path = tmp_path_factory.mktemp("manifest") / "clips.csv"
    path.write_text("path\n" + "".join(f"{source / row['path']}\n" for row in rows), encoding="utf-8")
    return path


class CrashAfter:
    """An ASR pipeline stand-in that names each clip by its length and raises after `rows` results: a crash."""

    class feature_extractor:  # noqa: N801 - the pipeline attribute transcribe_manifest reads
        sampling_rate = 16000

    def __init__(self, rows: int | None):
        self.rows = rows

    def __call__(self, waveforms, batch_size: int, generate_kwargs: dict):
        for count, waveform in enumerate(waveforms):
            if count == self.rows:
                raise RuntimeError("simulated crash")
            yield {"text": f"{len(waveform['raw'])} samples"}


def test_a_crash_loses_no_finished_row_and_a_restart_decodes_each_row_once(manifest, tmp_path):
    output = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="simulated crash"):
        transcribe_manifest(CrashAfter(2), manifest, output, progress=False)
    assert sorted(read_records(output)) == [0, 1]
    with open(output, "a", encoding="utf-8") as file:  # a crash in the middle of writing row 2
        file.write('{"index": 2, "audio": "')
    decoded = transcribe_manifest(CrashAfter(None), manifest, output, progress=False)
    assert decoded == [2, 3, 4, 5]
    lines = output.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(ROWS))
    assert transcribe_manifest(CrashAfter(0), manifest, output, progress=False) == []  # all done: nothing decoded


def test_shards_merge_in_manifest_order(manifest, tmp_path):
    output = tmp_path / "out.jsonl"
    for rank in (1, 0):
        transcribe_manifest(CrashAfter(None), manifest, output, rank=rank, world_size=2, progress=False)
    assert sorted(read_records(shard_path(output, 1, 2))) == [1, 3, 5]
    merge_shards(manifest, output, world_size=2)
    assert [json.loads(line)["index"] for line in output.read_text().splitlines()] == list(range(ROWS))
    assert not shard_path(output, 0, 2).exists() and not shard_path(output, 1, 2).exists()


def test_unfinished_shards_and_foreign_outputs_raise(manifest, tmp_path):
    output = tmp_path / "out.jsonl"
    transcribe_manifest(CrashAfter(None), manifest, output, rank=0, world_size=2, progress=False)
    with pytest.raises(RuntimeError, match="3 of 6 rows are in no shard"):
        merge_shards(manifest, output, world_size=2)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"index": 0, "audio": "/elsewhere/a.flac", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="written for another manifest"):
        transcribe_manifest(CrashAfter(None), manifest, foreign, progress=False)
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1 is not a transcription record"):
        read_records(garbled)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        transcribe_manifest(CrashAfter(None), manifest, output, batch_size=0)


def _cli(*arguments: object) -> list[str]:
    return [sys.executable, "-m", "processing", "transcribe-manifest", *map(str, arguments), "--no-progress"]


def _environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def killed_and_restarted(tiny_en_moe, manifest, tmp_path_factory) -> dict:
    """The CLI on real weights, SIGKILLed once the output holds a row, then run again to the end."""
    output = tmp_path_factory.mktemp("killed") / "out.jsonl"
    run = subprocess.Popen(_cli(tiny_en_moe, manifest, output), env=_environment(), stderr=subprocess.DEVNULL)
    while run.poll() is None and len(read_records(output)) < 1:
        time.sleep(POLL_S)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    rows_at_kill = len(read_records(output))
    restart = subprocess.run(_cli(tiny_en_moe, manifest, output, "--batch-size", 2), env=_environment(),
                             capture_output=True, text=True, timeout=900)  # fmt: skip
    assert restart.returncode == 0, restart.stderr[-3000:]
    lines = output.read_text(encoding="utf-8").splitlines()
    return {"rows_at_kill": rows_at_kill, "records": [json.loads(line) for line in lines], "log": restart.stderr}


@pytest.mark.slow
def test_killed_cli_restarts_to_every_row_exactly_once(killed_and_restarted):
    assert 1 <= killed_and_restarted["rows_at_kill"] < ROWS  # killed halfway, not after the end
    records = killed_and_restarted["records"]
    assert sorted(record["index"] for record in records) == list(range(ROWS))
    decoded = ROWS - killed_and_restarted["rows_at_kill"]
    assert f"decoded {decoded} rows" in killed_and_restarted["log"]
    assert "so silly" in " ".join(record["text"] for record in records).lower()  # real speech, real weights


@pytest.mark.slow
def test_two_accelerate_processes_split_the_rows_and_merge(tiny_en_moe, manifest, killed_and_restarted, tmp_path):
    output = tmp_path / "out.jsonl"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "processing"]
    command = launch + _cli(tiny_en_moe, manifest, output, "--batch-size", 2, "--device", "cpu")[3:]
    proc = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 of 2: decoded 3 rows" in proc.stderr and "rank 1 of 2: decoded 3 rows" in proc.stderr
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    single = killed_and_restarted["records"]
    assert [record["index"] for record in records] == list(range(ROWS))
    assert [record["text"] for record in records] == [record["text"] for record in sorted(single, key=_index)]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.jsonl"]  # shards merged and deleted


def _index(record: dict) -> int:
    return record["index"]
