#!/usr/bin/env python
"""Train one WhisperMoE for several tasks at once, from scratch: speech recognition, text translation and
text-to-speech in a single checkpoint (`WhisperMoEForSpeechAndText`), with transformers' Trainer.

    python scripts/train_multitask.py configuration/recipes/multitask-digits.json [--output_dir OUT] [flags]
    python scripts/train_multitask.py configuration/recipes/multitask-digits.json --tasks asr   # one task alone

Tasks (`--tasks`, each with its `--task_steps` and `--task_batch_sizes`, in the same order):

- `asr`: speech -> text. Recordings of a path,text manifest (FSDD: its `test` split is left out) plus digit
  sequences spoken by espeak-ng; only the real frames are encoded (`variable_length_audio`). Decoder prompt
  `<|en|><|transcribe|><|notimestamps|>`.
- `translation`: text -> text through the encoder's text front-end, on a pairs CSV with the same held-out split as
  `scripts/train.py` (written to OUT/held_out_ids.json). Decoder prompt `<|tgt|><|transcribe|><|notimestamps|>`.
- `tts`: text -> log-mel through the same encoder and decoder layers (parallel frames, predicted durations), on
  the espeak-ng digit corpus of `scripts/train_tts.py`; the same held-out 4-digit sequences are never trained on.

The model starts from random weights (the recipe's architecture, Whisper base's tokenizer) or, with
`--init_from FOLDER`, from a Whisper or WhisperMoE checkpoint (upcycled when dense): its encoder, decoder and head,
a text front-end added as `add_text_frontend` does (`--text_encoder_layers`), 30 s audio windows as it was trained;
only the speech-output heads start random. That is the GPU route: on this CPU Whisper base costs ~18x per frame.

Every batch holds one task; the tasks' steps are interleaved evenly over the run. The same script trains the
single-task baselines (`--tasks asr`, ...), so multi-task and single-task models differ only in the mixture.
`scripts/evaluate_multitask.py` scores a folder on every task it serves, and its per-task expert usage.

OUT ends up a self-contained Hub folder (weights, code, processor, training record) that the
"automatic-speech-recognition", "translation" and "text-to-audio" pipelines load with `trust_remote_code=True`.
"""

import copy
import csv
import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import ConcatDataset, DataLoader  # noqa: E402
from transformers import GenerationConfig, Trainer, TrainingArguments  # noqa: E402

from modeling_whisper_moe import (  # noqa: E402
    WhisperMoEConfig,
    WhisperMoEForConditionalGeneration,
    WhisperMoEProcessor,
)
from modeling_whisper_moe.hub import atomic_directory  # noqa: E402
from modeling_whisper_moe.modeling_whisper_moe_tts import WhisperMoEForSpeechAndText  # noqa: E402
from processing.multitask import (  # noqa: E402
    TASK_KEY,
    MultiTaskCollator,
    RecognitionCollator,
    RecordingsRecognitionDataset,
    SpokenDigitsRecognitionDataset,
    TaskBatchSampler,
    TaskMixture,
)
from processing.recipes import parse_recipe  # noqa: E402
from processing.text_data import (  # noqa: E402
    TextPairCollator,
    prepare_text_pairs,
    read_text_pairs,
    split_held_out,
    write_held_out_ids,
)
from processing.tts_data import DigitClipBank, SpokenDigitsDataset, TextToSpeechCollator  # noqa: E402
from scripts.train_tts import (  # noqa: E402
    BudgetArguments,
    ModelArguments,
    WallTimeBudget,
    tokenizer_folder,
)

TASKS = ("asr", "translation", "tts")
SPEECH_OUTPUT_TASKS = ("tts",)
LOGGED_PARTS = ("mel_loss", "duration_loss")  # of speech-output batches, besides each task's loss
logger = logging.getLogger("train_multitask")


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TaskArguments:
    tasks: list[str] = field(default_factory=lambda: list(TASKS), metadata={"help": f"any of {TASKS}"})
    task_steps: list[int] = field(default_factory=lambda: [800, 1000, 2400], metadata={"help": "steps per task"})
    task_batch_sizes: list[int] = field(default_factory=lambda: [16, 32, 16], metadata={"help": "batch per task"})


@dataclass
class StartArguments:
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "start from this Whisper or WhisperMoE folder (upcycled when dense) instead of random weights"
        },
    )
    text_encoder_layers: int | None = field(
        default=None, metadata={"help": "with init_from: encoder layers text runs through (see the config field)"}
    )


