"""The `asr_digits` task: digit recognition of folders trained on spoken digits (the multitask-digits recipe).

Digit error rate (WER over the digits and digit words of the transcript, `processing.metrics.digit_wer`) and exact
match on FSDD's `test` split (real recordings, never trained on), and on held-out 4-digit sequences spoken whole by
an espeak-ng voice no recipe trains on (`--unseen_voice`); greedy, through each folder's ASR pipeline in a fresh
interpreter that cannot import this package.

    python scripts/evaluate.py --tasks asr_digits,translation,tts --num_sequences 100 \\
        --model multitask=outputs/multitask-digits --model asr=outputs/single-asr \\
        --model translation=outputs/single-translation --model tts=outputs/single-tts \\
        --output_json results/multitask-digits.json --output_md results/multitask-digits.md

A folder whose training record lists its tasks is scored only on the tasks it was trained for.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from modeling_whisper_moe.audio import save_audio
from modeling_whisper_moe.features import SAMPLING_RATE
from processing.espeak import speak
from processing.evaluation.common import Evaluator, ModelRef, add_flag, markdown_table, or_default
from processing.isolation import run_self_contained
from processing.metrics import digit_wer, to_digits
from processing.tts_data import digits_to_words, held_out_sequences

REPO_ROOT = Path(__file__).resolve().parents[2]
FSDD_MANIFEST = REPO_ROOT.parent / "shared" / "data" / "fsdd" / "manifest.csv"
FSDD_SPLIT = "test"
UNSEEN_VOICE = "en-gb-x-rp"  # no recipe trains on it
UNSEEN_SPEED, UNSEEN_PITCH = 165, 50
UNSEEN_SEED = 1  # not the tts task's seed 0: other sequences than the ones the models speak
DEFAULT_NUM_SEQUENCES = 100
DEFAULT_BATCH_SIZE = 16
MAX_NEW_TOKENS = 32  # a 4-digit answer needs under 20; the cap stops hallucination loops
ASR_TIMEOUT_S = 1800
EXAMPLES_KEPT = 20

TRANSCRIBE_SCRIPT = """
import json, sys, time
from transformers import pipeline

folder, paths, batch_size, max_new_tokens = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3], sys.argv[4]
asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
started = time.perf_counter()
generate_kwargs = {"language": "en", "max_new_tokens": int(max_new_tokens)}
outputs = asr(paths, batch_size=int(batch_size), generate_kwargs=generate_kwargs)
result = {"texts": [o["text"] for o in outputs], "seconds": time.perf_counter() - started,
          "model": type(asr.model).__name__}
"""

TestSets = dict[str, tuple[list[str], list[str]]]  # name: (audio paths, digit references)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("asr_digits")
    add_flag(group, "--unseen_voice", default=UNSEEN_VOICE, help="espeak-ng voice of the unseen-voice test set")


def check_args(args: argparse.Namespace) -> None:
    if not FSDD_MANIFEST.is_file():
        raise SystemExit(f"asr_digits needs FSDD's manifest at {FSDD_MANIFEST}; it is not there")


def transcribe(folder: Path, paths: list[str], batch_size: int, workdir: Path) -> dict:
    listing = workdir / "paths.json"
    listing.write_text(json.dumps(paths), encoding="utf-8")
    run = (listing, batch_size, MAX_NEW_TOKENS)
    return run_self_contained(TRANSCRIBE_SCRIPT, folder.resolve(), *run, cwd=workdir, timeout=ASR_TIMEOUT_S)


def digit_test_sets(num_sequences: int, voice: str, workdir: Path) -> TestSets:
    """FSDD's test recordings, and held-out 4-digit sequences spoken whole in `voice`."""
    with open(FSDD_MANIFEST, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == FSDD_SPLIT]
    fsdd = ([str(FSDD_MANIFEST.parent / row["path"]) for row in rows], [to_digits(row["text"]) for row in rows])
    sequences = held_out_sequences(num_sequences, seed=UNSEEN_SEED)
    paths = []
    for index, digits in enumerate(sequences):
        audio = speak(digits_to_words(digits), voice, UNSEEN_SPEED, UNSEEN_PITCH)
        paths.append(str(save_audio(workdir / f"unseen-{index:03d}.wav", audio, SAMPLING_RATE)))
    return {f"fsdd_{FSDD_SPLIT}": fsdd, f"unseen_voice_{voice}": (paths, [" ".join(digits) for digits in sequences])}


def folder_scores(folder: Path, sets: TestSets, batch_size: int, workdir: Path) -> dict:
    """{test set: digit error rate, exact-match rate, clips, seconds, the first examples} of one folder."""
    scores = {}
    for name, (paths, references) in sets.items():
        output = transcribe(folder, paths, batch_size, workdir)
        hypotheses = [to_digits(text) for text in output["texts"]]
        scores[name] = {
            "digit_error_rate": round(digit_wer(references, hypotheses), 4),
            "exact_match": round(sum(r == h for r, h in zip(references, hypotheses)) / len(references), 4),
            "clips": len(paths),
            "seconds": round(output["seconds"], 1),
            "examples": [
                {"path": p, "reference": r, "transcript": t} for p, r, t in zip(paths, references, output["texts"])
            ][:EXAMPLES_KEPT],  # fmt: skip
        }
        print(f"  asr_digits {folder} {name}: digit error rate {100 * scores[name]['digit_error_rate']:.1f} %")
    return scores


def evaluate(models: Sequence[ModelRef], args: argparse.Namespace) -> dict:
    num_sequences = or_default(args.num_sequences, DEFAULT_NUM_SEQUENCES)
    batch_size = or_default(args.batch_size, DEFAULT_BATCH_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sets = digit_test_sets(num_sequences, args.unseen_voice, workdir)
        models_report = {model.name: folder_scores(Path(model.path), sets, batch_size, workdir) for model in models}
    return {"unseen_voice": args.unseen_voice, "num_sequences": num_sequences, "models": models_report}


def markdown(report: dict) -> str:
    header = ["model", "test set", "digit error %", "exact match %", "clips"]
    rows = [
        [name, test_set, f"{100 * s['digit_error_rate']:.1f}", f"{100 * s['exact_match']:.1f}", s["clips"]]
        for name, sets in report["models"].items()
        for test_set, s in sets.items()
    ]
    return markdown_table(header, rows)


EVALUATOR = Evaluator.of_module(
    __name__, "asr", "digit error rate on FSDD's test split and on held-out sequences in an unseen espeak-ng voice"
)
