"""Distil-Whisper (Gandhi et al. 2023) for a WhisperMoE teacher: the arguments, the student, the frozen encoder's
outputs kept on disk, the loss and the trainer. The task that feeds it is processing/tasks/distillation.py.

The student is `processing.student.make_student` of the teacher: the teacher's encoder and embeddings and a few of its
decoder layers. It learns from the teacher's own transcripts (pseudo-labels, processing/pseudo_labels.py) with

    loss = ce_weight * CE(student, pseudo-labels) + kl_weight * T^2 * KL(teacher_T || student_T) + router losses

where `_T` is a softmax at temperature T over each label position (Distil-Whisper's run_distillation.py: 0.8, 1.0,
T = 2). The student's encoder is the teacher's, frozen, so the encoder output of a batch is computed once and both
decoders read it; with `cache_encoder_states` it is computed once per clip, when the clips are pseudo-labelled, and
read back from disk every epoch (the encoder is ~3x the cost of both decoders on a CPU).

Also home of the two pieces lifelong training shares: the softened KL (`distillation_loss`) and a teacher's
teacher-forced logits on a batch whose encoder output is already known (`teacher_logits`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from modeling_whisper_moe.hub import atomic_write
from modeling_whisper_moe.modeling_whisper_moe import IGNORE_INDEX
from processing.collator import SpeechSeq2SeqCollator
from processing.data import LABEL_TEXT_PREFIX
from processing.pseudo_labels import PSEUDO_LABEL_BATCH, log_mel
from processing.student import DENSE_MERGES, make_student
from processing.training import WhisperMoETrainer

# Distil-Whisper's run_distillation.py: CE on pseudo-labels weighted 0.8 against KL at 1.0, softmax temperature 2
DISTIL_WHISPER_CE_WEIGHT = 0.8
DISTIL_WHISPER_KL_WEIGHT = 1.0
DISTIL_WHISPER_TEMPERATURE = 2.0
DISTIL_WHISPER_WER_THRESHOLD = 10.0  # percent: pseudo-labels further than this from the reference are dropped
DISTIL_WHISPER_DECODER_LAYERS = 2
ENCODER_STATES_KEY = "encoder_hidden_states"  # a batch's cached encoder output (batch, positions, d_model)
# float16 halves the disk and the reads; its ~1e-3 relative rounding is far below what the decoders are sensitive to
ENCODER_STATE_DTYPE = np.float16
CACHE_INFO = "cache.json"  # which encoder wrote the cache: a cache of another teacher is refused
logger = logging.getLogger(__name__)


@dataclass
class DistillationArguments:
    """What the `distillation` task trains and on what (see the module docstring)."""

    student_name_or_path: str | None = field(
        default=None, metadata={"help": "a student folder (whisper-moe make-student); default: made from the teacher"}
    )
    student_decoder_layers: int = field(
        default=DISTIL_WHISPER_DECODER_LAYERS, metadata={"help": "decoder layers the student keeps (first and last)"}
    )
    student_dense_decoder: str | None = field(
        default=None, metadata={"help": "average: merge each kept layer's experts into one block; default: sparse"}
    )
    distill_manifest: list[str] = field(
        default_factory=list, metadata={"help": "CSVs path,text of training audio (empty text: unlabeled audio)"}
    )
    distill_max_per_manifest: int = field(default=0, metadata={"help": "clips taken of each manifest (0: all)"})
    spoken_sentences_csv: str | None = field(
        default=None, metadata={"help": "a CSV of sentences espeak-ng speaks as more training audio (Tatoeba)"}
    )
    spoken_sentences_column: str = field(default="en", metadata={"help": "the column of spoken_sentences_csv"})
    spoken_sentences: int = field(default=0, metadata={"help": "sentences spoken (a seeded sample; 0: none)"})
    wer_threshold: float = field(
        default=DISTIL_WHISPER_WER_THRESHOLD,
        metadata={"help": "drop clips whose pseudo-label WER (percent) against the reference exceeds this"},
    )
    ce_weight: float = field(default=DISTIL_WHISPER_CE_WEIGHT, metadata={"help": "weight of CE on pseudo-labels"})
    kl_weight: float = field(default=DISTIL_WHISPER_KL_WEIGHT, metadata={"help": "weight of T^2 * KL to the teacher"})
    kl_temperature: float = field(default=DISTIL_WHISPER_TEMPERATURE, metadata={"help": "softmax temperature T"})
    cache_encoder_states: bool = field(
        default=True, metadata={"help": "encode each clip once and read the encoder output back every epoch"}
    )
    pseudo_label_batch_size: int = field(default=PSEUDO_LABEL_BATCH, metadata={"help": "clips labelled at once"})

    def __post_init__(self):
        for name in ("ce_weight", "kl_weight", "wer_threshold", "distill_max_per_manifest", "spoken_sentences"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}.")
        if self.ce_weight == self.kl_weight == 0:
            raise ValueError("ce_weight and kl_weight are both 0: the student would learn nothing.")
        if self.kl_temperature <= 0:
            raise ValueError(f"kl_temperature must be positive, got {self.kl_temperature}.")
        if self.pseudo_label_batch_size < 1:
            raise ValueError(f"pseudo_label_batch_size must be positive, got {self.pseudo_label_batch_size}.")
        if self.student_dense_decoder not in (None, "average"):
            raise ValueError(
                f"student_dense_decoder must be unset (sparse) or 'average', got {self.student_dense_decoder!r}; "
                f"for {DENSE_MERGES[1]!r} make the student with `whisper-moe make-student --dense-decoder busiest "
                "--manifest ...` and pass its folder as student_name_or_path."
            )
        if self.spoken_sentences and not self.spoken_sentences_csv:
            raise ValueError(f"spoken_sentences={self.spoken_sentences} needs spoken_sentences_csv.")


# ---------------------------------------------------------------------------------------------------------------
# The student
# ---------------------------------------------------------------------------------------------------------------


def build_student(teacher: nn.Module, args: DistillationArguments) -> nn.Module:
    """The student to train: `student_name_or_path`, or `make_student` of the teacher. Either way its encoder must
    be the teacher's (the shared encoder pass and the cache rely on it)."""
    from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration

    if not isinstance(teacher.config, WhisperMoEConfig):
        raise ValueError(f"distillation needs a WhisperMoE teacher (a WhisperMoE folder, or upcycle=true), got a "
                         f"{type(teacher).__name__}.")  # fmt: skip
    if args.student_name_or_path:
        student = WhisperMoEForConditionalGeneration.from_pretrained(args.student_name_or_path)
    else:
        student = make_student(teacher, args.student_decoder_layers, args.student_dense_decoder)
    if not same_encoder(student, teacher):
        raise ValueError(f"the student {args.student_name_or_path} has an encoder other than the teacher's; make it "
                         "from this teacher (whisper-moe make-student TEACHER DST).")  # fmt: skip
    student.config.use_cache = teacher.config.use_cache
    return student.train()


