#!/usr/bin/env python
"""Score saved folders on any task and write one JSON report and one markdown file for all of them.

    python scripts/evaluate.py --tasks asr --model /tmp/tiny.en --manifest ../shared/data/fsdd/manifest.csv \\
        --split test --output_json fsdd.json --output_md fsdd.md
    python scripts/evaluate.py --tasks asr_digits,translation,tts --num_sequences 100 \\
        --model multitask=outputs/multitask-digits --model tts=outputs/single-tts --output_json multitask.json

Tasks (`processing.evaluation`; each module's docstring says how it measures):
{tasks}

`--model` is repeatable, FOLDER or NAME=FOLDER (NAME labels its rows). A folder whose training_record.json lists
its training tasks is scored only on the evaluations of those tasks. The JSON holds
`{{"tasks", "models", "skipped", "reports": {{task: report}}}}`; the markdown holds each task's table, under a
`## task` heading when there are several. Both are written atomically. Flags are spelled with underscores, as the
training script's; the dashed spellings of earlier commands are accepted too.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from modeling_whisper_moe.hub import atomic_write
from processing.evaluation import EVALUATORS, Evaluator, ModelRef
from processing.evaluation.common import add_flag

DEFAULT_TASKS = "asr"
TASK_LIST = ", ".join(EVALUATORS)
POSITIVE_FLAGS = ("limit", "batch_size", "num_sequences")


def task_names(value: str) -> list[str]:
    """'asr,translation' -> ['asr', 'translation'], each a known task."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in EVALUATORS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{value!r}: unknown task {', '.join(unknown)} (tasks: {TASK_LIST})")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    tasks = "\n".join(f"  {name}: {evaluator.description}" for name, evaluator in EVALUATORS.items())
    parser = argparse.ArgumentParser(
        description=__doc__.format(tasks=tasks), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_tasks = task_names(DEFAULT_TASKS)
    add_flag(parser, "--tasks", type=task_names, default=default_tasks, help=f"comma-separated: {TASK_LIST}")
    add_flag(parser, "--model", action="append", default=[], type=ModelRef.parse, metavar="[NAME=]FOLDER",
             help="folder (or Hub id, for asr) to score; repeat to compare several in one run")  # fmt: skip
    shared = parser.add_argument_group("shared by several tasks")
    add_flag(shared, "--limit", type=int, help="only the first N utterances (asr) or held-out pairs (translation)")
    add_flag(shared, "--batch_size", type=int, help="decoding batch (default: asr 8, asr_digits 16, translation 16)")
    add_flag(shared, "--num_sequences", type=int, help="held-out digit sequences (default: tts 50, asr_digits 100)")
    add_flag(shared, "--seed", type=int, default=0, help="seed of the sample (tts sequences, speech_translation)")
    add_flag(shared, "--faster_whisper", metavar="CT2_DIR", help="CTranslate2 reference (asr; speech_translation)")
    add_flag(shared, "--audio_dir", help="keep synthesised audio here, a folder per task (default: temporary)")
    output = parser.add_argument_group("output")
    add_flag(output, "--output_json", type=Path, help="the full report of every task, hypotheses included")
    add_flag(output, "--output_md", type=Path, help="the markdown tables")
    for evaluator in EVALUATORS.values():
        evaluator.add_arguments(parser)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Fail early, naming the flag, on inputs no task can use; then each chosen task's own checks."""
    for name in POSITIVE_FLAGS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name} must be a positive integer, got {value}")
    zero_shot_only = args.tasks == ["translation"] and args.zero_shot_base
    if not args.model and not zero_shot_only:
        raise SystemExit(f"--tasks {','.join(args.tasks)}: give at least one --model")
    for task in args.tasks:
        EVALUATORS[task].check(args)


def models_for(evaluator: Evaluator, models: Sequence[ModelRef]) -> list[ModelRef]:
    """The models to score on this evaluation: all but those whose training record names other tasks only."""
    return [m for m in models if m.trained_tasks() is None or evaluator.trained_task in m.trained_tasks()]


def model_entry(model: ModelRef) -> dict:
    """A model's folder, and what its training record says it was trained for and how long."""
    record = model.training_record() or {}
    entry = {"path": model.path, "trained_tasks": record.get("tasks")}
    if "train_wall_seconds" in record.get("metrics", {}):
        entry["train_wall_seconds"] = record["metrics"]["train_wall_seconds"]
    return entry


def markdown(reports: dict[str, dict]) -> str:
    """Each task's table; under a `## task` heading when there are several."""
    tables = {task: EVALUATORS[task].markdown(report) for task, report in reports.items()}
    if len(tables) == 1:
        return next(iter(tables.values()))
    return "\n\n".join(f"## {task}\n\n{table}" for task, table in tables.items())


def write_text(path: Path, text: str) -> None:
    with atomic_write(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    report = {"tasks": args.tasks, "models": {m.name: model_entry(m) for m in args.model}, "skipped": {}}
    report["reports"] = {}
    for task in args.tasks:
        evaluator = EVALUATORS[task]
        models = models_for(evaluator, args.model)
        report["skipped"][task] = [m.name for m in args.model if m not in models]
        if models or (task == "translation" and args.zero_shot_base):
            report["reports"][task] = evaluator.evaluate(models, args)
    if not report["reports"]:
        raise SystemExit(f"--tasks {','.join(args.tasks)}: no --model was trained for any of these tasks")
    tables = markdown(report["reports"])
    print(tables)
    if args.output_md:
        write_text(args.output_md, tables + "\n")
    if args.output_json:
        write_text(args.output_json, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
