#!/usr/bin/env python
"""Train a WhisperMoE text-to-speech model from scratch with transformers' Trainer, from a JSON recipe and/or flags.

    python scripts/train_tts.py configuration/recipes/tts-digits.json [--output_dir OUT] [--max_steps N] [flags]

The corpus is generated: every digit word is spoken by espeak-ng in each voice, speed and pitch of the recipe, and
training sequences are concatenations of those words with random pauses, so each token's duration in frames is
exact (see processing/tts_data.py). Held-out 4-digit sequences never occur in training, not even inside longer
sequences; scripts/evaluate_tts.py measures intelligibility on them. Every TrainingArguments flag works.

OUT ends up a self-contained Hub folder (weights, code, tokenizer, training record) that
`pipeline("text-to-audio", model=OUT, trust_remote_code=True)` loads.
"""

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
from torch.utils.data import ConcatDataset, Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from modeling_whisper_moe import WhisperMoEConfig  # noqa: E402
from modeling_whisper_moe.hub import atomic_directory  # noqa: E402
from modeling_whisper_moe.modeling_whisper_moe_tts import WhisperMoEForTextToSpeech  # noqa: E402
from processing.recipes import parse_recipe  # noqa: E402
from processing.tts_data import (  # noqa: E402
    AlignedRecordingsDataset,
    DigitClipBank,
    EspeakSentenceDataset,
    SpokenDigitsDataset,
    TextToSpeechCollator,
    align_with_whisper,
)