def same_encoder(student: nn.Module, teacher: nn.Module) -> bool:
    """Whether the two encoders hold the same tensors (names and values)."""
    mine, theirs = student.get_encoder().state_dict(), teacher.get_encoder().state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[name], theirs[name]) for name in mine)


def encoder_frozen(model: nn.Module) -> bool:
    return not any(parameter.requires_grad for parameter in model.get_encoder().parameters())


# ---------------------------------------------------------------------------------------------------------------
# The frozen encoder's output, once per clip
# ---------------------------------------------------------------------------------------------------------------


class EncoderStateCache:
    """The frozen encoder's output of each clip, one .npy file per clip (named by a hash of its path) under
    `folder`, each written once (a staging file, then a rename) and read back every epoch. `fill` resumes: it
    encodes only the clips that have no file yet. `cache.json` records the encoder that wrote it."""

    def __init__(self, folder: Path, encoder_name: str, d_model: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        info = {"encoder": str(encoder_name), "d_model": d_model}
        path = self.folder / CACHE_INFO
        if path.is_file() and json.loads(path.read_text(encoding="utf-8")) != info:
            raise ValueError(f"{self.folder} caches the encoder {json.loads(path.read_text())}, not {info}; remove it "
                             "or give another output_dir.")  # fmt: skip
        if not path.is_file():
            with atomic_write(path) as staging:
                staging.write_text(json.dumps(info) + "\n", encoding="utf-8")

    def file(self, clip: str) -> Path:
        return self.folder / f"{hashlib.sha1(clip.encode()).hexdigest()}.npy"

    @torch.no_grad()
    def fill(self, model: nn.Module, processor, clips: Sequence[str], batch_size: int) -> None:
        """Encode (30 s log-mel windows, the model's encoder) every clip that has no file yet."""
        todo = [clip for clip in dict.fromkeys(clips) if not self.file(clip).is_file()]
        if todo:
            logger.info("encoder cache: %d of %d clips to encode into %s", len(todo), len(clips), self.folder)
        encoder = model.get_encoder()
        for start in range(0, len(todo), batch_size):
            paths = todo[start : start + batch_size]
            features = log_mel(processor, paths).to(model.device, model.dtype)
            states = encoder(features).last_hidden_state.float().cpu().numpy().astype(ENCODER_STATE_DTYPE)
            for path, state in zip(paths, states):
                with atomic_write(self.file(path)) as staging:
                    np.save(staging, state)
            logger.info("encoder cache: %d / %d clips", start + len(paths), len(todo))

    def load(self, clips: Sequence[str]) -> torch.Tensor:
        """(batch, positions, d_model) float32 encoder output of `clips`."""
        missing = [clip for clip in clips if not self.file(clip).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} clip(s) have no cached encoder output in {self.folder}, e.g. "
                                    f"{missing[0]}; run fill() first.")  # fmt: skip
        return torch.from_numpy(np.stack([np.load(self.file(clip)) for clip in clips]).astype(np.float32))