@dataclass
class MultiTaskDataArguments:
    # speech recognition
    asr_manifest: str = field(default="../shared/data/fsdd/manifest.csv", metadata={"help": "path,text CSV"})
    asr_held_out_split: str = field(default="test", metadata={"help": "manifest rows of this split are not trained"})
    asr_synthetic_examples: int = field(default=2250, metadata={"help": "espeak-ng digit sequences for asr"})
    # text translation
    text_pairs_csv: str = field(default="../shared/data/translation/tatoeba_en_de.csv")
    source_column: str = field(default="en", metadata={"help": "column and language code of the source"})
    target_column: str = field(default="de", metadata={"help": "column and language code of the target"})
    held_out_size: int = field(default=500, metadata={"help": "pairs held out (hashed ids), written to OUT"})
    max_source_length: int = field(default=64)
    max_label_length: int = field(default=80)
    # spoken digits (text-to-speech targets and synthetic recognition input)
    voices: list[str] = field(default_factory=lambda: ["en-us", "en-gb"], metadata={"help": "espeak-ng voices"})
    speeds: list[int] = field(default_factory=lambda: [160], metadata={"help": "espeak-ng words per minute"})
    pitches: list[int] = field(default_factory=lambda: [50], metadata={"help": "espeak-ng pitch, 0-99"})
    min_digits: int = field(default=1)
    max_digits: int = field(default=5)
    pause_frames_min: int = field(default=3)
    pause_frames_max: int = field(default=12)
    num_examples: int = field(default=200_000, metadata={"help": "distinct text-to-speech sequences"})
    speaker_dropout: float = field(default=0.2, metadata={"help": "share of tts examples shown with no speaker"})


def parse_arguments(argv: list[str]):
    """Recipe (first argument, a .json file) overlaid with the flags."""
    usage = "usage: train_multitask.py RECIPE.json [flags]; e.g. configuration/recipes/multitask-digits.json"
    types = (ModelArguments, StartArguments, TaskArguments, MultiTaskDataArguments, BudgetArguments, TrainingArguments)
    parsed, recipe = parse_recipe(argv, types, usage=usage)
    return (*parsed, recipe)


def task_plan(args: TaskArguments, listed: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """({task: steps}, {task: batch size}) from the task flags, checked.

    `listed`: the tasks the step and batch-size lists follow, in order (the recipe's `tasks`). When `--tasks` picks
    some of them, each keeps its own steps and batch size, so a single-task baseline matches the multi-task run.
    """
    tasks, steps, batch_sizes = args.tasks, args.task_steps, args.task_batch_sizes
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct names from {TASKS}, got {tasks}.")
    order = listed if len(steps) == len(batch_sizes) == len(listed) and set(tasks) <= set(listed) else tasks
    if len(steps) != len(order) or len(batch_sizes) != len(order):
        raise ValueError(f"give task_steps and task_batch_sizes for each of {order}, got {steps} and {batch_sizes}.")
    plan = {task: (steps[order.index(task)], batch_sizes[order.index(task)]) for task in tasks}
    return {task: plan[task][0] for task in tasks}, {task: plan[task][1] for task in tasks}


# ---------------------------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------------------------


def build_model(args: ModelArguments, whisper_folder: str, num_voices: int) -> WhisperMoEForSpeechAndText:
    """A randomly initialised generalist with the tokenizer, special tokens and generation settings (languages,
    tasks) of the Whisper checkpoint in `whisper_folder`."""
    source = transformers.WhisperConfig.from_pretrained(whisper_folder)
    config = WhisperMoEConfig(
        vocab_size=source.vocab_size,
        d_model=args.d_model,
        encoder_layers=args.encoder_layers,
        decoder_layers=args.decoder_layers,
        encoder_attention_heads=args.attention_heads,
        decoder_attention_heads=args.attention_heads,
        encoder_ffn_dim=args.ffn_dim,
        decoder_ffn_dim=args.ffn_dim,
        num_experts=args.num_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        dropout=args.dropout,
        num_mel_bins=source.num_mel_bins,
        max_source_positions=source.max_source_positions,
        max_target_positions=source.max_target_positions,
        pad_token_id=source.pad_token_id,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        decoder_start_token_id=source.decoder_start_token_id,
        begin_suppress_tokens=source.begin_suppress_tokens,
        suppress_tokens=source.suppress_tokens,
        variable_length_audio=True,
        text_frontend=True,
        max_text_positions=args.max_text_positions,
        tts_speaker_embedding_dim=num_voices,
        tts_postnet_layers=args.tts_postnet_layers,
        tts_reduction_factor=args.tts_reduction_factor,
    )
    model = WhisperMoEForSpeechAndText(config)
    model.generation_config = GenerationConfig.from_pretrained(whisper_folder)
    return model


def pretrained_generalist(
    folder: str, args: ModelArguments, start: StartArguments, num_voices: int
) -> WhisperMoEForSpeechAndText:
    """A generalist whose encoder, decoder and language-model head come from a Whisper folder (upcycled to
    `args.num_experts` top-`args.num_experts_per_tok` when dense); a text front-end is added when the folder has none
    (see `add_text_frontend`), and only the speech-output heads start random. Audio stays in 30 s windows unless the
    folder was trained with `variable_length_audio`."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--init_from {folder} has no config.json")
    if json.loads(config_file.read_text(encoding="utf-8")).get("model_type") == "whisper":
        source = WhisperMoEForConditionalGeneration.from_dense(
            folder, num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok
        )
    else:
        source = WhisperMoEForConditionalGeneration.from_pretrained(folder)
    if not source.config.text_frontend:
        source.add_text_frontend(args.max_text_positions, start.text_encoder_layers)
    config = copy.deepcopy(source.config)
    config.tts_speaker_embedding_dim = num_voices
    config.tts_postnet_layers, config.tts_reduction_factor = args.tts_postnet_layers, args.tts_reduction_factor
    model = WhisperMoEForSpeechAndText(config)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    speech_heads = ("speaker_projection.", "duration_predictor.", "progress_projection.", "mel_head.", "postnet.")
    mismatched = [name for name in missing if not name.startswith(speech_heads)] + list(unexpected)
    if mismatched:
        raise ValueError(f"{folder}'s weights do not fit the generalist: {mismatched[:5]}")
    model.generation_config = copy.deepcopy(source.generation_config)
    return model


def manifest_rows(manifest: str, held_out_split: str) -> list[tuple[str, str]]:
    """(absolute path, text) of the manifest's rows outside `held_out_split` (all rows if it has no split column)."""
    path = Path(manifest)
    if not path.is_file():
        raise FileNotFoundError(f"ASR manifest not found: {manifest}")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("split") != held_out_split]
    if not rows or not {"path", "text"} <= set(rows[0]):
        raise ValueError(f"{manifest} has no path,text rows outside split {held_out_split!r}.")
    return [(str(path.parent / row["path"]), row["text"]) for row in rows]


