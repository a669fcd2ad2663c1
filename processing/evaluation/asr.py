"""The `asr` task: WER / CER, speed, latency, parameters and FLOPs of Whisper-style models on a manifest or dataset.

Each `--model` is anything `pipeline("automatic-speech-recognition", model=PATH, trust_remote_code=True)` loads
(a dense Whisper or a WhisperMoE folder); optionally faster-whisper runs a CTranslate2 checkpoint as a reference
(`--faster_whisper`). Decoding is greedy (one beam, temperature 0, no timestamps). References and hypotheses go
through Whisper's English text normaliser (`processing.metrics`) before scoring; WER and CER are in percent.

The audio comes from a CSV manifest (columns `path` or `file_name`, and `text`; optional `split` and `speaker`
columns can be filtered on) or from a `datasets` dataset (`--dataset_name`), decoded with the package's own loader.

Efficiency, per system:
  - RTF: decoding wall time over audio duration, batched (`--batch_size`); throughput is its inverse (audio seconds
    transcribed per wall second). A warm-up utterance is decoded first and not timed.
  - latency: mean and 90th percentile wall time per utterance at batch size 1 over `--latency_samples` utterances.
  - parameters: total, and active per token (only the top-k routed experts of each sparse layer; dense: all).
  - forward FLOPs (transformers systems), counted with `torch.utils.flop_counter.FlopCounterMode`: one encoder
    pass over a 30 s window of log-mel features (every utterance is padded to such windows), plus one decoder pass
    over the mean number of decoder tokens of the hypotheses (forced prefix + text + end-of-text), which does the
    same projections as cached step-by-step decoding. Counted: matrix multiplications, convolutions and attention
    (scores and weighted sum, over the full square even where attention is causal); not counted: element-wise ops,
    softmax, normalisation, routing sorts and gathers. FLOPs per second of audio = (mean windows per utterance x
    encoder FLOPs + decoder FLOPs) / mean utterance duration, so on short clips the 30 s padding dominates.

The models run in this interpreter (the FLOP counter needs the modules), not in an isolated one.

    python scripts/evaluate.py --tasks asr --model /tmp/tiny.en --manifest ../shared/data/fsdd/manifest.csv \\
        --split test --output_json fsdd.json --output_md fsdd.md
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_whisper_moe.audio import AudioSource, load_audio
from modeling_whisper_moe.features import SAMPLING_RATE
from modeling_whisper_moe.model_card import count_parameters
from processing.evaluation.common import Evaluator, ModelRef, add_flag, or_default
from processing.metrics import english_normalizer, error_rates, normalized_pairs

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MANIFEST = REPO_ROOT.parent / "shared" / "data" / "librispeech" / "test-other" / "manifest.csv"
DEFAULT_BATCH_SIZE = 8
DEFAULT_LATENCY_SAMPLES = 5
DEFAULT_DATASET_SPLIT = "test"
LATENCY_PERCENTILE = 90
PATH_COLUMNS = ("path", "file_name")  # our manifests use `path`; audiofolder's metadata.csv uses `file_name`
TEXT_COLUMN = "text"
SPLIT_COLUMN = "split"
SPEAKER_COLUMN = "speaker"
TORCHCODEC_HINT = (
    " (datasets {version} needs torchcodec to build a dataset from audio files, e.g. audiofolder; pass the"
    " folder's metadata.csv as --manifest instead: its file_name column is read as the audio path)"
)
MS_PER_S = 1000.0
GIGA = 1e9
MEGA = 1e6

Transcriber = Callable[[list[np.ndarray]], list[str]]
Row = dict[str, Any]


@dataclass
class Utterance:
    id: str
    text: str
    audio: np.ndarray = field(repr=False)

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLING_RATE


@dataclass
class System:
    name: str
    transcribe: Transcriber
    asr: Any = None  # the transformers pipeline, for parameter and FLOP counts; None for faster-whisper


@dataclass
class SystemResult:
    system: str
    wer: float  # percent
    cer: float  # percent
    scored_utterances: int  # utterances whose reference is not empty after normalisation
    rtf: float
    throughput: float  # audio seconds per wall second
    decode_s: float
    audio_s: float
    utterances: int
    latency: dict[str, float]
    parameters: dict[str, int] | None
    flops: dict[str, float] | None
    hypotheses: list[str]


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


def read_manifest(manifest: Path) -> list[Row]:
    """The rows of a CSV manifest, with the audio path resolved against the manifest's folder."""
    if not manifest.is_file():
        raise SystemExit(f"--manifest {manifest}: file not found")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column is None or TEXT_COLUMN not in columns:
        raise SystemExit(
            f"--manifest {manifest}: expected a CSV with a {' or '.join(PATH_COLUMNS)} column and a "
            f"{TEXT_COLUMN} column, got {sorted(columns) or 'no rows'}"
        )
    for row in rows:
        row["_audio"] = manifest.parent / row[path_column]
        row["_id"] = row[path_column]
    return rows