BUNDLED_PREFIX = "bundled:"  # tokenizer_name_or_path "bundled:base" converts the bundled checkpoint once
CACHE_DIR = Path.home() / ".cache" / "whisper-moe"
CORPORA = ("digits", "sentences")
LOGGED_PARTS = (
    "mel_loss",
    "duration_loss",
    "encoder_aux_loss",
    "decoder_aux_loss",
    "encoder_z_loss",
    "decoder_z_loss",
)
logger = logging.getLogger("train_tts")


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    tokenizer_name_or_path: str = field(
        default="bundled:base", metadata={"help": "Whisper folder whose tokenizer feeds the text front-end"}
    )
    d_model: int = field(default=256, metadata={"help": "width of every layer"})
    encoder_layers: int = field(default=3, metadata={"help": "text-encoder layers"})
    decoder_layers: int = field(default=4, metadata={"help": "mel-decoder layers"})
    attention_heads: int = field(default=4, metadata={"help": "heads in every attention block"})
    ffn_dim: int = field(default=512, metadata={"help": "hidden units of each expert"})
    num_experts: int = field(default=4, metadata={"help": "experts per sparse layer"})
    num_experts_per_tok: int = field(default=2, metadata={"help": "top-k routing"})
    tts_postnet_layers: int = field(default=3, metadata={"help": "post-net convolutions (0: none)"})
    tts_reduction_factor: int = field(default=3, metadata={"help": "mel frames per decoder position"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in attention outputs, feed-forward and heads"})
    max_text_positions: int = field(default=128, metadata={"help": "longest text in tokens"})


@dataclass
class DataArguments:
    corpus: str = field(default="digits", metadata={"help": f"one of {CORPORA}"})
    ljspeech_dir: str | None = field(
        default=None, metadata={"help": "sentences: an LJSpeech folder (metadata.csv, wavs/)"}
    )
    max_sentences: int | None = field(default=None, metadata={"help": "sentences: use the first N rows only"})
    aligner: str = field(
        default="bundled:base", metadata={"help": "sentences: Whisper folder whose word timestamps time recordings"}
    )
    voices: list[str] = field(default_factory=lambda: ["en-us", "en-gb"], metadata={"help": "espeak-ng voices"})
    speeds: list[int] = field(default_factory=lambda: [160], metadata={"help": "espeak-ng words per minute"})
    pitches: list[int] = field(default_factory=lambda: [50], metadata={"help": "espeak-ng pitch, 0-99"})
    min_digits: int = field(default=1, metadata={"help": "shortest training sequence"})
    max_digits: int = field(default=7, metadata={"help": "longest training sequence"})
    pause_frames_min: int = field(default=2, metadata={"help": "shortest pause after a word, 10 ms frames"})
    pause_frames_max: int = field(default=12, metadata={"help": "longest pause after a word, 10 ms frames"})
    num_examples: int = field(default=200_000, metadata={"help": "distinct training sequences (drawn on the fly)"})
    speaker_dropout: float = field(default=0.2, metadata={"help": "share of examples shown with no speaker"})


@dataclass
class BudgetArguments:
    max_train_minutes: float | None = field(
        default=None, metadata={"help": "stop training (and save) after this many minutes of wall time"}
    )
    num_threads: int | None = field(
        default=None,
        metadata={"help": "torch CPU threads; 1 on a shared machine (busy cores make threads spin-wait: 10x slower)"},
    )


def parse_arguments(
    argv: list[str],
) -> tuple[ModelArguments, DataArguments, BudgetArguments, TrainingArguments, dict]:
    """Recipe (first argument, a .json file) overlaid with the flags."""
    usage = "usage: train_tts.py RECIPE.json [flags]; e.g. configuration/recipes/tts-digits.json"
    parsed, recipe = parse_recipe(
        argv, (ModelArguments, DataArguments, BudgetArguments, TrainingArguments), usage=usage
    )
    return (*parsed, recipe)


# ---------------------------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------------------------


def tokenizer_folder(name_or_path: str) -> str:
    """A folder holding a Whisper tokenizer; "bundled:<size>" converts the bundled checkpoint (once, cached)."""
    if not name_or_path.startswith(BUNDLED_PREFIX):
        return name_or_path
    from processing.convert_ct2 import bundled_checkpoint, convert_ct2

    size = name_or_path[len(BUNDLED_PREFIX) :]
    folder = CACHE_DIR / f"whisper-{size}"
    if not (folder / "config.json").is_file():
        convert_ct2(bundled_checkpoint(size), folder)
    return str(folder)


def build_model(args: ModelArguments, tokenizer, num_voices: int) -> WhisperMoEForTextToSpeech:
    """A randomly initialised text-to-speech model whose text front-end reads `tokenizer`'s ids."""
    config = WhisperMoEConfig(
        vocab_size=len(tokenizer),
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
        num_mel_bins=80,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
        text_frontend=True,
        max_text_positions=args.max_text_positions,
        tts_speaker_embedding_dim=num_voices,
        tts_postnet_layers=args.tts_postnet_layers,
        tts_reduction_factor=args.tts_reduction_factor,
    )
    return WhisperMoEForTextToSpeech(config)


def num_speakers(args: DataArguments) -> int:
    """The espeak-ng voices, plus the recorded speaker of the sentences corpus."""
    return len(args.voices) + (1 if args.corpus == "sentences" else 0)


def build_dataset(args: DataArguments, tokenizer, frames_multiple: int, seed: int, output_dir: str) -> Dataset:
    if args.corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {args.corpus!r}.")
    if args.corpus == "sentences":
        return build_sentences(args, tokenizer, frames_multiple, seed, output_dir)
    started = time.perf_counter()
    bank = DigitClipBank.from_espeak(args.voices, args.speeds, args.pitches)
    logger.info("spoke %d digit clips in %.1f s", len(bank.clips), time.perf_counter() - started)
    return SpokenDigitsDataset(
        bank,
        tokenizer,
        num_examples=args.num_examples,
        min_digits=args.min_digits,
        max_digits=args.max_digits,
        pause_frames=(args.pause_frames_min, args.pause_frames_max),
        frames_multiple=frames_multiple,
        seed=seed,
    )


def build_sentences(args: DataArguments, tokenizer, frames_multiple: int, seed: int, output_dir: str) -> Dataset:
    """LJSpeech text spoken word by word by the espeak-ng voices, plus the LJSpeech recordings timed by Whisper's
    word timestamps (speaker index len(voices)); the alignment is cached in output_dir/alignments.json."""
    if args.ljspeech_dir is None:
        raise ValueError("corpus 'sentences' needs --ljspeech_dir (a folder with metadata.csv and wavs/).")
    folder = Path(args.ljspeech_dir)
    with open(folder / "metadata.csv", encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("|") for line in handle if line.strip()][: args.max_sentences]
    speakers = num_speakers(args)
    synthetic = EspeakSentenceDataset([row[-1] for row in rows], args.voices, args.speeds, args.pitches, tokenizer,
                                      args.num_examples, (args.pause_frames_min, args.pause_frames_max), speakers,
                                      frames_multiple, seed=seed)  # fmt: skip
    cache = Path(output_dir) / "alignments.json"
    if cache.is_file():
        alignments = json.loads(cache.read_text(encoding="utf-8"))
    else:
        paths = [str(folder / "wavs" / f"{row[0]}.wav") for row in rows]
        alignments = align_with_whisper(paths, tokenizer_folder(args.aligner))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(alignments), encoding="utf-8")
    recorded = AlignedRecordingsDataset(alignments, len(args.voices), speakers, tokenizer, frames_multiple)
    logger.info("%d synthetic sentences, %d aligned recordings of %d", len(synthetic), len(recorded), len(rows))
    return ConcatDataset([synthetic, recorded])


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


class TextToSpeechTrainer(Trainer):
    """Trainer that also logs the loss parts (mel L1, duration MSE, router losses), averaged between logs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parts: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            for name in LOGGED_PARTS:
                if getattr(outputs, name, None) is not None:
                    self._parts[name].append(getattr(outputs, name).item())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._parts and "loss" in logs:
            logs.update({name: round(sum(values) / len(values), 4) for name, values in self._parts.items()})
            self._parts.clear()
        super().log(logs, *args, **kwargs)


class WallTimeBudget(TrainerCallback):
    """Stop training once `minutes` of wall time have passed (the learning-rate schedule still follows max_steps)."""

    def __init__(self, minutes: float):
        if minutes <= 0:
            raise ValueError(f"max_train_minutes must be positive, got {minutes}.")
        self.seconds = minutes * 60
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.started > self.seconds:
            logger.info("wall-time budget of %.1f min reached at step %d", self.seconds / 60, state.global_step)
            control.should_training_stop = True
        return control


def save_hub_folder(model: WhisperMoEForTextToSpeech, tokenizer, output_dir: str, record: dict) -> None:
    """Weights, code, tokenizer and the training record, written atomically."""
    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "training_record.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, budget_args, training_args, recipe = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transformers.utils.logging.set_verbosity_warning()
    transformers.set_seed(training_args.seed)
    if budget_args.num_threads:
        torch.set_num_threads(budget_args.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(model_args.tokenizer_name_or_path))
    dataset = build_dataset(data_args, tokenizer, model_args.tts_reduction_factor, training_args.seed,
                            training_args.output_dir)  # fmt: skip
    model = build_model(model_args, tokenizer, num_voices=num_speakers(data_args))
    logger.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    collator = TextToSpeechCollator(tokenizer.pad_token_id, data_args.speaker_dropout, training_args.seed)
    callbacks = [WallTimeBudget(budget_args.max_train_minutes)] if budget_args.max_train_minutes else []
    trainer = TextToSpeechTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collator, callbacks=callbacks
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = {**result.metrics, "train_wall_seconds": round(time.perf_counter() - started, 1)}
    trainer.log_metrics("train", metrics)
    if trainer.is_world_process_zero():
        record = {
            "command": ["scripts/train_tts.py", *(sys.argv[1:] if argv is None else argv)],
            "recipe": recipe,
            "model": vars(model_args),
            "data": vars(data_args),
            "budget": vars(budget_args),
            "voices": data_args.voices,
            "metrics": metrics,
        }
        save_hub_folder(trainer.model, tokenizer, training_args.output_dir, record)
    return metrics


if __name__ == "__main__":
    main()
