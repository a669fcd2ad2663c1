#!/usr/bin/env python
"""Per-task expert usage of one WhisperMoE checkpoint: do the experts specialise by task?

    python scripts/expert_usage.py --model outputs/text-en-de \
        --manifest ../shared/data/librispeech/test-other/manifest.csv [--speech 16] [--text 128] \
        [--output-json results/expert-usage-en-de.json]

Runs teacher-forced batches of each task the folder serves and counts, per sparse block, the routing slots each
expert gets from real tokens (padding left out):

- speech recognition: `--speech` clips of `--manifest` (English, decoder prompted to transcribe);
- text translation (a folder with `config.text_frontend`): `--text` of the pairs `scripts/train.py` held out.

For every block it prints each task's busiest experts and the total variation distance between the tasks' expert
shares (0: the tasks use the experts alike, 1: disjoint experts), and writes all shares to JSON.
"""

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from modeling_whisper_moe import WhisperMoEForConditionalGeneration, WhisperMoEProcessor  # noqa: E402
from modeling_whisper_moe.hub import atomic_directory  # noqa: E402
from modeling_whisper_moe.pruning import manifest_batches, routing_counts  # noqa: E402
from processing.text_data import (  # noqa: E402
    TextPairCollator,
    prepare_text_pairs,
    read_held_out_ids,
    read_held_out_pairs,
)

TOP = 2  # busiest experts listed per task and block


def text_batches(model, processor, folder: Path, limit: int, batch_size: int):
    """Teacher-forced batches of the held-out pairs recorded in `folder` (as train.py encoded them)."""
    record = read_held_out_ids(folder)
    pairs = read_held_out_pairs(record, REPO_ROOT, limit=limit)
    prepared = prepare_text_pairs(pairs, processor.tokenizer, model.generation_config, record["src_lang"],
                                  record["tgt_lang"], model.config.max_text_positions, 448)  # fmt: skip
    collate = TextPairCollator(model.config.pad_token_id)
    for start in range(0, len(prepared), batch_size):
        yield collate([prepared[i] for i in range(start, min(start + batch_size, len(prepared)))])


def shares(counts: dict[str, torch.Tensor]) -> dict[str, list[float] | None]:
    """Counts -> each block's expert shares (summing to 1), None for a block the task never reached."""
    return {block: (c / c.sum()).tolist() if c.sum() > 0 else None for block, c in counts.items()}


def total_variation(p: list[float] | None, q: list[float] | None) -> float | None:
    if p is None or q is None:
        return None
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def busiest(share: list[float] | None) -> str:
    if share is None:
        return "not used"
    ranked = sorted(range(len(share)), key=lambda expert: -share[expert])[:TOP]
    return ", ".join(f"{expert} ({100 * share[expert]:.0f} %)" for expert in ranked)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved WhisperMoE folder")
    parser.add_argument("--manifest", required=True, help="path,text CSV of English speech")
    parser.add_argument("--speech", type=int, default=16, help="clips of speech")
    parser.add_argument("--text", type=int, default=128, help="held-out text pairs (text front-end folders)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)

    folder = Path(args.model)
    model = WhisperMoEForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperMoEProcessor.from_pretrained(folder)
    if getattr(model.generation_config, "is_multilingual", False):
        processor.tokenizer.set_prefix_tokens(language="en", task="transcribe")
    tasks = {"speech recognition": manifest_batches(Path(args.manifest), processor, args.speech, args.batch_size,
                                                    split=None, real_frames_only=True)}  # fmt: skip
    if model.config.text_frontend:
        tasks["text translation"] = text_batches(model, processor, folder, args.text, args.batch_size)
    usage = {task: shares(routing_counts(model, batches)) for task, batches in tasks.items()}
    blocks = list(next(iter(usage.values())))
    names = list(usage)
    print(f"| sparse block | {' | '.join(f'{task}: busiest experts' for task in names)} | total variation |")
    print(f"|---|{'---|' * len(names)}---:|")
    distances = {}
    for block in blocks:
        distance = total_variation(*(usage[task][block] for task in names)) if len(names) == 2 else None
        distances[block] = distance
        cells = " | ".join(busiest(usage[task][block]) for task in names)
        print(f"| {block.removeprefix('model.')} | {cells} | {'—' if distance is None else f'{distance:.2f}'} |")
    report = {"model": str(folder), "manifest": args.manifest, "speech_clips": args.speech, "text_pairs": args.text,
              "shares": usage, "total_variation": distances}  # fmt: skip
    if args.output_json:
        output = Path(args.output_json)
        with atomic_directory(output.parent) as staging:
            (staging / output.name).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
