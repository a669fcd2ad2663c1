#!/usr/bin/env python
"""Score multi-task and single-task folders from `scripts/train_multitask.py` on every task each was trained for,
from the saved folders with this package not importable, and print one table.

    python scripts/evaluate_multitask.py --model multitask=outputs/multitask-digits --model asr=outputs/single-asr \
        --model translation=outputs/single-translation --model tts=outputs/single-tts \
        [--num_sequences 100] [--output-json results/multitask-digits.json]

- asr: digit error rate (WER over the digits and digit words of the transcript) on FSDD's `test` split (real
  recordings, never trained on), and on held-out 4-digit sequences spoken whole by an espeak-ng voice no model heard
  in training (`--unseen_voice`); greedy, through the ASR pipeline.
- translation: BLEU and chrF on the held-out Tatoeba pairs (`scripts/evaluate_translation.py`).
- tts: Whisper base's digit WER on held-out 4-digit sequences the model speaks (`scripts/evaluate_tts.py`,
  Whisper's temperature fallback).

Per-task reports go to a folder next to the JSON (`<output stem>/`).
"""

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from modeling_whisper_moe.hub import atomic_directory  # noqa: E402
from modeling_whisper_moe.pipeline_text_to_audio import write_audio  # noqa: E402
from modeling_whisper_moe.vocoder import SAMPLING_RATE  # noqa: E402
from processing.tts_data import digits_to_words, espeak, held_out_sequences  # noqa: E402
from scripts import evaluate_translation, evaluate_tts  # noqa: E402
from scripts.evaluate_tts import digit_wer, to_digits  # noqa: E402
from scripts.isolation import run_isolated  # noqa: E402

FSDD_MANIFEST = REPO_ROOT.parent / "shared" / "data" / "fsdd" / "manifest.csv"
UNSEEN_VOICE = "en-gb-x-rp"  # no recipe trains on it
UNSEEN_SPEED, UNSEEN_PITCH = 165, 50
ASR_TIMEOUT_S = 1800

TRANSCRIBE_SCRIPT = """
import json, sys, time
from transformers import pipeline

folder, paths = sys.argv[1], json.load(open(sys.argv[2]))
asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
started = time.perf_counter()
outputs = asr(paths, batch_size=16, generate_kwargs={"language": "en", "max_new_tokens": 32})
result = {"texts": [o["text"] for o in outputs], "seconds": time.perf_counter() - started,
          "model": type(asr.model).__name__}
"""


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER", help="repeatable")
    parser.add_argument("--num_sequences", type=int, default=100, help="held-out digit sequences (tts, unseen voice)")
    parser.add_argument("--translation_pairs", type=int, default=None, help="score only the first N held-out pairs")
    parser.add_argument("--unseen_voice", default=UNSEEN_VOICE, help="espeak-ng voice for the unseen-voice ASR test")
    parser.add_argument("--output-json", default=str(REPO_ROOT / "results" / "multitask-digits.json"))
    args = parser.parse_args(argv)
    args.models = {}
    for entry in args.model:
        name, sep, folder = entry.partition("=")
        if not sep or not name or not (Path(folder) / "training_record.json").is_file():
            raise SystemExit(f"--model {entry}: expected NAME=FOLDER, a folder saved by scripts/train_multitask.py")
        args.models[name] = Path(folder)
    return args


def transcribe(folder: Path, paths: list[str], workdir: Path) -> dict:
    listing = workdir / "paths.json"
    listing.write_text(json.dumps(paths), encoding="utf-8")
    output = run_isolated(TRANSCRIBE_SCRIPT, folder.resolve(), listing, cwd=workdir, timeout=ASR_TIMEOUT_S)
    if output["leaked"]:
        raise RuntimeError(f"{folder} imported this package instead of its own code: {output['leaked']}")
    return output


