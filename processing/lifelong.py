"""Learning a new domain without forgetting: what trains in a grown model, and the losses that keep the old domain.

After `grow_experts`, `--training_mode lifelong` trains only what the newest growth phase added: its experts' rows
of the stacked expert tensors, its router rows and its null logit, and its PEER blocks when it grew some
(`--grow_peer_keys`, see modeling_whisper_moe/peer.py), plus any module named in `trainable`, e.g. a new text
front-end. Everything older stays bit for bit as it was (gradient masks, and the rows are restored after each
optimizer step, so weight decay or optimizer state cannot move them either). The base group routes old and new
inputs exactly as before by construction; what can still drift is how much weight the new experts get, and the
options below hold that for old inputs:

- router anchoring (`anchor_coef`): on replayed general speech, the newest group's router is taught to pick its null
  expert (cross-entropy towards the null logit), so old-domain tokens keep their old routing. A PEER block has no
  null expert (its softmax is over the retrieved experts alone), so nothing anchors it: a phase that grew only PEER
  gets no anchoring loss, and the trainer says so when `anchor_coef` asks for one;
- output distillation (`distill_coef`, temperature `distill_temperature`): KL from the previous model's token
  distribution, on replay rows (and on the new data with `distill_new_data`). The previous model is the grown one
  with its newest phase switched off (`previous_model`), so no second copy is held;
- replay: a small set of general audio whose transcripts are the previous model's own (pseudo-labels), mixed into
  the training batches (`replay_fraction`) and marked so the two losses above know which rows are old-domain.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from torch import nn
from transformers import TrainerCallback

from modeling_whisper_moe.configuration_whisper_moe import PEER_DEFAULTS, WhisperMoEConfig
from modeling_whisper_moe.growth import grow_experts, previous_model
from modeling_whisper_moe.modeling_whisper_moe import IGNORE_INDEX, WhisperMoERouter
from modeling_whisper_moe.peer import PEER
from processing.distillation import distillation_loss, teacher_logits
from processing.metrics import english_normalizer
from processing.multitask import MultiTaskCollator, TaskBatchSampler, TaskMixture
from processing.pseudo_labels import pseudo_label_clips, training_clips
from processing.training import WhisperMoETrainer

REPLAY_COLUMN = "is_replay"  # 1 on rows of the replay set: the old domain the anchoring and distillation hold
EXPERT_TENSORS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
REPLAY_TASK = "replay"  # the replay batches' task name when the new task's rows are not audio (see replay_mixture)
logger = logging.getLogger(__name__)


@dataclass
class LifelongArguments:
    """How a lifelong phase grows the model and keeps what it knew (see the module docstring)."""

    grow_experts: int = field(default=0, metadata={"help": "experts each grown layer gets in this phase (0: none)"})
    grow_experts_per_tok: int = field(default=1, metadata={"help": "top-k among the new experts"})
    grow_encoder_layers: str = field(default="all", metadata={"help": "encoder layers to grow: all, none or 0,2"})
    grow_decoder_layers: str = field(default="all", metadata={"help": "decoder layers to grow: all, none or 0,2"})
    grow_init: str = field(default="copy", metadata={"help": "new experts' input projection: copy or random"})
    grow_modalities: str = field(
        default="all", metadata={"help": "input modalities the phase serves: all, or some of speech,text,pose"}
    )
    grow_peer_keys: int = field(
        default=0, metadata={"help": "sub-keys of a PEER block (keys^2 experts) beside each grown layer (0: none)"}
    )
    grow_peer_heads: int = field(default=PEER_DEFAULTS["num_heads"], metadata={"help": "PEER retrieval heads"})
    grow_peer_experts_per_head: int = field(
        default=PEER_DEFAULTS["num_experts_per_head"], metadata={"help": "experts each PEER head retrieves (top-k)"}
    )
    grow_peer_key_dim: int = field(default=PEER_DEFAULTS["key_dim"], metadata={"help": "PEER query width (even)"})
    anchor_coef: float = field(default=1.0, metadata={"help": "router anchoring weight on replay rows (0: off)"})
    distill_coef: float = field(default=1.0, metadata={"help": "KL-to-previous-model weight (0: off)"})
    distill_temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the distillation"})
    distill_new_data: bool = field(default=False, metadata={"help": "distil on the new data's rows as well"})
    replay_manifest: list[str] = field(default_factory=list, metadata={"help": "CSVs (path,text) of general audio"})
    replay_fraction: float = field(default=0.25, metadata={"help": "share of training rows drawn from replay"})
    replay_max_per_manifest: int = field(
        default=0, metadata={"help": "clips replay takes of each manifest, a seeded sample (0: all)"}
    )
    lifelong_trainable: list[str] = field(
        default_factory=list, metadata={"help": "parameter-name fragments that train besides the new experts"}
    )

    def __post_init__(self):
        for name in ("anchor_coef", "distill_coef", "replay_fraction"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}.")
        if not 0 <= self.replay_fraction < 1:
            raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction}.")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be positive, got {self.distill_temperature}.")
        if self.grow_peer_keys < 0:
            raise ValueError(f"grow_peer_keys must be 0 (no PEER block) or more, got {self.grow_peer_keys}.")
        if self.peer_spec is not None:
            WhisperMoEConfig.check_peer(self.peer_spec)

    @property
    def peer_spec(self) -> dict | None:
        """The PEER block this phase grows (an `expert_growth` "peer" entry), None without one."""
        if not self.grow_peer_keys:
            return None
        return {
            "num_keys": self.grow_peer_keys,
            "num_heads": self.grow_peer_heads,
            "num_experts_per_head": self.grow_peer_experts_per_head,
            "key_dim": self.grow_peer_key_dim,
        }

    @property
    def grows(self) -> bool:
        """Whether this phase grows the model (experts, a PEER block or both) before training."""
        return bool(self.grow_experts or self.grow_peer_keys)


def parse_layers(spec: str, num_layers: int) -> list[int] | None:
    """'all' -> None (every sparse layer), 'none' -> [], '0,2' -> [0, 2]."""
    if spec == "all":
        return None
    if spec == "none":
        return []
    try:
        layers = [int(item) for item in spec.split(",")]
    except ValueError:
        raise ValueError(f"layers must be all, none or comma-separated indices, got {spec!r}") from None
    if any(not 0 <= layer < num_layers for layer in layers):
        raise ValueError(f"layer indices must be in 0..{num_layers - 1}, got {spec!r}")
    return layers


def grow_for_phase(model: nn.Module, args: LifelongArguments, seed: int) -> nn.Module:
    """Apply this phase's growth to `model` (in place), as the arguments say: new experts, a PEER block beside the
    same layers' feed-forward blocks, or both, recorded as one growth phase."""
    config = model.config
    return grow_experts(
        model,
        args.grow_experts,
        args.grow_experts_per_tok,
        encoder_layers=parse_layers(args.grow_encoder_layers, config.encoder_layers),
        decoder_layers=parse_layers(args.grow_decoder_layers, config.decoder_layers),
        init=args.grow_init,
        seed=seed,
        peer=args.peer_spec,
        modalities=None if args.grow_modalities == "all" else args.grow_modalities.split(","),
    )