class CachedStatesDataset(torch.utils.data.Dataset):
    """Training items from cached encoder outputs: {ENCODER_STATES_KEY: (positions, d_model), "labels": ids}.

    rows: a pseudo-label manifest's `audio` and `text` (the label) columns; labels are tokenised as
    `processing.data.prepare_dataset` does (prompt, leading space, text, end of text), and rows with more than
    `max_label_length` tokens are left out.
    """

    def __init__(self, rows: Dataset, tokenizer, cache: EncoderStateCache, max_label_length: int):
        self.cache = cache
        self.items = []
        for audio, text in zip(rows["audio"], rows["text"]):
            labels = tokenizer(LABEL_TEXT_PREFIX + text.strip() if text.strip() else "").input_ids
            if len(labels) <= max_label_length:
                self.items.append((audio, labels))
        if not self.items:
            raise ValueError(f"no pseudo-label of {len(rows)} fits max_label_length={max_label_length} tokens.")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        audio, labels = self.items[index]
        return {ENCODER_STATES_KEY: self.cache.load([audio])[0], "labels": labels}


@dataclass
class CachedStatesCollator(SpeechSeq2SeqCollator):
    """`CachedStatesDataset` items -> {ENCODER_STATES_KEY: (batch, positions, d_model), "labels": (batch, tgt_len)},
    the labels padded as SpeechSeq2SeqCollator pads them."""

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("CachedStatesCollator got an empty list of examples")
        states = torch.stack([torch.as_tensor(example[ENCODER_STATES_KEY]) for example in examples])
        return {ENCODER_STATES_KEY: states, "labels": self._labels(examples)}


