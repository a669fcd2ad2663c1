#!/usr/bin/env python
"""WER / CER / real-time-factor evaluation of a Whisper-style model on a CSV manifest.

The model is anything ``pipeline("automatic-speech-recognition", model=PATH, trust_remote_code=True)`` loads;
optionally faster-whisper runs the same checkpoint (CTranslate2 format) as the reference. Decoding is greedy
(one beam, temperature 0, no timestamps). Both hypotheses and references go through Whisper's English text
normaliser before scoring.

    python scripts/evaluate.py --model /tmp/tiny.en --faster-whisper CT2_DIR --output-json tiny.json
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jiwer
import numpy as np

from modeling_whisper_moe.audio import SAMPLING_RATE as SAMPLE_RATE
from modeling_whisper_moe.audio import load_audio

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO_ROOT.parent / "shared" / "data" / "librispeech" / "test-other" / "manifest.csv"

Transcriber = Callable[[list[np.ndarray]], list[str]]


@dataclass
class Utterance:
    path: Path
    text: str
    audio: np.ndarray = field(repr=False)

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass
class SystemResult:
    system: str
    wer: float
    cer: float
    rtf: float
    decode_s: float
    audio_s: float
    utterances: int
    hypotheses: list[str]


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------


def load_manifest(manifest: Path, limit: int | None = None) -> list[Utterance]:
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "text"} <= set(rows[0]):
        raise SystemExit(f"{manifest}: expected a CSV with columns path,text")
    rows = rows[:limit] if limit else rows
    return [
        Utterance(manifest.parent / r["path"], r["text"], load_audio(manifest.parent / r["path"], SAMPLE_RATE))
        for r in rows
    ]


# ---------------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------------


def english_spelling_mapping(model_dir: Path | None) -> tuple[dict[str, str], str]:
    """British->American mapping for Whisper's English normaliser, and where it came from.

    transformers does not ship it: it is the tokenizer folder's ``normalizer.json`` (Hub checkpoints) or
    ``whisper/normalizers/english.json`` of the openai-whisper package. Without either, no spelling mapping is
    applied (the rest of the normalisation still is), identically for every system compared.
    """
    candidates = [model_dir / "normalizer.json"] if model_dir else []
    spec = importlib.util.find_spec("whisper")
    if spec and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "normalizers" / "english.json")
    for candidate in candidates:
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8")), str(candidate)
    return {}, "none"


def make_normalizer(model_dir: Path | None) -> tuple[Callable[[str], str], str]:
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping, source = english_spelling_mapping(model_dir)
    return EnglishTextNormalizer(mapping), source


def error_rates(refs: Sequence[str], hyps: Sequence[str], normalize: Callable[[str], str]) -> tuple[float, float]:
    pairs = [(normalize(r), normalize(h)) for r, h in zip(refs, hyps)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    if not pairs:
        raise SystemExit("no non-empty references to score")
    refs_n, hyps_n = [r for r, _ in pairs], [h for _, h in pairs]
    return jiwer.wer(refs_n, hyps_n), jiwer.cer(refs_n, hyps_n)


# ---------------------------------------------------------------------------------------------------------------
# systems
# ---------------------------------------------------------------------------------------------------------------


def transformers_transcriber(model: str, batch_size: int, language: str | None, device: str) -> Transcriber:
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=model, trust_remote_code=True, device=device)
    generate_kwargs: dict = {"num_beams": 1, "do_sample": False}
    if language and getattr(asr.model.generation_config, "is_multilingual", False):
        generate_kwargs.update(language=language, task="transcribe")

    def transcribe(batch: list[np.ndarray]) -> list[str]:
        inputs = [{"raw": audio, "sampling_rate": SAMPLE_RATE} for audio in batch]
        outputs = asr(inputs, batch_size=batch_size, generate_kwargs=generate_kwargs)
        return [out["text"] for out in outputs]

    return transcribe


def faster_whisper_transcriber(ct2_dir: str, language: str | None, device: str) -> Transcriber:
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

    return transcribe


def run_system(name: str, transcribe: Transcriber, utts: list[Utterance], normalize: Callable) -> SystemResult:
    transcribe([utts[0].audio])  # warm-up, not timed
    start = time.perf_counter()
    hyps = transcribe([u.audio for u in utts])
    elapsed = time.perf_counter() - start
    wer, cer = error_rates([u.text for u in utts], hyps, normalize)
    audio_s = sum(u.duration for u in utts)
    return SystemResult(name, wer, cer, elapsed / audio_s, elapsed, audio_s, len(utts), hyps)


# ---------------------------------------------------------------------------------------------------------------
# reporting / CLI
# ---------------------------------------------------------------------------------------------------------------


def markdown_table(results: Sequence[SystemResult]) -> str:
    lines = [
        "| system | WER % | CER % | RTF | utterances | audio s | decode s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.system} | {100 * r.wer:.2f} | {100 * r.cer:.2f} | {r.rtf:.3f} | {r.utterances} "
            f"| {r.audio_s:.1f} | {r.decode_s:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        required=True,
        action="append",
        help="folder (or Hub id) loadable by the transformers ASR pipeline; repeat to compare several in one run",
    )
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="CSV with columns path,text")
    parser.add_argument("--faster-whisper", metavar="CT2_DIR", help="also run faster-whisper on this checkpoint")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="only the first N utterances")
    parser.add_argument("--language", default="en", help="language for multilingual models ('' to auto-detect)")
    parser.add_argument("--output-json", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    language = args.language or None
    utts = load_manifest(args.manifest, args.limit)
    model_dir = Path(args.model[0]) if Path(args.model[0]).is_dir() else None
    normalize, mapping_source = make_normalizer(model_dir)
    systems: list[tuple[str, Transcriber]] = [
        (f"transformers ({model})", transformers_transcriber(model, args.batch_size, language, args.device))
        for model in args.model
    ]
    if args.faster_whisper:
        fw = faster_whisper_transcriber(args.faster_whisper, language, args.device)
        systems.append((f"faster-whisper ({args.faster_whisper})", fw))
    results = [run_system(name, transcribe, utts, normalize) for name, transcribe in systems]
    print(markdown_table(results))
    if args.output_json:
        report = {
            "manifest": str(args.manifest),
            "references": [u.text for u in utts],
            "paths": [str(u.path) for u in utts],
            "spelling_mapping": mapping_source,
            "results": [asdict(r) for r in results],
        }
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        partial = args.output_json.with_name(args.output_json.name + ".tmp")
        partial.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        partial.replace(args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
