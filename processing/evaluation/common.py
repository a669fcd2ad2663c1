"""What every evaluator shares: the folders under test, the evaluator record, flags in one spelling, the report.

An evaluator scores a list of saved folders on one task and returns a JSON-able report and its markdown table;
`scripts/evaluate.py` runs the ones `--tasks` names and writes their reports as one JSON and one markdown file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAINING_RECORD = "training_record.json"  # written next to the weights by the training scripts
NAME_SEPARATOR = "="  # --model NAME=FOLDER; Hub ids and paths hold no "="
SCORED_AS = {"distillation": "asr"}  # training tasks whose models the evaluations of another task score


@dataclass(frozen=True)
class ModelRef:
    """One `--model`: a folder (or Hub id) and the name it has in the tables."""

    name: str
    path: str

    @classmethod
    def parse(cls, value: str) -> ModelRef:
        """'NAME=FOLDER' or a bare FOLDER (then named by its path)."""
        name, sep, path = value.partition(NAME_SEPARATOR)
        if not sep:
            return cls(value, value)
        if not name or not path:
            raise SystemExit(f"--model {value}: expected FOLDER or NAME=FOLDER")
        return cls(name, path)

    def training_record(self) -> dict[str, Any] | None:
        """The folder's training_record.json, or None (a Hub id, or a folder no training script saved)."""
        path = Path(self.path) / TRAINING_RECORD
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def trained_tasks(self) -> list[str] | None:
        """The tasks its training record lists (multi-task training writes them), or None when it names none. A
        lifelong phase keeps what its base knew: its tasks and its base's (None when the base's are unknown). A
        distilled student is a speech recogniser (`SCORED_AS`)."""
        record = self.training_record()
        if not record or "tasks" not in record:
            return None
        tasks = [SCORED_AS.get(task, task) for task in record["tasks"]]
        if (record.get("model") or {}).get("training_mode") == "lifelong" and record.get("base"):
            known = ModelRef(record["base"], record["base"]).trained_tasks()
            return None if known is None else [*known, *(task for task in tasks if task not in known)]
        return tasks


@dataclass(frozen=True)
class Evaluator:
    """One task's evaluation.

    `trained_task` is the training task it measures: a folder whose training record lists tasks is scored only on
    the evaluators whose `trained_task` it names. `add_arguments` adds the task's own flags; `check` fails early
    (SystemExit naming the flag) on arguments that cannot work; `evaluate(models, args)` returns the report;
    `markdown(report)` its table.
    """

    name: str
    trained_task: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    check: Callable[[argparse.Namespace], None]
    evaluate: Callable[[Sequence[ModelRef], argparse.Namespace], dict]
    markdown: Callable[[dict], str]

    @classmethod
    def of_module(
        cls, module_name: str, trained_task: str, description: str, markdown: Callable[[dict], str] | None = None
    ) -> Evaluator:
        """The evaluator a module of this package defines, named after the module: its `add_arguments`,
        `check_args`, `evaluate` and (unless `markdown` is given) `markdown` functions."""
        module = sys.modules[module_name]
        return cls(
            name=module_name.rpartition(".")[2],
            trained_task=trained_task,
            description=description,
            add_arguments=module.add_arguments,
            check=module.check_args,
            evaluate=module.evaluate,
            markdown=markdown or module.markdown,
        )


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, **kwargs: Any) -> None:
    """`--name_with_underscores`, as the training script's HfArgumentParser spells flags, and the dashed spelling
    earlier evaluation commands used as an alias."""
    dashed = name.replace("_", "-")
    parser.add_argument(name, *([dashed] if dashed != name else []), **kwargs)


def or_default(value: Any, default: Any) -> Any:
    """A shared flag left unset (None) takes the task's own default."""
    return default if value is None else value


def markdown_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "---:") -> str:
    """A markdown table; the first column left-aligned, the others aligned by `align`."""
    lines = [markdown_row(header), "|---|" + f"{align}|" * (len(header) - 1)]
    return "\n".join([*lines, *(markdown_row(row) for row in rows)])
