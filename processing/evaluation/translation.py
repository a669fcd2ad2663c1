"""The `translation` task: BLEU and chrF (sacrebleu) of text translation on held-out pairs, from saved folders.

Each `--model` folder is loaded with `pipeline("translation", model=folder, trust_remote_code=True)` in a fresh
interpreter that cannot import this package, so only the folder's own code answers. The pairs are the ones
`scripts/train.py --text_pairs_csv` held out (`held_out_ids.json` in the first model's folder, or `--held_out`).
`--zero_shot_base DENSE` adds the starting point of training: DENSE upcycled with an untrained text front-end, as
train.py builds it. The source sentences themselves are scored too ("copy source"), the floor that names and
numbers alone reach.

    python scripts/evaluate.py --tasks translation --model outputs/text-en-de [--model OTHER ...] \\
        [--zero_shot_base checkpoints/whisper-base] [--limit 500] --output_json results/translation-en-de.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from processing.evaluation.common import Evaluator, ModelRef, add_flag, markdown_table, or_default
from processing.isolation import run_self_contained
from processing.metrics import bleu_chrf
from processing.text_data import read_held_out_ids, read_held_out_pairs

REPO_ROOT = Path(__file__).resolve().parents[2]  # where training ran: relative pair CSVs are found from here
DEFAULT_BATCH_SIZE = 16
TRANSLATE_TIMEOUT_S = 3600  # 500 sentences take a few minutes on 2 CPU cores
ZERO_SHOT = "zero-shot"
ZERO_SHOT_EXPERTS, ZERO_SHOT_TOP_K = 8, 2  # as train.py upcycles

# Runs without the package: argv = folder, json file of sources, src_lang, tgt_lang, batch size, beams.
_TRANSLATE = """
import json, time
from transformers import pipeline

folder, sources_file, src_lang, tgt_lang, batch_size, num_beams = sys.argv[1:7]
sources = json.load(open(sources_file, encoding="utf-8"))
translator = pipeline("translation", model=folder, trust_remote_code=True)
start = time.perf_counter()
options = {"batch_size": int(batch_size), "num_beams": int(num_beams)}
outputs = translator(sources, src_lang=src_lang, tgt_lang=tgt_lang, **options)
result = {"hypotheses": [o["translation_text"] for o in outputs], "seconds": time.perf_counter() - start,
          "pipeline": type(translator).__name__}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("translation")
    add_flag(group, "--zero_shot_base", help="dense Whisper folder: also score it upcycled, front-end untrained")
    add_flag(group, "--held_out", help="held_out_ids.json (default: the first --model folder's)")
    add_flag(group, "--pairs", help="CSV of pairs (default: the one named in the held-out record)")
    add_flag(group, "--num_beams", type=int, default=1)


def check_args(args: argparse.Namespace) -> None:
    if not args.held_out and not args.model:
        raise SystemExit("--held_out is needed when no --model folder holds held_out_ids.json")


def held_out_pairs(args: argparse.Namespace, models: Sequence[ModelRef]) -> tuple[dict, list[str], list[str]]:
    """The held-out record and its (sources, references), in the record's id order."""
    record = read_held_out_ids(args.held_out or models[0].path)
    chosen = read_held_out_pairs(record, REPO_ROOT, csv_path=args.pairs, limit=args.limit)
    return record, list(chosen["source"]), list(chosen["target"])


def zero_shot_folder(dense: str, workdir: Path) -> Path:
    """DENSE upcycled as train.py does (8 experts, top-2, router seed 0) with an untrained text front-end."""
    from modeling_whisper_moe import WhisperMoEForConditionalGeneration, WhisperMoEProcessor

    model = WhisperMoEForConditionalGeneration.from_dense(
        dense, num_experts=ZERO_SHOT_EXPERTS, num_experts_per_tok=ZERO_SHOT_TOP_K
    )
    model.add_text_frontend()
    folder = workdir / ZERO_SHOT
    model.save_pretrained(folder)
    WhisperMoEProcessor.from_pretrained(dense).save_pretrained(folder)
    return folder


def translate(folder: Path, sources: list[str], record: dict, args: argparse.Namespace, workdir: Path) -> dict:
    sources_file = workdir / "sources.json"
    sources_file.write_text(json.dumps(sources), encoding="utf-8")
    batch_size = or_default(args.batch_size, DEFAULT_BATCH_SIZE)
    run = (sources_file, record["src_lang"], record["tgt_lang"], batch_size, args.num_beams)
    return run_self_contained(_TRANSLATE, folder.resolve(), *run, cwd=workdir, timeout=TRANSLATE_TIMEOUT_S)


def score_folder(name: str, folder: Path, pairs: tuple[dict, list[str], list[str]], args, workdir: Path) -> dict:
    """One system's scores, timing and every translation next to its source and reference."""
    record, sources, references = pairs
    start = time.perf_counter()
    output = translate(folder, sources, record, args, workdir)
    system = {"name": name, **bleu_chrf(output["hypotheses"], references), "seconds": round(output["seconds"], 1)}
    print(f"{name}: BLEU {system['bleu']}  chrF {system['chrf']}  ({time.perf_counter() - start:.0f} s)")
    examples = [{"source": s, "reference": r, "hypothesis": h}
                for s, r, h in zip(sources, references, output["hypotheses"])]  # fmt: skip
    return {**system, "pipeline": output["pipeline"], "translations": examples}


def evaluate(models: Sequence[ModelRef], args: argparse.Namespace) -> dict:
    """Copy source, the zero-shot start (with --zero_shot_base) and every model on the same held-out pairs."""
    pairs = held_out_pairs(args, models)
    record, sources, references = pairs
    report = {"pairs": record["csv"], "held_out": len(sources), "src_lang": record["src_lang"],
              "tgt_lang": record["tgt_lang"], "num_beams": args.num_beams, "systems": []}  # fmt: skip
    report["systems"].append({"name": "copy source", **bleu_chrf(sources, references)})
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folders = [(ZERO_SHOT, zero_shot_folder(args.zero_shot_base, workdir))] if args.zero_shot_base else []
        folders += [(model.name, Path(model.path)) for model in models]
        report["systems"] += [score_folder(name, folder, pairs, args, workdir) for name, folder in folders]
    return report


def markdown(report: dict) -> str:
    header = ["system", "BLEU", "chrF", "seconds"]
    rows = [[s["name"], s["bleu"], s["chrf"], s.get("seconds", "–")] for s in report["systems"]]
    return markdown_table(header, rows)


EVALUATOR = Evaluator.of_module(
    __name__, "translation", "BLEU / chrF on the held-out Tatoeba pairs (folders run without this package)"
)