def translation_pairs(args: MultiTaskDataArguments, processor, generation_config, seed: int, output_dir: str):
    """Tokenised training pairs; the held-out ids go to output_dir first (the same split as scripts/train.py)."""
    pairs = read_text_pairs(args.text_pairs_csv, args.source_column, args.target_column)
    train, held_out = split_held_out(pairs, args.held_out_size, seed)
    record = {"csv": args.text_pairs_csv, "source_column": args.source_column, "target_column": args.target_column,
              "src_lang": args.source_column, "tgt_lang": args.target_column, "seed": seed}  # fmt: skip
    write_held_out_ids(held_out["id"], output_dir, record)
    return prepare_text_pairs(train, processor.tokenizer, generation_config, args.source_column, args.target_column,
                              args.max_source_length, args.max_label_length)  # fmt: skip


def build_tasks(tasks: list[str], args: MultiTaskDataArguments, model, processor, seed: int, output_dir: str):
    """({task: dataset}, {task: collator}) for the requested tasks."""
    datasets, collators = {}, {}
    tokenizer = processor.tokenizer
    bank = None
    if {"asr", "tts"} & set(tasks):
        started = time.perf_counter()
        bank = DigitClipBank.from_espeak(args.voices, args.speeds, args.pitches)
        logger.info("spoke %d digit clips in %.1f s", len(bank.clips), time.perf_counter() - started)
    pauses = (args.pause_frames_min, args.pause_frames_max)
    if "asr" in tasks:
        tokenizer.set_prefix_tokens(language="en", task="transcribe", predict_timestamps=False)
        recorded = RecordingsRecognitionDataset(manifest_rows(args.asr_manifest, args.asr_held_out_split), tokenizer)
        parts = [recorded]
        if args.asr_synthetic_examples > 0:
            synthetic = SpokenDigitsRecognitionDataset(bank, tokenizer, args.asr_synthetic_examples, args.min_digits,
                                                       args.max_digits, pauses, seed=seed)  # fmt: skip
            parts.append(synthetic)
        # a model that reads Whisper's 30 s windows gets them, padded with each clip's silence floor
        window = None if model.config.variable_length_audio else 2 * model.config.max_source_positions
        datasets["asr"], collators["asr"] = ConcatDataset(parts), RecognitionCollator(pad_to_frames=window)
        logger.info("asr: %d recordings, %d synthetic digit sequences", len(recorded), args.asr_synthetic_examples)
    if "translation" in tasks:
        datasets["translation"] = translation_pairs(args, processor, model.generation_config, seed, output_dir)
        collators["translation"] = TextPairCollator(model.config.pad_token_id)
    if "tts" in tasks:
        reduction = model.config.tts_reduction_factor
        datasets["tts"] = SpokenDigitsDataset(bank, tokenizer, args.num_examples, args.min_digits, args.max_digits,
                                              pauses, frames_multiple=reduction, seed=seed)  # fmt: skip
        collators["tts"] = TextToSpeechCollator(model.config.pad_token_id, args.speaker_dropout, seed)
    return datasets, collators


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