# ---------------------------------------------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------------------------------------------


def newest_group(router: WhisperMoERouter, phase: int) -> tuple[int, int, int] | None:
    """(first expert row, number of experts, null column) of `phase`'s group in this router, None if not grown."""
    if phase not in router.phases:
        return None
    group = router.phases.index(phase)
    offset = sum(size for size, _ in router.groups[: group + 1])
    return offset, router.groups[group + 1][0], router.num_experts + group


class FrozenRows:
    """Keeps the rows of partly trained tensors that a lifelong phase must not change exactly as they were."""

    def __init__(self):
        self.entries: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (tensor, trainable rows, saved)

    def add(self, parameter: nn.Parameter, trainable: torch.Tensor) -> None:
        """Train `parameter` only where `trainable` (a bool vector over its first dimension) is True."""
        parameter.requires_grad_(True)
        mask = trainable.to(parameter.device).reshape(-1, *([1] * (parameter.dim() - 1)))
        parameter.register_hook(lambda grad, mask=mask: grad * mask)
        self.entries.append((parameter, trainable, parameter.detach()[~trainable].clone()))

    @torch.no_grad()
    def restore(self) -> None:
        for parameter, trainable, saved in self.entries:
            parameter[~trainable.to(parameter.device)] = saved.to(parameter.dtype)