def filter_by_wer(rows: Dataset, threshold: float) -> Dataset:
    """The rows of a pseudo-label manifest (processing/pseudo_labels.py) whose WER is at most `threshold` percent;
    rows without a reference (an empty `wer`: unlabeled audio) are kept."""
    if "wer" not in rows.column_names:
        raise ValueError(f"a pseudo-label manifest has a 'wer' column; these rows have only {rows.column_names}.")
    kept = rows.filter(lambda row: str(row["wer"]).strip() == "" or float(row["wer"]) <= threshold)
    logger.info("WER filter (<= %.1f %%): kept %d of %d clips", threshold, len(kept), len(rows))
    if len(kept) == 0:
        raise ValueError(f"the WER filter dropped all {len(rows)} clips (wer_threshold={threshold}); raise it.")
    return kept


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, token_mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) of the softened token distributions, times T^2, averaged over `token_mask` tokens.

    logits: (batch, tgt_len, vocab); token_mask: (batch, tgt_len), 1 = a token to distil.
    """
    teacher = (teacher_logits.float() / temperature).log_softmax(dim=-1)
    student = (student_logits.float() / temperature).log_softmax(dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)  # (batch, tgt_len)
    mask = token_mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1.0) * temperature**2


@torch.no_grad()
def teacher_logits(
    teacher: nn.Module, inputs: dict, encoder_hidden_states: torch.Tensor | None = None
) -> torch.Tensor:
    """The teacher's logits (batch, tgt_len, vocab) on the labels of `inputs`, teacher-forced. Given the encoder's
    output of the batch (batch, positions, d_model), the teacher decodes from it and does not encode again."""
    kwargs = {key: value for key, value in inputs.items() if key != "labels"}
    labels = inputs["labels"]
    kwargs["decoder_input_ids"] = shift_tokens_right(
        labels, teacher.config.pad_token_id, teacher.config.decoder_start_token_id
    )
    if encoder_hidden_states is not None:
        kwargs.pop("input_features", None)
        kwargs["encoder_outputs"] = (encoder_hidden_states.detach(),)
    return teacher(**kwargs, output_router_logits=False).logits


def distillation_objective(
    outputs, teacher: torch.Tensor, labels: torch.Tensor, args: DistillationArguments, num_items_in_batch=None
) -> dict[str, torch.Tensor]:
    """{"loss", "ce", "kl"} of one batch: loss = ce_weight * ce + kl_weight * kl + the student's router losses.

    outputs: the student's forward with `labels` (its `loss` is the token CE plus `aux_loss`, the CE over
    `num_items_in_batch` tokens under gradient accumulation); teacher: the teacher's logits (batch, tgt_len, vocab);
    labels: (batch, tgt_len), -100 on padding. The KL is weighted by this micro-batch's share of the accumulated
    tokens, as the model weights its router losses, so an accumulated update equals a full-batch one.
    """
    aux = outputs.aux_loss if outputs.aux_loss is not None else torch.zeros_like(outputs.loss)
    ce = outputs.loss - aux  # the model's loss less its router part: the token cross-entropy
    mask = labels != IGNORE_INDEX
    kl = distillation_loss(outputs.logits, teacher, mask, args.kl_temperature)
    if num_items_in_batch is not None:
        kl = kl * mask.sum().to(kl.device) / num_items_in_batch
    return {"loss": args.ce_weight * ce + args.kl_weight * kl + aux, "ce": ce, "kl": kl}


def with_encoder_outputs(inputs: dict) -> dict:
    """A batch as the model's forward takes it: cached encoder states become `encoder_outputs`."""
    inputs = dict(inputs)
    states = inputs.pop(ENCODER_STATES_KEY, None)
    if states is not None:
        inputs["encoder_outputs"] = BaseModelOutput(last_hidden_state=states)
    return inputs


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------


class DistillationTrainer(WhisperMoETrainer):
    """WhisperMoETrainer whose loss is `distillation_objective` against a frozen teacher; `ce` and `kl` are logged.

    The teacher decodes from the encoder output the student's forward computed (or the cached one): one encoder
    pass per batch, or none. A student whose encoder trains cannot share it, and the teacher then encodes the batch
    itself.
    """

    def __init__(self, *args, teacher: nn.Module, distillation: DistillationArguments, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.distillation = distillation
        self.share_encoder = encoder_frozen(self.model) and same_encoder(self.model, teacher)
        if distillation.cache_encoder_states and not self.share_encoder:
            raise ValueError(
                "cache_encoder_states needs the student's encoder frozen and equal to the teacher's "
                "(training_mode freeze_encoder); set cache_encoder_states false to train it."
            )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if ENCODER_STATES_KEY not in self._signature_columns:  # the Trainer drops columns forward() does not name
            self._signature_columns = [*self._signature_columns, ENCODER_STATES_KEY]

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = with_encoder_outputs(inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)  # fmt: skip
        shared = outputs.encoder_last_hidden_state if self.share_encoder else None
        teacher = teacher_logits(self.teacher, inputs, shared)
        parts = distillation_objective(outputs, teacher, inputs["labels"], self.distillation, num_items_in_batch)
        # the Trainer may scale the model's loss (tokens averaged over processes): the objective gets the same factor
        scale = loss.detach() / outputs.loss.detach()
        if model.training:
            for name in ("ce", "kl"):
                self._logged[name].append(float(parts[name].detach()))
        return (parts["loss"] * scale, outputs) if return_outputs else parts["loss"] * scale
