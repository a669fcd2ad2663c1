"""Multi-task training data: several tasks in one model, each batch from one task.

- `TaskMixture` puts named datasets side by side; item i carries its task's name under `task`.
- `TaskBatchSampler` yields batches of indices that all belong to one task, each task with its own batch size and
  number of steps, the tasks interleaved evenly over training (not one after the other, which would let the last
  task overwrite the first).
- `MultiTaskCollator` hands each batch to its task's collator and tags it with the task, which the trainer uses to
  log per-task losses; [`WhisperMoEForSpeechAndText`] reads the task from the inputs themselves.
- Speech recognition items for models that encode real frames only (`config.variable_length_audio`): log-mel of
  the clip's own length, from recordings (`RecordingsRecognitionDataset`) or from espeak-ng digit sequences
  (`SpokenDigitsRecognitionDataset`, the same held-out rule as the text-to-speech corpus).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from modeling_whisper_moe.audio import load_audio
from modeling_whisper_moe.modeling_whisper_moe import IGNORE_INDEX
from modeling_whisper_moe.vocoder import DYNAMIC_RANGE, LOG_SCALE, N_FFT, SAMPLING_RATE, log_mel_spectrogram
from processing.tts_data import DigitClipBank, digits_to_words, training_sequence

TASK_KEY = "task"
# the text-to-speech collator's names -> the generalist's forward arguments ("labels" there are token ids)
SPEECH_OUTPUT_KEYS = {"labels": "spectrogram_labels", "labels_mask": "spectrogram_mask"}

__all__ = [
    "MultiTaskCollator",
    "RecognitionCollator",
    "RecordingsRecognitionDataset",
    "SpokenDigitsRecognitionDataset",
    "TaskBatchSampler",
    "TaskMixture",
    "recognition_example",
]


# ---------------------------------------------------------------------------------------------------------------------
# Speech recognition items (real frames only)
# ---------------------------------------------------------------------------------------------------------------------


def recognition_example(waveform: np.ndarray, text: str, tokenizer, num_mel_bins: int = 80) -> dict[str, Any]:
    """16 kHz audio and its transcript -> `input_features` (num_mel_bins, frames) for the clip's own length (no 30 s
    padding; the values equal Whisper's feature extractor's on those frames) and `labels`: the tokenizer's prefix
    (set its language and task beforehand) without `<|startoftranscript|>`, the text, `<|endoftext|>`."""
    if waveform.size < N_FFT:
        raise ValueError(f"a clip of {waveform.size} samples is shorter than one STFT window ({N_FFT} samples).")
    features = log_mel_spectrogram(torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)), num_mel_bins)
    ids = tokenizer(" " + text.strip()).input_ids
    if ids[0] != tokenizer.convert_tokens_to_ids("<|startoftranscript|>"):
        raise ValueError(f"expected labels that start with <|startoftranscript|>, got {ids[:3]}.")
    return {"input_features": features.T.contiguous(), "labels": ids[1:]}


class RecordingsRecognitionDataset(Dataset):
    """(path, text) recordings for speech recognition; the audio is decoded once, resampled to 16 kHz, and kept."""

    def __init__(self, rows: Sequence[tuple[str, str]], tokenizer, num_mel_bins: int = 80):
        if not rows:
            raise ValueError("RecordingsRecognitionDataset needs at least one (path, text) row.")
        self.audio = [load_audio(path, SAMPLING_RATE) for path, _ in rows]
        self.texts = [text for _, text in rows]
        self.tokenizer, self.num_mel_bins = tokenizer, num_mel_bins

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return recognition_example(self.audio[index], self.texts[index], self.tokenizer, self.num_mel_bins)


class SpokenDigitsRecognitionDataset(Dataset):
    """Item i: a deterministic random digit sequence (never containing a held-out 4-digit window) spoken by the
    bank in a random style with random pauses, transcribed as digit words ("three one four")."""

    def __init__(self, bank: DigitClipBank, tokenizer, num_examples: int, min_digits: int, max_digits: int,
                 pause_frames: tuple[int, int], num_mel_bins: int = 80, seed: int = 0):  # fmt: skip
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}.")
        self.bank, self.tokenizer, self.num_examples = bank, tokenizer, num_examples
        self.min_digits, self.max_digits, self.pause_frames = min_digits, max_digits, pause_frames
        self.num_mel_bins, self.seed = num_mel_bins, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = random.Random(self.seed * 1_000_003 + index)
        digits = training_sequence(rng, self.min_digits, self.max_digits)
        style = rng.choice(self.bank.styles)
        waveform, _ = self.bank.speak(digits, style, [rng.randint(*self.pause_frames) for _ in digits])
        return recognition_example(waveform, digits_to_words(digits), self.tokenizer, self.num_mel_bins)


@dataclass
class RecognitionCollator:
    """Pads `recognition_example`s: `input_features` (batch, num_mel_bins, frames), `attention_mask` (batch, frames),
    1 = real frame, and `labels` (batch, tgt_len) with IGNORE_INDEX (-100) on padding.

    frames is the longest clip's, or `pad_to_frames` (3000 for a model that reads Whisper's 30 s windows). Padding
    holds each clip's own silence floor, what Whisper's feature extractor gives the zeros it pads audio with.
    """

    pad_to_frames: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("RecognitionCollator got an empty list of examples")
        frames = [example["input_features"].shape[-1] for example in examples]
        width = self.pad_to_frames or max(frames)
        if max(frames) > width:
            raise ValueError(f"a clip has {max(frames)} mel frames, more than pad_to_frames={width}.")
        features = torch.empty(len(examples), examples[0]["input_features"].shape[0], width)
        for row, example in enumerate(examples):
            clip = torch.as_tensor(example["input_features"])
            features[row] = clip.max() - DYNAMIC_RANGE / LOG_SCALE  # the clip's floor, in Whisper's scaling
            features[row, :, : frames[row]] = clip
        longest = max(len(example["labels"]) for example in examples)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, : len(example["labels"])] = torch.as_tensor(example["labels"], dtype=torch.long)
        attention_mask = (torch.arange(width)[None] < torch.tensor(frames)[:, None]).long()
        return {"input_features": features, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------------------------------------------------------------
# Tasks side by side
# ---------------------------------------------------------------------------------------------------------------------


def task_offsets(sizes: Mapping[str, int]) -> dict[str, int]:
    """Where each task's items start when the tasks' datasets are laid end to end in `sizes`' order."""
    starts = np.cumsum([0, *sizes.values()])[:-1]
    return {task: int(start) for task, start in zip(sizes, starts)}


