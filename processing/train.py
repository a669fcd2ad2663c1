"""Train WhisperMoE for any task or mixture of tasks with transformers' `Seq2SeqTrainer`: `scripts/train.py`.

    python scripts/train.py [RECIPE.json] [flags]

The recipe (default `configuration/recipes/asr-finetune.json`) is overlaid with the flags; every
`Seq2SeqTrainingArguments` flag works (--max_steps, --resume_from_checkpoint, --report_to tensorboard, ...), and the
same command scales out with `accelerate launch` or `torchrun`. One task (`--tasks asr`, or the one the data
implies) trains on the Trainer's sampler and is scored on its held-out data after training; several tasks
(`--tasks asr translation tts --task_steps ... --task_batch_sizes ...`) interleave one-task batches. The model is
what `processing.models` builds for the tasks. OUT ends up a self-contained Hub folder (weights, code, processor,
a model card) with `training_record.json`, the run's resolved settings.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import Seq2SeqTrainingArguments

from modeling_whisper_moe import WhisperMoEForConditionalGeneration
from modeling_whisper_moe.hub import atomic_directory
from modeling_whisper_moe.model_card import model_card
from processing.arguments import (
    DataArguments,
    ModelArguments,
    RunArguments,
    TaskArguments,
    chosen_tasks,
    parse_arguments,
    task_plan,
)
from processing.data import prepare_dataset, read_manifest
from processing.distillation import DistillationTrainer, build_student
from processing.lifelong import (
    LifelongArguments,
    LifelongTrainer,
    ReplayFlagCollator,
    RestoreFrozenRows,
    apply_lifelong_mode,
    grow_for_phase,
    mix_replay,
    pseudo_label_manifests,
    replay_mixture,
)
from processing.models import load_model
from processing.multitask import MultiTaskCollator, TaskBatchSampler, TaskMixture
from processing.pseudo_labels import PROMPT_AND_END_TOKENS
from processing.sign_video import add_sign_video_frontend, check_sign_frontend
from processing.tasks import TaskContext, get_task
from processing.tasks.asr import set_decoder_prompt
from processing.tasks.distillation import ARGUMENTS, DISTILLATION, TEACHER
from processing.training import WallTimeBudget, WhisperMoETrainer, apply_training_mode

# tasks that need the encoder's text front-end on a speech-to-text model
TEXT_INPUT_TASKS = ("translation", "modular_arithmetic")
POSE_INPUT_TASKS = ("video_to_text",)  # tasks that need its pose front-end (sign-language keypoints)
AUDIO_INPUT_TASKS = ("asr",)  # tasks whose rows replayed audio can share a batch with
# what the training record lists of the run's effective settings (recipe overlaid with flags)
CARD_HYPERPARAMETERS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                        "num_train_epochs", "warmup_steps", "lr_scheduler_type", "adam_beta1", "adam_beta2",
                        "adam_epsilon", "weight_decay", "seed", "bf16", "fp16", "world_size")  # fmt: skip
logger = logging.getLogger("train")


def set_mixed_precision(model_args: ModelArguments, training_args: Seq2SeqTrainingArguments) -> None:
    """bf16 on GPUs that have it, else fp16; fp32 on CPU."""
    if model_args.mixed_precision not in ("auto", "no"):
        raise ValueError(f"--mixed_precision must be auto or no, got {model_args.mixed_precision!r}")
    if model_args.mixed_precision == "auto" and torch.cuda.is_available() and not training_args.fp16:
        training_args.bf16 = torch.cuda.is_bf16_supported()
        training_args.fp16 = not training_args.bf16


def add_input_frontends(model, model_args: ModelArguments, tasks: list[str], data_args: DataArguments) -> None:
    """Give a speech-to-text model the text front-end its text-input tasks read (or a new depth for one it has)
    and the pose front-end its sign-language tasks read (the patch front-end with `sign_frontend=patches`)."""
    if not isinstance(model, WhisperMoEForConditionalGeneration):
        return
    if set(tasks) & set(POSE_INPUT_TASKS) and check_sign_frontend(data_args.sign_frontend) == "patches":
        add_sign_video_frontend(model, model_args, data_args)
    elif set(tasks) & set(POSE_INPUT_TASKS):
        model.add_pose_frontend()
    if not set(tasks) & set(TEXT_INPUT_TASKS):
        return
    if not model.config.text_frontend:  # the decoder's token embeddings, rescaled, and the encoder's positions
        model.add_text_frontend(text_encoder_layers=model_args.text_encoder_layers)
    elif model_args.text_encoder_layers is not None:  # a trained front-end, given a new depth
        model.config.check_text_encoder_layers(model_args.text_encoder_layers)
        model.config.text_encoder_layers = model_args.text_encoder_layers


def distillation_models(model, run: RunArguments, tasks: list[str]):
    """(model to train, teacher or None): for the distillation task the loaded model is the teacher, and the
    student made from it (or read from `student_name_or_path`) trains."""
    if DISTILLATION.name not in tasks:
        return model, None
    if len(tasks) > 1 or run.tasks.task_steps or run.model.training_mode == "lifelong":
        raise ValueError(f"distillation trains a student alone: give --tasks distillation only, not {tasks} "
                         f"(training_mode {run.model.training_mode!r}).")  # fmt: skip
    teacher = model.eval().requires_grad_(False)
    teacher.config.use_cache = True  # the teacher only generates and scores, never trains
    return build_student(teacher, run.distillation), teacher


def choose_trained(model, model_args: ModelArguments, lifelong: LifelongArguments, seed: int):
    """(model to train, frozen rows of a lifelong phase or None): grow experts or PEER when asked, then pick what
    trains."""
    if lifelong.grows:
        grow_for_phase(model, lifelong, seed)
    if model_args.training_mode == "lifelong":
        return model, apply_lifelong_mode(model, lifelong.lifelong_trainable)
    trained = apply_training_mode(model, model_args.training_mode, model_args.lora_r, model_args.lora_alpha,
                                  model_args.lora_dropout)  # fmt: skip
    return trained, None


def replay_set(context: TaskContext, lifelong: LifelongArguments):
    """The replay manifests' audio (no evaluation rows), transcribed by the model before this phase trains it."""
    output_dir = Path(context.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_decoder_prompt(context, "transcribe")  # replayed labels are transcripts, whatever the new task prompts
    labels_csv = pseudo_label_manifests(context.model, context.processor, lifelong.replay_manifest,
                                        output_dir / "replay_pseudo_labels.csv",
                                        max_new_tokens=context.data.max_label_length - PROMPT_AND_END_TOKENS,
                                        exclude_speakers=context.data.exclude_speakers or (),
                                        max_per_manifest=lifelong.replay_max_per_manifest,
                                        seed=context.seed)  # fmt: skip
    return prepare_dataset(read_manifest(labels_csv), context.processor,
                           max_label_length=context.data.max_label_length)  # fmt: skip


def single_task_trainer(name: str, context: TaskContext, run: RunArguments, frozen_rows, callbacks: list):
    """The trainer of a one-task run, and the generation settings of its evaluation."""
    task = get_task(name)
    data, collator = task.build_data(context), task.build_collator(context)
    train, kwargs = data.train, {}
    if frozen_rows is not None:  # a lifelong phase
        kwargs = {"lifelong": run.lifelong}
        callbacks = [*callbacks, RestoreFrozenRows(frozen_rows)]
        replay = replay_set(context, run.lifelong) if run.lifelong.replay_manifest else None
        if replay is not None and name not in AUDIO_INPUT_TASKS:  # text rows: replay gets batches of its own
            train, collator, kwargs["batch_sampler"] = replay_mixture(
                name, train, collator, replay, get_task("asr").build_collator(context), run.lifelong.replay_fraction,
                run.training.max_steps, run.training.per_device_train_batch_size, context.seed)  # fmt: skip
        else:
            train = mix_replay(train, replay, run.lifelong.replay_fraction, context.seed) if replay else train
            collator = ReplayFlagCollator(collator)
    trainer_class = LifelongTrainer if frozen_rows is not None else WhisperMoETrainer
    if TEACHER in context.shared:
        trainer_class = DistillationTrainer
        kwargs = {"teacher": context.shared[TEACHER], "distillation": context.shared[ARGUMENTS]}
    trainer = trainer_class(
        model=context.model,
        args=run.training,
        train_dataset=train,
        eval_dataset=data.evaluation,
        data_collator=collator,
        compute_metrics=task.build_metrics(context),
        preprocess_logits_for_metrics=task.preprocess_logits,
        processing_class=context.processor,
        callbacks=callbacks,
        task=name,
        speech_output_tasks=[name] if task.speech_output else [],
        ttt_lr_multiplier=run.model.ttt_lr_multiplier,
        gradient_filter=run.grokfast.gradient_filter(),
        **kwargs,
    )
    return trainer, task.generation_kwargs(context)


def mixture_trainer(tasks: list[str], context: TaskContext, run: RunArguments, callbacks: list):
    """The trainer of a task mixture (one-task batches, each task's steps interleaved) and its plan."""
    plan_args = TaskArguments(tasks, run.tasks.task_steps, run.tasks.task_batch_sizes)
    steps, batch_sizes = task_plan(plan_args, run.recipe.get("tasks", tasks))
    if run.training.gradient_accumulation_steps != 1:
        raise ValueError("A task mixture steps one task per batch: gradient_accumulation_steps must be 1.")
    run.training.max_steps = sum(steps.values())
    registered = {name: get_task(name) for name in steps}
    datasets = {name: task.build_data(context).train for name, task in registered.items()}
    collators = {name: task.build_collator(context) for name, task in registered.items()}
    speech_output = [name for name, task in registered.items() if task.speech_output]
    mixture = TaskMixture(datasets)
    trainer = WhisperMoETrainer(
        model=context.model,
        args=run.training,
        train_dataset=mixture,
        data_collator=MultiTaskCollator(collators, speech_output),
        processing_class=context.processor,
        callbacks=callbacks,
        speech_output_tasks=speech_output,
        ttt_lr_multiplier=run.model.ttt_lr_multiplier,
        gradient_filter=run.grokfast.gradient_filter(),
        batch_sampler=TaskBatchSampler(mixture.sizes(), batch_sizes, steps, seed=run.training.seed),
    )
    return trainer, {name: {"steps": steps[name], "batch_size": batch_sizes[name]} for name in steps}


def effective_hyperparameters(model_args: ModelArguments, training_args: Seq2SeqTrainingArguments) -> dict:
    values = {name: getattr(training_args, name) for name in CARD_HYPERPARAMETERS}
    values["lr_scheduler_type"] = str(values["lr_scheduler_type"]).split(".")[-1].lower()
    return {"training_mode": model_args.training_mode, **values}


def save_hub_folder(trainer: WhisperMoETrainer, processor, output_dir: str, record: dict) -> None:
    """Final weights (LoRA merged into the base), processor, model card and the training record, atomically."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(Path(output_dir) / "adapter")  # the adapters alone, loadable onto the base
        model = model.merge_and_unload()
    model.config.use_cache = True
    with atomic_directory(output_dir) as staging:
        if isinstance(model, WhisperMoEForConditionalGeneration):  # the card records how it was fine-tuned
            (staging / "README.md").write_text(model_card(model, training=record), encoding="utf-8")
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "training_record.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    run = parse_arguments(argv)
    model_args, data_args, training_args = run.model, run.data, run.training
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    transformers.utils.logging.set_verbosity_warning()
    transformers.set_seed(training_args.seed)
    if run.budget.num_threads:
        torch.set_num_threads(run.budget.num_threads)
    set_mixed_precision(model_args, training_args)
    tasks = chosen_tasks(run.tasks, data_args)
    model, processor = load_model(model_args, data_args, run.recipe.get("tasks", tasks))
    add_input_frontends(model, model_args, tasks, data_args)
    model, teacher = distillation_models(model, run, tasks)
    model, frozen_rows = choose_trained(model, model_args, run.lifelong, training_args.seed)
    context = TaskContext(model, processor, data_args, model_args, training_args.seed, training_args.output_dir)
    if teacher is not None:
        context.shared.update({TEACHER: teacher, ARGUMENTS: run.distillation})
    callbacks = [WallTimeBudget(run.budget.max_train_minutes)] if run.budget.max_train_minutes else []
    mixture = len(tasks) > 1 or bool(run.tasks.task_steps)
    if mixture and frozen_rows is not None:
        raise ValueError("training_mode lifelong trains one task per phase; give one task.")
    with training_args.main_process_first(desc="dataset preparation"):
        if mixture:
            trainer, plan = mixture_trainer(tasks, context, run, callbacks)
            gen_kwargs = None
        else:
            trainer, gen_kwargs = single_task_trainer(tasks[0], context, run, frozen_rows, callbacks)
            batch_size = training_args.per_device_train_batch_size
            plan = {tasks[0]: {"steps": training_args.max_steps, "batch_size": batch_size}}
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = {**result.metrics, "train_wall_seconds": round(time.perf_counter() - started, 1)}
    if gen_kwargs is not None and trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate(metric_key_prefix="eval", **gen_kwargs))
    trainer.log_metrics("all", metrics)
    if trainer.is_world_process_zero():
        if {"asr", "speech_translation", DISTILLATION.name} & set(tasks):  # the saved processor prompts for ASR
            set_decoder_prompt(context, model_args.task)
        record = {"base": model_args.model_name_or_path, "command": ["scripts/train.py", *argv], "recipe": run.recipe,
                  "tasks": plan, "hyperparameters": effective_hyperparameters(model_args, training_args),
                  "model": vars(model_args), "data": vars(data_args), "budget": vars(run.budget),
                  "lifelong": vars(run.lifelong), "grokfast": vars(run.grokfast), "metrics": metrics,
                  "log_history": trainer.state.log_history}  # fmt: skip
        if teacher is not None:
            record["distillation"] = vars(run.distillation)
        save_hub_folder(trainer, processor, training_args.output_dir, record)
    return metrics
