#!/usr/bin/env python
"""Fine-tune WhisperMoE with transformers' Seq2SeqTrainer, from a JSON recipe and/or flags.

    python scripts/train.py [RECIPE.json] --model_name_or_path MODEL --train_manifest CSV --output_dir OUT [flags]

MODEL is a WhisperMoE folder, used as is, or a dense Whisper folder, upcycled on the fly (--num_experts,
--num_experts_per_tok). Without a recipe the project's default, configuration/recipes/asr-finetune.json, applies;
flags override the recipe. Every Seq2SeqTrainingArguments flag works (--max_steps, --gradient_accumulation_steps,
--resume_from_checkpoint, --report_to tensorboard, ...). The same command scales out unchanged with
`accelerate launch` or `torchrun --nproc_per_node N`.

OUT ends up a self-contained Hub folder (weights, code, processor) whose model card records the data, the recipe
and the evaluation results.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import concatenate_datasets  # noqa: E402
from transformers import Seq2SeqTrainingArguments, WhisperForConditionalGeneration  # noqa: E402

from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration, WhisperMoEProcessor  # noqa: E402
from modeling_whisper_moe.hub import atomic_directory  # noqa: E402
from modeling_whisper_moe.model_card import model_card  # noqa: E402
from processing import SpeechSeq2SeqCollator, WaveformAugmenter, load_asr_dataset, prepare_dataset, read_manifest  # noqa: E402
from processing.lifelong import (  # noqa: E402
    LifelongArguments,
    LifelongTrainer,
    ReplayFlagCollator,
    RestoreFrozenRows,
    apply_lifelong_mode,
    grow_for_phase,
    mix_replay,
    pseudo_label_manifests,
)
from processing.metrics import english_normalizer, make_compute_metrics  # noqa: E402
from processing.recipes import parse_recipe  # noqa: E402
from processing.text_data import (  # noqa: E402
    TextPairCollator,
    copy_pairs,
    prepare_text_pairs,
    read_text_pairs,
    split_held_out,
    write_held_out_ids,
)
from processing.training import TRAINING_MODES, WhisperMoETrainer, apply_training_mode  # noqa: E402

DEFAULT_RECIPE = REPO_ROOT / "configuration" / "recipes" / "asr-finetune.json"
SHUFFLE_BUFFER = 1_000  # examples held for shuffling a streamed training set
logger = logging.getLogger("train")


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "WhisperMoE folder, or dense Whisper folder to upcycle"})
    upcycle: bool = field(default=True, metadata={"help": "upcycle a dense checkpoint; false trains it dense"})
    num_experts: int = field(default=8, metadata={"help": "experts per sparse layer when upcycling a dense model"})
    num_experts_per_tok: int = field(default=2, metadata={"help": "top-k when upcycling a dense model"})
    training_mode: str = field(
        default="full", metadata={"help": f"one of {', '.join(TRAINING_MODES)}, lifelong (new experts only)"}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (training_mode=lora)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator (training_mode=lora)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "must stay 0: expert adapters have no input"})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "override the config's value"})
    router_z_loss_coef: float | None = field(default=None, metadata={"help": "override the config's value"})
    router_jitter_noise: float | None = field(default=None, metadata={"help": "override the config's value"})
    variable_length_audio: bool | None = field(
        default=None, metadata={"help": "encode only real frames, clips packed (no 30 s padding); changes outputs"}
    )
    language: str | None = field(default=None, metadata={"help": "language token for multilingual models, e.g. en"})
    task: str = field(default="transcribe", metadata={"help": "transcribe or translate (multilingual models)"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16/fp16 on GPU, fp32 on CPU), no"})
    text_encoder_layers: int | None = field(
        default=None, metadata={"help": "encoder layers text runs through (text_pairs_csv; default: all)"}
    )


@dataclass
class DataArguments:
    train_manifest: str | None = field(default=None, metadata={"help": "CSV path,text (paths relative to it)"})
    eval_manifest: str | None = field(default=None, metadata={"help": "defaults to train_manifest's eval_split"})
    train_split: str = field(default="train", metadata={"help": "rows of a manifest's split column to train on"})
    eval_split: str = field(default="test", metadata={"help": "rows of a manifest's split column to evaluate on"})
    exclude_speakers: list[str] = field(default_factory=list, metadata={"help": "speakers kept out of training"})
    dataset_name: str | None = field(default=None, metadata={"help": "a datasets source, e.g. audiofolder"})
    dataset_config_name: str | None = field(default=None)
    data_dir: str | None = field(default=None, metadata={"help": "data_dir for folder-based datasets"})
    audio_column: str = field(default="audio")
    text_column: str = field(default="text")
    streaming: bool = field(default=False, metadata={"help": "read the training data lazily (too big for disk)"})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    max_label_length: int = field(default=448, metadata={"help": "drop examples with longer labels"})
    augment: bool = field(default=False, metadata={"help": "gain / noise / speed augmentation of training audio"})
    text_pairs_csv: str | None = field(
        default=None, metadata={"help": "train text translation on this CSV of sentence pairs instead of speech"}
    )
    source_column: str = field(default="en", metadata={"help": "text_pairs_csv column translated from"})
    target_column: str = field(default="de", metadata={"help": "text_pairs_csv column translated into"})
    src_lang: str | None = field(default=None, metadata={"help": "source language token; default: source_column"})
    tgt_lang: str | None = field(default=None, metadata={"help": "target language token; default: target_column"})
    held_out_size: int = field(default=500, metadata={"help": "pairs held out (hashed ids), written to OUT"})
    copy_fraction: float = field(
        default=0.0,
        metadata={"help": "add this share of training sources as source->source copies (decoder prompted with the "
                  "source language): teaches cross-attention to read the text encoder"},
    )  # fmt: skip
    max_source_length: int = field(default=128, metadata={"help": "drop text pairs with longer source ids"})
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "processes for feature extraction; one is fastest on CPU (forked workers fight torch's "
                  "threads: 15x slower here, and one run hung)"},
    )  # fmt: skip


def parse_arguments(argv: list[str]):
    """Recipe (first argument if it ends in .json, else the default recipe) overlaid with the flags."""
    (model_args, data_args, lifelong_args, training_args), recipe = parse_recipe(
        argv, (ModelArguments, DataArguments, LifelongArguments, Seq2SeqTrainingArguments), default=DEFAULT_RECIPE
    )
    return model_args, data_args, lifelong_args, training_args, recipe


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def load_model(args: ModelArguments) -> tuple[torch.nn.Module, WhisperMoEProcessor]:
    """The WhisperMoE to train (upcycled when the checkpoint is dense) and its processor."""
    config_file = Path(args.model_name_or_path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--model_name_or_path {args.model_name_or_path} has no config.json")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type == "whisper" and not args.upcycle:
        model = WhisperForConditionalGeneration.from_pretrained(args.model_name_or_path)  # the dense baseline
    elif model_type == "whisper":
        logger.info(
            "Upcycling dense %s to %d experts, top-%d",
            args.model_name_or_path,
            args.num_experts,
            args.num_experts_per_tok,
        )
        dense = WhisperForConditionalGeneration.from_pretrained(args.model_name_or_path)
        model = WhisperMoEForConditionalGeneration.from_dense(
            dense, num_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_tok
        )
    elif model_type == WhisperMoEConfig.model_type:
        model = WhisperMoEForConditionalGeneration.from_pretrained(args.model_name_or_path)
    else:
        raise ValueError(f"{args.model_name_or_path} holds a {model_type!r} model; expected whisper or whisper_moe")
    if isinstance(model, WhisperMoEForConditionalGeneration):
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "variable_length_audio"):
            if getattr(args, name) is not None:
                setattr(model.config, name, getattr(args, name))
        model.config.check_moe_fields()
    processor = WhisperMoEProcessor.from_pretrained(args.model_name_or_path)
    if model.generation_config.is_multilingual:
        processor.tokenizer.set_prefix_tokens(language=args.language, task=args.task)
        model.generation_config.language, model.generation_config.task = args.language, args.task
    model.config.use_cache = False  # training never reuses keys/values; generation turns the cache back on
    return model, processor


def set_mixed_precision(model_args: ModelArguments, training_args: Seq2SeqTrainingArguments) -> None:
    """bf16 on GPUs that have it, else fp16; fp32 on CPU."""
    if model_args.mixed_precision not in ("auto", "no"):
        raise ValueError(f"--mixed_precision must be auto or no, got {model_args.mixed_precision!r}")
    if model_args.mixed_precision == "auto" and torch.cuda.is_available() and not training_args.fp16:
        training_args.bf16 = torch.cuda.is_bf16_supported()
        training_args.fp16 = not training_args.bf16


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def load_splits(args: DataArguments, seed: int):
    """Raw (audio, text) train and eval sets from a manifest or a datasets source."""
    if args.train_manifest:
        train = read_manifest(args.train_manifest, split=_split_if_column(args.train_manifest, args.train_split),
                              exclude_speakers=args.exclude_speakers or None)  # fmt: skip
        eval_manifest = args.eval_manifest or args.train_manifest
        evaluation = read_manifest(eval_manifest, split=_split_if_column(eval_manifest, args.eval_split))
    elif args.dataset_name:
        load = dict(config=args.dataset_config_name, audio_column=args.audio_column, text_column=args.text_column,
                    data_dir=args.data_dir)  # fmt: skip
        train = load_asr_dataset(args.dataset_name, split=args.train_split, streaming=args.streaming, **load)
        evaluation = load_asr_dataset(args.dataset_name, split=args.eval_split, **load)
    else:
        raise ValueError("Give --train_manifest or --dataset_name")
    if args.max_train_samples and not args.streaming:
        train = train.shuffle(seed=seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    return train, evaluation


def _split_if_column(manifest: str, split: str) -> str | None:
    """Filter on the split column only when the manifest has one (a plain path,text CSV is used whole)."""
    with open(manifest, encoding="utf-8") as handle:
        header = handle.readline().strip().split(",")
    return split if "split" in header else None


def load_text_splits(args: DataArguments, model, processor, seed: int, output_dir: str):
    """Tokenised (train, held-out) text pairs; the held-out ids are written to `output_dir` first."""
    src_lang, tgt_lang = args.src_lang or args.source_column, args.tgt_lang or args.target_column
    pairs = read_text_pairs(args.text_pairs_csv, args.source_column, args.target_column)
    train, held_out = split_held_out(pairs, args.held_out_size, seed)
    record = {"csv": args.text_pairs_csv, "source_column": args.source_column, "target_column": args.target_column,
              "src_lang": src_lang, "tgt_lang": tgt_lang, "seed": seed}  # fmt: skip
    write_held_out_ids(held_out["id"], output_dir, record)
    if args.max_train_samples:
        train = train.shuffle(seed=seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        held_out = held_out.select(range(min(args.max_eval_samples, len(held_out))))
    lengths = dict(max_source_length=args.max_source_length, max_label_length=args.max_label_length)
    encode = dict(tokenizer=processor.tokenizer, generation_config=model.generation_config, src_lang=src_lang,
                  **lengths)  # fmt: skip
    prepared = prepare_text_pairs(train, tgt_lang=tgt_lang, **encode)
    if args.copy_fraction:
        copies = copy_pairs(train, args.copy_fraction, seed)
        prepared = concatenate_datasets([prepared, prepare_text_pairs(copies, tgt_lang=src_lang, **encode)])
    return prepared, prepare_text_pairs(held_out, tgt_lang=tgt_lang, **encode)


def prepare_splits(train, evaluation, processor, args: DataArguments, seed: int):
    augment = WaveformAugmenter(seed=seed) if args.augment else None
    if args.streaming and hasattr(train, "to_iterable_dataset"):
        train = train.to_iterable_dataset()
    if not hasattr(train, "__len__"):
        train = train.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    workers = args.preprocessing_num_workers
    train = prepare_dataset(
        train, processor, max_label_length=args.max_label_length, augment=augment, num_proc=workers
    )
    evaluation = prepare_dataset(evaluation, processor, max_label_length=args.max_label_length, num_proc=workers)
    return train, evaluation


def with_replay(train, model, processor, data_args: DataArguments, lifelong_args: LifelongArguments, training_args):
    """`train` mixed with the replay manifests' audio, transcribed by the model before this phase trains it."""
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    labels_csv = pseudo_label_manifests(
        model, processor, lifelong_args.replay_manifest, output_dir / "replay_pseudo_labels.csv"
    )
    replay = prepare_dataset(read_manifest(labels_csv), processor, max_label_length=data_args.max_label_length)
    return mix_replay(train, replay, lifelong_args.replay_fraction, training_args.seed)