def apply_lifelong_mode(model: nn.Module, trainable: Iterable[str] = ()) -> FrozenRows:
    """Freeze everything but the newest growth phase's experts, router rows, null logits and PEER blocks (and
    parameters whose names contain a `trainable` fragment). Older PEER blocks keep their query statistics fixed.
    Returns the rows to restore after each optimizer step."""
    phases = model.config.expert_growth or []
    if not phases:
        raise ValueError(
            "training_mode lifelong needs a grown model: set grow_experts or grow_peer_keys (or grow it first)."
        )
    phase = len(phases) - 1
    model.requires_grad_(False)
    frozen = FrozenRows()
    for module in model.modules():
        located = newest_group(module, phase) if isinstance(module, WhisperMoERouter) else None
        if located is None:
            continue
        first, size, null_column = located
        rows = torch.zeros(module.num_experts, dtype=torch.bool)
        rows[first : first + size] = True
        block = _block_of(model, module)
        for name in EXPERT_TENSORS:
            frozen.add(getattr(block.experts, name), rows)
        frozen.add(module.weight, rows)
        nulls = torch.zeros(len(module.phases), dtype=torch.bool)
        nulls[null_column - module.num_experts] = True
        frozen.add(module.null_logits, nulls)
    for peer in (module for module in model.modules() if isinstance(module, PEER)):
        # the newest phase's block trains whole; an older one is a fixed function, running statistics included
        peer.requires_grad_(peer.phase == phase)
        peer.frozen_statistics = peer.phase != phase
    fragments = tuple(trainable)
    for name, parameter in model.named_parameters():
        if fragments and any(fragment in name for fragment in fragments):
            parameter.requires_grad_(True)
    return frozen


def _block_of(model: nn.Module, router: WhisperMoERouter) -> nn.Module:
    return next(module for module in model.modules() if getattr(module, "router", None) is router)


class RestoreFrozenRows(TrainerCallback):
    """After every optimizer step, put the frozen rows back (weight decay and optimizer state cannot move them)."""

    def __init__(self, frozen: FrozenRows):
        self.frozen = frozen

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.frozen.restore()


# ---------------------------------------------------------------------------------------------------------------
# Losses that keep the old domain
# ---------------------------------------------------------------------------------------------------------------


