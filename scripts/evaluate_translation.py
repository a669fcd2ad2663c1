#!/usr/bin/env python
"""BLEU and chrF (sacrebleu) of text translation on held-out pairs, measured from saved folders.

    python scripts/evaluate_translation.py --model outputs/text-en-de [--model OTHER ...] \
        [--zero-shot-base checkpoints/whisper-base] [--limit 500] --output-json results/translation-en-de.json

Each `--model` folder is loaded with `pipeline("translation", model=folder, trust_remote_code=True)` in a fresh
interpreter that cannot import this package, so only the folder's own code answers. The pairs are the ones
`scripts/train.py --text_pairs_csv` held out (`held_out_ids.json` in the first model's folder, or `--held-out`).
`--zero-shot-base DENSE` adds the starting point of training: DENSE upcycled with an untrained text front-end, as
train.py builds it. The source sentences themselves are scored too ("copy source"), the floor that names and
numbers alone reach.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from modeling_whisper_moe.hub import atomic_directory  # noqa: E402
from processing.text_data import read_held_out_ids, read_held_out_pairs  # noqa: E402
from scripts.isolation import run_isolated  # noqa: E402

DEFAULT_BATCH_SIZE = 16
TRANSLATE_TIMEOUT_S = 3600  # 500 sentences take a few minutes on 2 CPU cores

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


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="saved WhisperMoE folder (repeatable)")
    parser.add_argument("--zero-shot-base", help="dense Whisper folder: also score it upcycled, front-end untrained")
    parser.add_argument("--held-out", help="held_out_ids.json (default: the first --model folder's)")
    parser.add_argument("--pairs", help="CSV of pairs (default: the one named in the held-out record)")
    parser.add_argument("--limit", type=int, help="score only the first N held-out pairs")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--output-json", default="results/translation-en-de.json")
    args = parser.parse_args(argv)
    if not args.model and not args.zero_shot_base:
        parser.error("give at least one --model or --zero-shot-base")
    if not args.held_out and not args.model:
        parser.error("--held-out is needed when no --model folder holds held_out_ids.json")
    return args


def held_out_pairs(args: argparse.Namespace) -> tuple[dict, list[str], list[str]]:
    """The held-out record and its (sources, references), in the record's id order."""
    record = read_held_out_ids(args.held_out or args.model[0])
    chosen = read_held_out_pairs(record, REPO_ROOT, csv_path=args.pairs, limit=args.limit)
    return record, list(chosen["source"]), list(chosen["target"])


def zero_shot_folder(dense: str, workdir: Path) -> Path:
    """DENSE upcycled as train.py does (8 experts, top-2, router seed 0) with an untrained text front-end."""
    from modeling_whisper_moe import WhisperMoEForConditionalGeneration, WhisperMoEProcessor

    model = WhisperMoEForConditionalGeneration.from_dense(dense, num_experts=8, num_experts_per_tok=2)
    model.add_text_frontend()
    folder = workdir / "zero-shot"
    model.save_pretrained(folder)
    WhisperMoEProcessor.from_pretrained(dense).save_pretrained(folder)
    return folder


def score(hypotheses: list[str], references: list[str]) -> dict:
    import sacrebleu

    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    return {
        "bleu": round(bleu.corpus_score(hypotheses, [references]).score, 2),
        "chrf": round(chrf.corpus_score(hypotheses, [references]).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def translate(folder: Path, sources: list[str], record: dict, args: argparse.Namespace, workdir: Path) -> dict:
    sources_file = workdir / "sources.json"
    sources_file.write_text(json.dumps(sources), encoding="utf-8")
    run = (folder.resolve(), sources_file, record["src_lang"], record["tgt_lang"], args.batch_size, args.num_beams)
    return run_isolated(_TRANSLATE, *run, cwd=workdir, timeout=TRANSLATE_TIMEOUT_S)


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    record, sources, references = held_out_pairs(args)
    report = {"pairs": record["csv"], "held_out": len(sources), "src_lang": record["src_lang"],
              "tgt_lang": record["tgt_lang"], "num_beams": args.num_beams, "systems": []}  # fmt: skip
    report["systems"].append({"name": "copy source", **score(sources, references)})
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folders = [("zero-shot", zero_shot_folder(args.zero_shot_base, workdir))] if args.zero_shot_base else []
        folders += [(folder, Path(folder)) for folder in args.model]
        for name, folder in folders:
            start = time.perf_counter()
            output = translate(folder, sources, record, args, workdir)
            if output["leaked"]:
                raise RuntimeError(f"{folder} imported this package instead of its own code: {output['leaked']}")
            system = {"name": name, **score(output["hypotheses"], references), "seconds": round(output["seconds"], 1)}
            print(f"{name}: BLEU {system['bleu']}  chrF {system['chrf']}  ({time.perf_counter() - start:.0f} s)")
            examples = [{"source": s, "reference": r, "hypothesis": h}
                        for s, r, h in zip(sources, references, output["hypotheses"])]  # fmt: skip
            report["systems"].append({**system, "pipeline": output["pipeline"], "translations": examples})
    output_json = Path(args.output_json)
    with atomic_directory(output_json.parent) as staging:
        (staging / output_json.name).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report


if __name__ == "__main__":
    main()