class TaskMixture(Dataset):
    """Named datasets one after another: index `offsets[task] + i` is item i of `task`, returned with its task name
    under `task`."""

    def __init__(self, datasets: Mapping[str, Dataset]):
        empty = [task for task, dataset in datasets.items() if len(dataset) == 0]
        if not datasets or empty:
            raise ValueError(f"TaskMixture needs at least one task and no empty dataset; empty: {empty}.")
        self.datasets = dict(datasets)
        self.offsets = task_offsets(self.sizes())
        self.total = sum(self.sizes().values())

    def __len__(self) -> int:
        return self.total

    def sizes(self) -> dict[str, int]:
        return {task: len(dataset) for task, dataset in self.datasets.items()}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.total:
            raise IndexError(f"index {index} is outside the mixture's {self.total} items.")
        task = max((t for t, start in self.offsets.items() if start <= index), key=self.offsets.__getitem__)
        item = self.datasets[task][index - self.offsets[task]]
        return {**item, TASK_KEY: task}


def interleave(steps: Mapping[str, int]) -> list[str]:
    """The task of every training step: task t's n_t steps sit at fractions (k + 1/2) / n_t of training, so each task
    is spread evenly over the run and the counts are exact."""
    slots = [
        ((k + 0.5) / count, order, task) for order, (task, count) in enumerate(steps.items()) for k in range(count)
    ]
    return [task for _, _, task in sorted(slots)]


class TaskBatchSampler(Sampler[list[int]]):
    """Batches of mixture indices, each from a single task.

    sizes: items per task (`TaskMixture.sizes()`); batch_sizes, steps: per task. Task order comes from
    [`interleave`]; within a task the items are drawn without replacement, reshuffled whenever they run out.
    `set_epoch` changes the draw, the task schedule stays.
    """

    def __init__(self, sizes: Mapping[str, int], batch_sizes: Mapping[str, int], steps: Mapping[str, int],
                 seed: int = 0):  # fmt: skip
        unknown = sorted(set(steps) - set(sizes))
        if unknown:
            raise ValueError(f"steps name tasks {unknown} that have no data; tasks with data: {sorted(sizes)}.")
        missing = sorted(set(steps) - set(batch_sizes))
        if missing:
            raise ValueError(f"no batch size for tasks {missing}.")
        bad = {task: value for task, value in {**steps, **batch_sizes}.items() if value < 1}
        if bad:
            raise ValueError(f"steps and batch sizes must be at least 1, got {bad}.")
        self.offsets = task_offsets(sizes)
        self.sizes, self.batch_sizes, self.steps = dict(sizes), dict(batch_sizes), dict(steps)
        self.schedule = interleave(self.steps)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.schedule)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        streams = {task: self._stream(task, generator) for task in self.steps}
        for task in self.schedule:
            yield [self.offsets[task] + next(streams[task]) for _ in range(self.batch_sizes[task])]

    def _stream(self, task: str, generator: torch.Generator) -> Iterator[int]:
        while True:
            yield from torch.randperm(self.sizes[task], generator=generator).tolist()


@dataclass
class MultiTaskCollator:
    """Collates a one-task batch with that task's collator and adds `task` (a string); the text-to-speech
    collator's `labels` / `labels_mask` (mel frames) are renamed `spectrogram_labels` / `spectrogram_mask`, since
    `labels` are token ids for the other tasks. `speech_output_tasks` names the tasks whose outputs are mel;
    rows without a task (an evaluation set of one task) belong to `default_task`."""

    collators: Mapping[str, Callable[[list[dict]], dict]]
    speech_output_tasks: Sequence[str] = ()
    default_task: str | None = None

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        tasks = {item.get(TASK_KEY, self.default_task) for item in items}
        if len(tasks) != 1:
            raise ValueError(f"a batch must hold one task, got {sorted(map(str, tasks))}; use TaskBatchSampler.")
        (task,) = tasks
        if task not in self.collators:
            raise ValueError(f"no collator for task {task!r}; tasks: {sorted(self.collators)}.")
        batch = self.collators[task]([{k: v for k, v in item.items() if k != TASK_KEY} for item in items])
        if task in self.speech_output_tasks:
            batch = {SPEECH_OUTPUT_KEYS.get(key, key): value for key, value in batch.items()}
        return {**batch, TASK_KEY: task}