def anchoring_loss(model: nn.Module, outputs, is_replay: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Mean -log p(null) of the newest growth phase's group over replay rows' tokens, over every layer it grew.

    Encoder router logits are (batch * positions, columns), decoder ones (batch * tgt_len, columns); replay rows
    are chosen by `is_replay` (batch,), decoder tokens by the labels' real positions. None without replay rows.
    """
    if not bool(is_replay.any()):
        return None
    phase = len(model.config.expert_growth) - 1
    losses = []
    for side, router_logits in (
        ("encoder", outputs.encoder_router_logits),
        ("decoder", outputs.decoder_router_logits),
    ):
        routers = _routers(model, side)
        for router, logits in zip(routers, router_logits or ()):
            located = newest_group(router, phase)
            if located is None:
                continue
            first, size, null_column = located
            group_logits = torch.cat([logits[:, first : first + size], logits[:, null_column, None]], dim=-1)
            null_nll = -group_logits.float().log_softmax(dim=-1)[:, -1]  # (batch * seq,)
            rows = null_nll.reshape(is_replay.shape[0], -1)  # (batch, seq)
            mask = is_replay[:, None].to(rows.dtype).expand_as(rows)
            if side == "decoder":
                mask = mask * (labels != IGNORE_INDEX).to(rows.dtype)
            losses.append((rows * mask).sum() / mask.sum().clamp(min=1.0))
    return torch.stack(losses).mean() if losses else None


def _routers(model: nn.Module, side: str) -> list[WhisperMoERouter]:
    """The routers of `side`, in layer order (the order of the recorded router logits)."""
    stack = model.get_encoder() if side == "encoder" else model.get_decoder()
    return [layer.mlp.router for layer in stack.layers if isinstance(getattr(layer.mlp, "router", None), nn.Module)]


def previous_model_logits(model: nn.Module, inputs: dict, outputs) -> torch.Tensor:
    """The previous model's logits on `inputs`: the same model with its newest phase switched off. When that phase
    grew no encoder layer, the encoder output is the same and is reused."""
    grew_encoder = model.config.expert_growth[-1]["encoder_layers"]
    shared = outputs.encoder_last_hidden_state if not grew_encoder else None
    with previous_model(model):
        return teacher_logits(model, inputs, shared)


def lifelong_losses(
    model: nn.Module, inputs: dict, outputs, is_replay: torch.Tensor, args: LifelongArguments
) -> dict[str, torch.Tensor]:
    """The weighted anti-forgetting losses of one batch, by name (empty when all are off or have no rows)."""
    labels = inputs["labels"]
    losses = {}
    if args.anchor_coef > 0:
        anchor = anchoring_loss(model, outputs, is_replay, labels)
        if anchor is not None:
            losses["anchor_loss"] = args.anchor_coef * anchor
    if args.distill_coef > 0:
        rows = torch.ones_like(is_replay, dtype=torch.bool) if args.distill_new_data else is_replay.bool()
        if bool(rows.any()):
            token_mask = (labels != IGNORE_INDEX) & rows[:, None]
            teacher = previous_model_logits(model, inputs, outputs)
            kl = distillation_loss(outputs.logits, teacher, token_mask, args.distill_temperature)
            losses["distill_loss"] = args.distill_coef * kl
    return losses


# ---------------------------------------------------------------------------------------------------------------
# Replay: general audio, pseudo-labelled by the previous model
# ---------------------------------------------------------------------------------------------------------------


def replay_clips(
    manifests: Sequence[str], exclude_speakers: Sequence[str] = (), max_per_manifest: int = 0, seed: int = 0
) -> list[str]:
    """The audio paths of `manifests` that replay may use (`pseudo_labels.training_clips`: no evaluation split, no
    held-out speaker, at most `max_per_manifest` of each)."""
    return [clip.path for clip in training_clips(manifests, exclude_speakers, max_per_manifest, seed)]


def pseudo_label_manifests(
    model: nn.Module,
    processor,
    manifests: Sequence[str],
    output_csv: Path,
    max_new_tokens: int | None = None,
    **select,
) -> Path:
    """Transcribe every clip `training_clips(manifests, **select)` keeps with `model` into `output_csv` (the
    resumable manifest of processing/pseudo_labels.py, whose `text` is the model's transcript), so that a resumed
    run labels nothing twice."""
    clips = training_clips(manifests, **select)
    if not clips:
        raise ValueError(f"The replay manifests {list(manifests)} hold no clips.")
    return pseudo_label_clips(model, processor, clips, output_csv, english_normalizer(), max_new_tokens)


def mix_replay(train: Dataset, replay: Dataset, fraction: float, seed: int) -> Dataset:
    """`train` with `REPLAY_COLUMN` = 0, plus `replay` repeated (and shuffled) to make up `fraction` of the rows."""
    array_columns = (train.format.get("columns") or []) if train.format.get("type") else []
    if fraction == 0 or len(replay) == 0:
        return train.add_column(REPLAY_COLUMN, [0] * len(train))
    common = [column for column in train.column_names if column in replay.column_names]
    train, replay = train.select_columns(common), replay.select_columns(common)
    wanted = math.ceil(fraction * len(train) / (1 - fraction))
    repeats = [replay.shuffle(seed=seed + index) for index in range(math.ceil(wanted / len(replay)))]
    replay = concatenate_datasets(repeats).select(range(wanted))
    train = train.add_column(REPLAY_COLUMN, [0] * len(train))
    replay = replay.add_column(REPLAY_COLUMN, [1] * len(replay))
    mixed = concatenate_datasets([train, replay]).shuffle(seed=seed)
    if array_columns:  # keep the log-mels as numpy arrays (15x faster batches than nested lists)
        mixed = mixed.with_format("numpy", columns=array_columns, output_all_columns=True)
    return mixed


def replay_mixture(task: str, train, collator, replay: Dataset, replay_collator, fraction: float, steps: int,
                   batch_size: int, seed: int):  # fmt: skip
    """(dataset, collator, batch sampler) for a new task whose rows cannot share a batch with replayed audio (text
    translation): one-task batches, `fraction` of the `steps` of them replay, spread evenly over training."""
    replay_steps = round(fraction * steps)
    if not 0 < replay_steps < steps:
        raise ValueError(f"replay_fraction {fraction} of {steps} steps leaves no replay or no new-task batch.")
    replay = replay.add_column(REPLAY_COLUMN, [1] * len(replay))
    mixture = TaskMixture({task: train, REPLAY_TASK: replay})
    collators = {task: ReplayFlagCollator(collator), REPLAY_TASK: ReplayFlagCollator(replay_collator)}
    sampler = TaskBatchSampler(mixture.sizes(), {task: batch_size, REPLAY_TASK: batch_size},
                               {task: steps - replay_steps, REPLAY_TASK: replay_steps}, seed=seed)  # fmt: skip
    return mixture, MultiTaskCollator(collators, default_task=task), sampler  # the held-out rows are `task`'s


@dataclass
class ReplayFlagCollator:
    """Wraps a collator: passes the rows' `REPLAY_COLUMN` through as an `is_replay` (batch,) tensor."""

    collator: object

    def __call__(self, examples):
        flags = torch.tensor([int(example.get(REPLAY_COLUMN, 0)) for example in examples])
        batch = self.collator([{k: v for k, v in example.items() if k != REPLAY_COLUMN} for example in examples])
        batch[REPLAY_COLUMN] = flags
        return batch


class LifelongTrainer(WhisperMoETrainer):
    """WhisperMoETrainer whose loss adds the lifelong phase's anchoring and distillation terms (logged by name)."""

    def __init__(self, *args, lifelong: LifelongArguments, **kwargs):
        super().__init__(*args, **kwargs)
        self.lifelong = lifelong
        if lifelong.anchor_coef > 0 and not self.model.config.expert_growth[-1]["num_experts"]:
            logger.warning(
                "anchor_coef=%s has nothing to anchor: the newest growth phase added only PEER blocks, which have no "
                "router or null expert. Distillation and replay still apply; set anchor_coef 0 to silence this.",
                lifelong.anchor_coef,
            )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if REPLAY_COLUMN not in self._signature_columns:  # the Trainer drops columns forward() does not name
            self._signature_columns = [*self._signature_columns, REPLAY_COLUMN]

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        is_replay = inputs.pop(REPLAY_COLUMN, None)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and is_replay is not None:
            for name, value in lifelong_losses(
                self.model, inputs, outputs, is_replay.to(loss.device), self.lifelong
            ).items():
                loss = loss + value.to(loss.device)
                self._logged[name].append(value.item())
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        inputs = {key: value for key, value in inputs.items() if key != REPLAY_COLUMN}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
