"""The `Task` record and the registry of tasks (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class TaskContext:
    """What a task's builders read: the model being trained, its processor, the run's data arguments."""

    model: nn.Module
    processor: Any  # a WhisperMoEProcessor (or a holder of `.tokenizer` for a text-to-speech model)
    data: Any  # processing.arguments.DataArguments
    model_args: Any  # processing.arguments.ModelArguments
    seed: int
    output_dir: str
    shared: dict[str, Any] = field(default_factory=dict)  # built once for several tasks (the espeak digit bank)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)


@dataclass(frozen=True)
class TaskData:
    """A task's datasets: `train` and, when the task holds data out for the Trainer's evaluation, `evaluation`."""

    train: Any
    evaluation: Any = None


@dataclass(frozen=True)
class Task:
    """A capability the model is trained for.

    - `build_data(context) -> TaskData`: training (and held-out) examples.
    - `build_collator(context) -> (examples -> batch)`: the batch the model's forward takes.
    - `speech_output`: batches are text -> log-mel (the loss is the model's own; no token cross-entropy).
    - `build_metrics(context) -> compute_metrics | None`: what the Trainer scores on `TaskData.evaluation`.
    - `preprocess_logits`: the Trainer's `preprocess_logits_for_metrics`, what it keeps of each evaluation batch's
      outputs for `build_metrics` (e.g. the logits' argmax; None keeps everything, vocabulary-sized logits included).
    - `generation_kwargs(context) -> dict`: given to `Trainer.evaluate` (e.g. the target language).
    - `evaluator_name`: the scorer of processing/evaluation/ that `scripts/evaluate.py --tasks` runs for it.
    """

    name: str
    build_data: Callable[[TaskContext], TaskData]
    build_collator: Callable[[TaskContext], Callable]
    speech_output: bool = False
    build_metrics: Callable[[TaskContext], Callable | None] = lambda context: None
    preprocess_logits: Callable | None = None
    generation_kwargs: Callable[[TaskContext], dict] = lambda context: {}
    evaluator_name: str | None = None


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add `task` to the registry (a second task of the same name is an error)."""
    if task.name in _REGISTRY:
        raise ValueError(f"A task named {task.name!r} is already registered.")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in _REGISTRY:
        raise ValueError(f"Unknown task {name!r}; tasks: {', '.join(task_names())}.")
    return _REGISTRY[name]


def task_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)