# ---------------------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------------------


# what the model card lists of the run's effective settings (recipe overlaid with flags)
CARD_HYPERPARAMETERS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                        "num_train_epochs", "warmup_steps", "lr_scheduler_type", "adam_beta1", "adam_beta2",
                        "adam_epsilon", "weight_decay", "seed", "bf16", "fp16", "world_size")  # fmt: skip


def effective_hyperparameters(model_args: ModelArguments, training_args: Seq2SeqTrainingArguments) -> dict:
    values = {name: getattr(training_args, name) for name in CARD_HYPERPARAMETERS}
    values["lr_scheduler_type"] = str(values["lr_scheduler_type"]).split(".")[-1].lower()
    return {"training_mode": model_args.training_mode, **values}


def save_hub_folder(trainer: WhisperMoETrainer, processor, output_dir: str, training_record: dict) -> None:
    """Final weights (LoRA merged into the base), processor and a model card recording how they were made."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(Path(output_dir) / "adapter")  # the adapters alone, loadable onto the base
        model = model.merge_and_unload()
    model.config.use_cache = True
    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if isinstance(model, WhisperMoEForConditionalGeneration):  # a dense baseline keeps the record only
            (staging / "README.md").write_text(model_card(model, training=training_record), encoding="utf-8")
        (staging / "training_record.json").write_text(json.dumps(training_record, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, lifelong_args, training_args, recipe = parse_arguments(
        sys.argv[1:] if argv is None else argv
    )
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    transformers.utils.logging.set_verbosity_warning()
    transformers.set_seed(training_args.seed)
    set_mixed_precision(model_args, training_args)
    model, processor = load_model(model_args)
    text_pairs = data_args.text_pairs_csv is not None
    if text_pairs and not model.config.text_frontend:
        # the decoder's token embeddings, rescaled, and the encoder's positions
        model.add_text_frontend(text_encoder_layers=model_args.text_encoder_layers)
    elif text_pairs and model_args.text_encoder_layers is not None:  # a trained front-end, given a new depth
        model.config.check_text_encoder_layers(model_args.text_encoder_layers)
        model.config.text_encoder_layers = model_args.text_encoder_layers
    if lifelong_args.grow_experts:
        grow_for_phase(model, lifelong_args, training_args.seed)
    frozen_rows = None
    if model_args.training_mode == "lifelong":
        frozen_rows = apply_lifelong_mode(model, lifelong_args.lifelong_trainable)
    else:
        model = apply_training_mode(model, model_args.training_mode, model_args.lora_r, model_args.lora_alpha,
                                    model_args.lora_dropout)  # fmt: skip
    with training_args.main_process_first(desc="dataset preparation"):
        if text_pairs:
            train, evaluation = load_text_splits(data_args, model, processor, training_args.seed,
                                                 training_args.output_dir)  # fmt: skip
        else:
            raw_train, raw_eval = load_splits(data_args, training_args.seed)
            train, evaluation = prepare_splits(raw_train, raw_eval, processor, data_args, training_args.seed)
            if lifelong_args.replay_manifest:
                train = with_replay(train, model, processor, data_args, lifelong_args, training_args)
    if text_pairs:  # held-out loss here; BLEU / chrF by scripts/evaluate_translation.py on the saved folder
        collator, compute_metrics = TextPairCollator(model.config.pad_token_id), None
        gen_kwargs = {"language": data_args.tgt_lang or data_args.target_column}
    else:
        collator = SpeechSeq2SeqCollator(processor, model.config.decoder_start_token_id)
        compute_metrics = make_compute_metrics(processor.tokenizer, english_normalizer(model_args.model_name_or_path))
        gen_kwargs = {}
    trainer_kwargs = {}
    if frozen_rows is not None:
        collator = ReplayFlagCollator(collator)
        trainer_kwargs = {"lifelong": lifelong_args, "callbacks": [RestoreFrozenRows(frozen_rows)]}
    trainer = (LifelongTrainer if frozen_rows is not None else WhisperMoETrainer)(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        compute_metrics=compute_metrics,
        processing_class=processor,
        **trainer_kwargs,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = {**train_result.metrics, **trainer.evaluate(metric_key_prefix="eval", **gen_kwargs)}
    trainer.log_metrics("all", metrics)
    if trainer.is_world_process_zero():
        record = {"base": model_args.model_name_or_path, "command": ["scripts/train.py", *(argv or sys.argv[1:])],
                  "recipe": recipe, "hyperparameters": effective_hyperparameters(model_args, training_args),
                  "model": vars(model_args), "data": vars(data_args), "lifelong": vars(lifelong_args),
                  "metrics": metrics}  # fmt: skip
        save_hub_folder(trainer, processor, training_args.output_dir, record)
    return metrics


if __name__ == "__main__":
    main()