def asr_scores(folder: Path, test_sets: dict[str, tuple[list[str], list[str]]], workdir: Path) -> dict:
    """{test set: digit error rate, exact-match rate, examples} for the folder's ASR pipeline."""
    scores = {}
    for name, (paths, references) in test_sets.items():
        output = transcribe(folder, paths, workdir)
        hypotheses = [to_digits(text) for text in output["texts"]]
        scores[name] = {
            "digit_error_rate": round(digit_wer(references, hypotheses), 4),
            "exact_match": round(sum(r == h for r, h in zip(references, hypotheses)) / len(references), 4),
            "clips": len(paths),
            "seconds": round(output["seconds"], 1),
            "examples": [
                {"path": p, "reference": r, "transcript": t} for p, r, t in zip(paths, references, output["texts"])
            ][:20],  # fmt: skip
        }
        print(f"  asr {name}: digit error rate {100 * scores[name]['digit_error_rate']:.1f} %")
    return scores


def asr_test_sets(num_sequences: int, voice: str, workdir: Path) -> dict[str, tuple[list[str], list[str]]]:
    """FSDD's test recordings, and held-out 4-digit sequences spoken whole in `voice`: (paths, digit references)."""
    with open(FSDD_MANIFEST, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "test"]
    fsdd = ([str(FSDD_MANIFEST.parent / row["path"]) for row in rows], [to_digits(row["text"]) for row in rows])
    sequences = held_out_sequences(num_sequences, seed=1)
    paths = []
    for index, digits in enumerate(sequences):
        audio = espeak(digits_to_words(digits), voice, UNSEEN_SPEED, UNSEEN_PITCH)
        paths.append(str(write_audio(workdir / f"unseen-{index:03d}.wav", audio, SAMPLING_RATE)))
    return {"fsdd_test": fsdd, f"unseen_voice_{voice}": (paths, [" ".join(digits) for digits in sequences])}


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    output = Path(args.output_json)
    details = output.with_suffix("")
    report = {"unseen_voice": args.unseen_voice, "num_sequences": args.num_sequences, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        test_sets = None
        for name, folder in args.models.items():
            record = json.loads((folder / "training_record.json").read_text(encoding="utf-8"))
            seconds = record["metrics"]["train_wall_seconds"]
            entry = {"folder": str(folder), "tasks": record["tasks"], "train_wall_seconds": seconds}
            report["models"][name] = entry
            print(f"{name} ({folder}): tasks {sorted(record['tasks'])}")
            if "asr" in record["tasks"]:
                test_sets = test_sets or asr_test_sets(args.num_sequences, args.unseen_voice, workdir)
                entry["asr"] = asr_scores(folder, test_sets, workdir)
            if "translation" in record["tasks"]:
                limit = ["--limit", str(args.translation_pairs)] if args.translation_pairs else []
                path = details / f"{name}-translation.json"
                scored = evaluate_translation.main(["--model", str(folder), "--output-json", str(path), *limit])
                system = scored["systems"][-1]
                entry["translation"] = {"bleu": system["bleu"], "chrf": system["chrf"], "pairs": scored["held_out"]}
            if "tts" in record["tasks"]:
                path = details / f"{name}-tts.json"
                scored = evaluate_tts.main(["--model", str(folder), "--num_sequences", str(args.num_sequences),
                                            "--no_ceilings", "--output", str(path)])  # fmt: skip
                entry["tts"] = scored["scores"]["model"]
    print_table(report)
    with atomic_directory(output.parent) as staging:
        (staging / output.name).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def print_table(report: dict) -> None:
    voice = f"unseen_voice_{report['unseen_voice']}"
    print("| model | tasks | train time | ASR FSDD test, digit error | ASR unseen voice, digit error | "
          "translation BLEU / chrF | TTS, Whisper base digit WER |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, entry in report["models"].items():
        asr = entry.get("asr")
        cells = [
            f"{100 * asr['fsdd_test']['digit_error_rate']:.1f} %" if asr else "—",
            f"{100 * asr[voice]['digit_error_rate']:.1f} %" if asr else "—",
            f"{entry['translation']['bleu']:.2f} / {entry['translation']['chrf']:.2f}"
            if "translation" in entry
            else "—",
            f"{100 * entry['tts']['wer']:.1f} %" if "tts" in entry else "—",
        ]
        steps = ", ".join(f"{task} {plan['steps']}" for task, plan in entry["tasks"].items())
        minutes = entry["train_wall_seconds"] / 60
        print(f"| {name} | {steps} | {minutes:.1f} min | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