class MultiTaskTrainer(Trainer):
    """Trainer over one-task batches (`batch_sampler`) that logs each task's loss, averaged between logs."""

    def __init__(self, *args, batch_sampler: TaskBatchSampler, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_sampler = batch_sampler
        self._parts: dict[str, list[float]] = defaultdict(list)

    def get_train_dataloader(self) -> DataLoader:
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = dict(inputs)
        task = inputs.pop(TASK_KEY)
        token_loss = task not in SPEECH_OUTPUT_TASKS and num_items_in_batch is not None
        outputs = model(**inputs, **({"num_items_in_batch": num_items_in_batch} if token_loss else {}))
        if model.training:
            self._parts[f"{task}_loss"].append(outputs.loss.item())
            for name in LOGGED_PARTS:
                if getattr(outputs, name, None) is not None:
                    self._parts[f"{task}_{name}"].append(getattr(outputs, name).item())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._parts and "loss" in logs:
            logs.update({name: round(sum(values) / len(values), 4) for name, values in self._parts.items()})
            self._parts.clear()
        super().log(logs, *args, **kwargs)


def save_hub_folder(model: WhisperMoEForSpeechAndText, processor, output_dir: str, record: dict) -> None:
    """Weights, code, processor and the training record, written atomically (held_out_ids.json is kept)."""
    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "training_record.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    model_args, start_args, task_args, data_args, budget_args, training_args, recipe = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transformers.utils.logging.set_verbosity_warning()
    transformers.set_seed(training_args.seed)
    if budget_args.num_threads:
        torch.set_num_threads(budget_args.num_threads)
    steps, batch_sizes = task_plan(task_args, recipe.get("tasks", list(TASKS)))
    training_args.max_steps = sum(steps.values())
    if training_args.gradient_accumulation_steps != 1:
        raise ValueError("train_multitask.py steps one task per batch: gradient_accumulation_steps must be 1.")
    whisper = start_args.init_from or tokenizer_folder(model_args.tokenizer_name_or_path)
    processor = WhisperMoEProcessor.from_pretrained(whisper)
    if start_args.init_from:
        model = pretrained_generalist(start_args.init_from, model_args, start_args, len(data_args.voices))
    else:
        model = build_model(model_args, whisper, num_voices=len(data_args.voices))
    logger.info("model: %.2fM parameters; steps per task %s", sum(p.numel() for p in model.parameters()) / 1e6, steps)
    datasets, collators = build_tasks(list(steps), data_args, model, processor, training_args.seed,
                                      training_args.output_dir)  # fmt: skip
    mixture = TaskMixture(datasets)
    sampler = TaskBatchSampler(mixture.sizes(), batch_sizes, steps, seed=training_args.seed)
    callbacks = [WallTimeBudget(budget_args.max_train_minutes)] if budget_args.max_train_minutes else []
    trainer = MultiTaskTrainer(
        model=model,
        args=training_args,
        train_dataset=mixture,
        data_collator=MultiTaskCollator(collators, SPEECH_OUTPUT_TASKS),
        callbacks=callbacks,
        batch_sampler=sampler,
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = {**result.metrics, "train_wall_seconds": round(time.perf_counter() - started, 1)}
    trainer.log_metrics("train", metrics)
    if trainer.is_world_process_zero():
        processor.tokenizer.set_prefix_tokens(language="en", task="transcribe", predict_timestamps=False)
        record = {
            "command": ["scripts/train_multitask.py", *argv],
            "recipe": recipe,
            "tasks": {task: {"steps": steps[task], "batch_size": batch_sizes[task]} for task in steps},
            "model": vars(model_args),
            "start": vars(start_args),
            "data": vars(data_args),
            "budget": vars(budget_args),
            "voices": data_args.voices,
            "metrics": metrics,
        }
        save_hub_folder(trainer.model, processor, training_args.output_dir, record)
    return metrics


if __name__ == "__main__":
    main()