def _column_values(rows: Sequence[Row], column: str, flag: str, source: str) -> list[str]:
    if rows and column not in rows[0]:
        columns = sorted(key for key in rows[0] if not key.startswith("_"))  # `_audio`, `_id`, `_index` are ours
        raise SystemExit(f"{flag}: {source} has no '{column}' column (columns: {', '.join(columns)})")
    return [str(row[column]) for row in rows]


def _check_known(wanted: Iterable[str], available: Iterable[str], flag: str, source: str) -> None:
    known = sorted(set(available))
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"{flag}: {', '.join(unknown)} not in {source} (available: {', '.join(known)})")


def filter_rows(
    rows: list[Row], source: str, split: str | None, speakers: list[str] | None, exclude: list[str] | None
) -> list[Row]:
    """Rows of `split` (a `split` column) spoken by `speakers` and not by `exclude` (a `speaker` column)."""
    if split:
        splits = _column_values(rows, SPLIT_COLUMN, "--split", source)
        _check_known([split], splits, "--split", source)
        rows = [row for row, value in zip(rows, splits) if value == split]
    for flag, chosen, keep in (("--speakers", speakers, True), ("--exclude_speakers", exclude, False)):
        if chosen:
            voices = _column_values(rows, SPEAKER_COLUMN, flag, source)
            _check_known(chosen, voices, flag, source)
            rows = [row for row, voice in zip(rows, voices) if (voice in chosen) == keep]
    if not rows:
        raise SystemExit(f"{source}: no utterances left after --split/--speakers/--exclude_speakers")
    return rows


def open_dataset(args: argparse.Namespace) -> Any:
    """`--dataset_name` with its audio column left encoded ({"path", "bytes"}): datasets' decoder needs torchcodec."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    try:
        dataset = datasets.load_dataset(
            args.dataset_name, args.dataset_config, split=args.dataset_split, data_dir=args.data_dir
        )
    except (ImportError, DatasetGenerationError) as error:
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        hint = TORCHCODEC_HINT.format(version=datasets.__version__) if isinstance(cause, ImportError) else ""
        raise SystemExit(f"--dataset_name {args.dataset_name}: {type(cause).__name__}: {cause}{hint}") from error
    except ValueError as error:  # unknown split, configuration or data_dir
        raise SystemExit(
            f"--dataset_name {args.dataset_name} --dataset_split {args.dataset_split}: {error}"
        ) from error
    for flag, column in (("--audio_column", args.audio_column), ("--text_column", args.text_column)):
        if column not in dataset.column_names:
            raise SystemExit(f"{flag} {column}: not a column of {args.dataset_name} ({dataset.column_names})")
    return dataset.cast_column(args.audio_column, datasets.Audio(decode=False))


def dataset_rows(dataset: Any, audio_column: str, text_column: str) -> list[Row]:
    """The dataset's rows without their audio, each knowing its index; the reference text under `text`."""
    rows = dataset.remove_columns(audio_column).to_list()
    for index, row in enumerate(rows):
        row[TEXT_COLUMN] = row[text_column]
        row["_index"] = index
    return rows


def decode_rows(rows: Sequence[Row], dataset: Any = None, audio_column: str | None = None) -> list[Utterance]:
    """Utterances with 16 kHz mono audio: from each row's `_audio` path, or from `dataset[_index][audio_column]`."""
    utterances = []
    for row in tqdm(rows, desc="loading audio", unit="clip"):
        if dataset is None:
            source: AudioSource = row["_audio"]
            name = str(row["_id"])
        else:
            source = dataset[row["_index"]][audio_column]
            name = str(source.get("path") or f"{audio_column}[{row['_index']}]")
        utterances.append(Utterance(name, str(row[TEXT_COLUMN]), load_audio(source, SAMPLING_RATE)))
    return utterances


def load_utterances(args: argparse.Namespace) -> list[Utterance]:
    """The utterances of `--manifest` or `--dataset_name`, filtered, then limited to the first `--limit`."""
    filters = (args.split, args.speakers, args.exclude_speakers)
    if args.dataset_name:
        dataset = open_dataset(args)
        source = f"--dataset_name {args.dataset_name} (split {args.dataset_split})"
        rows = filter_rows(dataset_rows(dataset, args.audio_column, args.text_column), source, *filters)
        return decode_rows(rows[: args.limit], dataset, args.audio_column)
    rows = filter_rows(read_manifest(args.manifest), str(args.manifest), *filters)
    return decode_rows(rows[: args.limit])


# ---------------------------------------------------------------------------------------------------------------
# systems
# ---------------------------------------------------------------------------------------------------------------


def transformers_system(model: ModelRef, batch_size: int, language: str | None, device: str) -> System:
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=model.path, trust_remote_code=True, device=device)
    generate_kwargs: dict[str, Any] = {"num_beams": 1, "do_sample": False}
    if language and getattr(asr.model.generation_config, "is_multilingual", False):
        generate_kwargs.update(language=language, task="transcribe")

    def transcribe(batch: list[np.ndarray]) -> list[str]:
        inputs = [{"raw": audio, "sampling_rate": SAMPLING_RATE} for audio in batch]
        outputs = asr(inputs, batch_size=batch_size, generate_kwargs=generate_kwargs)
        return [out["text"] for out in outputs]

    return System(f"transformers ({model.name})", transcribe, asr)


def faster_whisper_system(ct2_dir: str, language: str | None, device: str) -> System:
    from faster_whisper import WhisperModel

    fw_device = "cuda" if device.startswith("cuda") else "cpu"
    model = WhisperModel(ct2_dir, device=fw_device, compute_type="default", cpu_threads=os.cpu_count() or 0)
    options = dict(
        beam_size=1,
        best_of=1,
        temperature=0.0,
        without_timestamps=True,
        condition_on_previous_text=False,
        vad_filter=False,
        language=language if model.model.is_multilingual else None,
    )

    def transcribe(batch: list[np.ndarray]) -> list[str]:
        results = []
        for audio in batch:
            segments, _ = model.transcribe(audio, **options)
            results.append("".join(segment.text for segment in segments))
        return results

    return System(f"faster-whisper ({ct2_dir})", transcribe)


# ---------------------------------------------------------------------------------------------------------------
# efficiency
# ---------------------------------------------------------------------------------------------------------------


def decode_all(system: System, utts: Sequence[Utterance], batch_size: int) -> tuple[list[str], float]:
    """Hypotheses for all utterances, in batches under a progress bar, and the decoding wall time in seconds."""
    hypotheses: list[str] = []
    elapsed = 0.0
    batches = [utts[i : i + batch_size] for i in range(0, len(utts), batch_size)]
    for batch in tqdm(batches, desc=system.name, unit="batch"):
        start = time.perf_counter()
        hypotheses += system.transcribe([u.audio for u in batch])
        elapsed += time.perf_counter() - start
    return hypotheses, elapsed


def measure_latency(system: System, utts: Sequence[Utterance], samples: int) -> dict[str, float]:
    """Mean and p90 wall time (ms) per utterance at batch size 1 over the first `samples` utterances."""
    times = []
    for utt in utts[:samples]:
        start = time.perf_counter()
        system.transcribe([utt.audio])
        times.append(MS_PER_S * (time.perf_counter() - start))
    if not times:
        return {"samples": 0, "mean_ms": math.nan, f"p{LATENCY_PERCENTILE}_ms": math.nan}
    return {
        "samples": len(times),
        "mean_ms": float(np.mean(times)),
        f"p{LATENCY_PERCENTILE}_ms": float(np.percentile(times, LATENCY_PERCENTILE)),
    }


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters and those active per token (dense models have no `.mlp.experts.`, so active == total)."""
    total, active = count_parameters(model)
    return {"total": total, "active": active}


def _sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _count_flops(run: Callable[[], Any]) -> tuple[int, Any]:
    """FLOPs of `run()` and its result; the CPU flash-attention kernel is counted like the CUDA ones."""
    from torch.utils.flop_counter import FlopCounterMode

    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        result = run()
    return counter.get_total_flops(), result


def mean_decoder_tokens(tokenizer: Any, hypotheses: Sequence[str]) -> float:
    """Mean decoder length: the tokenizer's forced prefix + text tokens + end-of-text of each hypothesis."""
    return float(np.mean([len(tokenizer(hypothesis).input_ids) for hypothesis in hypotheses]))


def forward_flops(asr: Any, utts: Sequence[Utterance], hypotheses: Sequence[str]) -> dict[str, float]:
    """Forward GFLOPs: encoder per 30 s window, decoder per utterance, and per second of audio (module docstring)."""
    model, extractor = asr.model, asr.feature_extractor
    features = extractor(utts[0].audio, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
    features = features.to(model.device, model.dtype)  # (1, num_mel_bins, 3000): one 30 s window
    encoder_flops, encoded = _count_flops(lambda: model.get_encoder()(features).last_hidden_state)
    tokens = mean_decoder_tokens(asr.tokenizer, hypotheses)
    start_id = model.config.decoder_start_token_id
    decoder_ids = torch.full((1, max(1, round(tokens))), start_id, dtype=torch.long, device=model.device)
    decoder_flops, _ = _count_flops(
        lambda: model(encoder_outputs=(encoded,), decoder_input_ids=decoder_ids, use_cache=False)
    )
    windows = float(np.mean([max(1, math.ceil(u.duration / extractor.chunk_length)) for u in utts]))
    per_utterance = windows * encoder_flops + decoder_flops
    return {
        "encoder_gflops_per_window": encoder_flops / GIGA,
        "window_s": float(extractor.chunk_length),
        "mean_windows_per_utterance": windows,
        "mean_decoder_tokens": tokens,
        "decoder_gflops_per_utterance": decoder_flops / GIGA,
        "gflops_per_utterance": per_utterance / GIGA,
        "gflops_per_audio_s": per_utterance / GIGA / float(np.mean([u.duration for u in utts])),
    }


# ---------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------


def run_system(
    system: System, utts: list[Utterance], normalize: Callable[[str], str], batch_size: int, latency_samples: int
) -> SystemResult:
    system.transcribe([utts[0].audio])  # warm-up, not timed
    hypotheses, elapsed = decode_all(system, utts, batch_size)
    references = [u.text for u in utts]
    rates = error_rates(references, hypotheses, normalize)
    scored = len(normalized_pairs(references, hypotheses, normalize)[0])
    audio_s = sum(u.duration for u in utts)
    latency = measure_latency(system, utts, latency_samples)
    model = system.asr.model if system.asr is not None else None
    return SystemResult(
        system=system.name,
        wer=rates["wer"],
        cer=rates["cer"],
        scored_utterances=scored,
        rtf=elapsed / audio_s,
        throughput=audio_s / elapsed,
        decode_s=elapsed,
        audio_s=audio_s,
        utterances=len(utts),
        latency=latency,
        parameters=parameter_counts(model) if model is not None else None,
        flops=forward_flops(system.asr, utts, hypotheses) if model is not None else None,
        hypotheses=hypotheses,
    )


# ---------------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------------


def _or_dash(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(report: dict) -> str:
    """One row per system of an `asr` report."""
    p90 = f"p{LATENCY_PERCENTILE}_ms"
    lines = [
        f"| system | WER % | CER % | RTF | audio s / s | latency ms (mean / p{LATENCY_PERCENTILE}) "
        "| params M (total / active) | GFLOPs / audio s | utterances | audio s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (SystemResult(**result) for result in report["results"]):
        total = r.parameters["total"] / MEGA if r.parameters else None
        active = r.parameters["active"] / MEGA if r.parameters else None
        flops = r.flops["gflops_per_audio_s"] if r.flops else None
        lines.append(
            f"| {r.system} | {r.wer:.2f} | {r.cer:.2f} | {r.rtf:.3f} | {r.throughput:.1f} "
            f"| {_or_dash(r.latency['mean_ms'], '.0f')} / {_or_dash(r.latency[p90], '.0f')} "
            f"| {_or_dash(total, '.1f')} / {_or_dash(active, '.1f')} "
            f"| {_or_dash(flops, '.1f')} | {r.utterances} | {r.audio_s:.1f} |"
        )
    return "\n".join(lines)


def build_report(
    args: argparse.Namespace, utts: Sequence[Utterance], spelling: str, batch_size: int, results: list
) -> dict:
    if args.dataset_name:
        source = {k: getattr(args, k) for k in ("dataset_name", "dataset_config", "dataset_split", "data_dir")}
    else:
        source = {"manifest": str(args.manifest)}
    return {
        "source": source,
        "filters": {"split": args.split, "speakers": args.speakers, "exclude_speakers": args.exclude_speakers},
        "limit": args.limit,
        "batch_size": batch_size,
        "device": args.device,
        "normalizer": {"name": "whisper EnglishTextNormalizer", "spelling_mapping": spelling},
        "units": {"wer": "percent", "cer": "percent", "latency": "ms", "flops": "GFLOPs"},
        "utterances": len(utts),
        "audio_s": sum(u.duration for u in utts),
        "paths": [u.id for u in utts],
        "references": [u.text for u in utts],
        "results": [asdict(r) for r in results],
    }


# ---------------------------------------------------------------------------------------------------------------
# the evaluator
# ---------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("asr: data")
    add_flag(data, "--manifest", type=Path, help=f"CSV with columns path (or file_name),text [{DEFAULT_MANIFEST}]")
    add_flag(data, "--dataset_name", help="instead of --manifest: a `datasets` name or folder (e.g. parquet)")
    add_flag(data, "--dataset_config", help="configuration name for --dataset_name")
    add_flag(data, "--dataset_split", default=DEFAULT_DATASET_SPLIT, help="split of --dataset_name")
    add_flag(data, "--data_dir", help="data_dir for --dataset_name (e.g. with audiofolder or parquet)")
    add_flag(data, "--audio_column", default="audio", help="audio column of --dataset_name")
    add_flag(data, "--text_column", default=TEXT_COLUMN, help="reference text column of --dataset_name")
    add_flag(data, "--split", help=f"keep rows whose '{SPLIT_COLUMN}' column equals this (e.g. FSDD's test)")
    add_flag(data, "--speakers", nargs="+", metavar="SPEAKER", help=f"keep only these '{SPEAKER_COLUMN}' values")
    add_flag(data, "--exclude_speakers", nargs="+", metavar="SPEAKER", help="drop these speakers")
    run = parser.add_argument_group("asr: decoding and measurement")
    add_flag(run, "--latency_samples", type=int, default=DEFAULT_LATENCY_SAMPLES, help="utterances timed at batch 1")
    add_flag(run, "--language", default="en", help="language for multilingual models ('' to auto-detect)")
    add_flag(run, "--device", default="cpu", help="cpu, cuda, cuda:0, ...")


def check_args(args: argparse.Namespace) -> None:
    """Fail early, naming the flag, on inputs that cannot work; fills in the default manifest."""
    if args.manifest and args.dataset_name:
        raise SystemExit("--manifest and --dataset_name are alternatives; pass one")
    if not args.dataset_name:
        args.manifest = args.manifest or DEFAULT_MANIFEST
        if not args.manifest.is_file():
            raise SystemExit(f"--manifest {args.manifest}: file not found")
    if args.latency_samples < 0:
        raise SystemExit(f"--latency_samples must be 0 or more, got {args.latency_samples}")
    for model in args.model:
        folder = Path(model.path).expanduser()
        if folder.exists() and not (folder / "config.json").is_file():
            raise SystemExit(f"--model {model.path}: no config.json in this folder; is it a transformers model?")
        if not folder.exists() and model.path.startswith((".", "/", "~")):
            raise SystemExit(f"--model {model.path}: folder not found")
    if args.faster_whisper and not (Path(args.faster_whisper) / "model.bin").is_file():
        raise SystemExit(f"--faster_whisper {args.faster_whisper}: no model.bin; expected a CTranslate2 folder")


def build_systems(models: Sequence[ModelRef], args: argparse.Namespace, batch_size: int) -> Iterator[System]:
    """The systems to compare, loaded one at a time."""
    language = args.language or None
    for model in models:
        yield transformers_system(model, batch_size, language, args.device)
    if args.faster_whisper:
        yield faster_whisper_system(args.faster_whisper, language, args.device)


def evaluate(models: Sequence[ModelRef], args: argparse.Namespace) -> dict:
    """Every model (and faster-whisper) on the same utterances: the report `build_report` describes."""
    batch_size = or_default(args.batch_size, DEFAULT_BATCH_SIZE)
    utts = load_utterances(args)
    model_dir = Path(models[0].path) if Path(models[0].path).is_dir() else None
    normalize = english_normalizer(model_dir)
    systems = build_systems(models, args, batch_size)
    results = [run_system(system, utts, normalize, batch_size, args.latency_samples) for system in systems]
    return build_report(args, utts, normalize.spelling_mapping_source, batch_size, results)


EVALUATOR = Evaluator.of_module(
    __name__,
    "asr",
    "WER / CER (Whisper's English normaliser), RTF, latency, parameters, FLOPs on --manifest",
    markdown=markdown_table,
)
