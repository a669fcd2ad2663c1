"""Training WhisperMoE with transformers' `Seq2SeqTrainer`: what is trained, the one trainer of every task (loss
parts and router health in the logs), and a wall-time budget.

Not part of the Hub code (nothing the model imports): it is the training side of the project.
"""

import logging
import time
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler
from transformers import Seq2SeqTrainer, TrainerCallback

from modeling_whisper_moe.modeling_whisper_moe import IGNORE_INDEX
from processing.grokfast import GradientFilter
from processing.multitask import TASK_KEY
from processing.routing import router_statistics, router_token_masks

TRAINING_MODES = ("full", "freeze_encoder", "experts", "attention", "lora")
# Parameter-name fragments of what "experts" mode trains: routed experts, routers, shared experts, PEER blocks.
EXPERT_PARAMETERS = (".mlp.experts.", ".mlp.router.", ".mlp.shared_experts.", ".peers.")
# What "attention" mode keeps fixed: routed and shared experts, PEER blocks, token embeddings (the decoder's is tied
# to proj_out), the audio convolutions.
FROZEN_IN_ATTENTION_MODE = (
    ".mlp.experts.",
    ".mlp.shared_experts.",
    ".peers.",
    "embed_tokens.",
    "embed_text_tokens.",
    "proj_out.",
    "encoder.conv",
)
TTT_PARAMETERS = (".ttt.", ".ttt_layer_norm.")  # what --ttt_lr_multiplier speeds up (ttt.py sub-layers)
LORA_ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_EXPERT_PARAMETERS = ["experts.fc1_weight", "experts.fc2_weight"]
# what a model output may carry of its loss, unweighted, for the logs (besides the token cross-entropy `ce`)
LOSS_PARTS = ("mel_loss", "duration_loss", "encoder_aux_loss", "decoder_aux_loss", "encoder_z_loss", "decoder_z_loss")
logger = logging.getLogger(__name__)


def apply_training_mode(
    model: nn.Module, mode: str, lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0
) -> nn.Module:
    """Choose what trains. Returns the model to train (a PEFT wrapper for "lora", else `model` itself).

    - "full": every parameter.
    - "freeze_encoder": the decoder only; the encoder is a fixed feature extractor (cheaper backward).
    - "experts": routed experts, routers and shared experts; attention, embeddings and norms stay as upcycled.
    - "attention": attention projections, layer norms, routers and learned positions; experts and token embeddings
      stay as they are. It skips the weight gradients and optimizer state of nearly all parameters (experts, the
      vocabulary-sized embeddings and output projection), for a new input that mainly needs new attention, e.g. the
      text front-end, whose token embedding starts as a copy of the decoder's.
    - "lora": low-rank adapters on every attention projection and on the stacked expert weights; the base stays
      frozen, and `merge_and_unload()` folds the adapters back into a plain WhisperMoE.
    """
    if mode not in TRAINING_MODES:
        raise ValueError(f"Unknown training mode {mode!r}; choose one of {', '.join(TRAINING_MODES)}.")
    if mode == "lora":
        return _with_lora(model, lora_r, lora_alpha, lora_dropout)
    for name, parameter in model.named_parameters():
        if mode == "freeze_encoder":
            parameter.requires_grad = not name.startswith("model.encoder.")
        elif mode == "experts":
            parameter.requires_grad = any(fragment in name for fragment in EXPERT_PARAMETERS)
        elif mode == "attention":
            parameter.requires_grad = not any(fragment in name for fragment in FROZEN_IN_ATTENTION_MODE)
        else:
            parameter.requires_grad = True
    # Whisper keeps its sinusoidal encoder positions (an nn.Embedding) fixed in every mode; a learned_sinusoidal
    # table (echo.py) trains
    if isinstance(model.model.encoder.embed_positions, nn.Embedding):
        model.model.encoder.embed_positions.requires_grad_(False)
    return model


def _with_lora(model: nn.Module, r: int, alpha: int, dropout: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    if dropout:
        # PEFT adapts a stacked parameter by adding B @ A to the weight, which leaves no input to drop out
        raise ValueError(f"lora_dropout must be 0 for adapters on the stacked expert weights, got {dropout}.")

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LORA_ATTENTION_MODULES,
        target_parameters=LORA_EXPERT_PARAMETERS,
    )
    return get_peft_model(model, config)


class WhisperMoETrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` for every task and mixture of tasks, logging the loss parts and masked router statistics.

    Logged next to `loss`, averaged over the micro-batches since the previous log: `ce` (token cross-entropy of
    text-output batches), the model's own parts (`mel_loss`, `duration_loss` of speech-output batches), the
    unweighted router losses `encoder_aux_loss`, `decoder_aux_loss` (load balancing, 1.0 = balanced),
    `encoder_z_loss`, `decoder_z_loss`, and per sparse layer `router/<side>.<layer>/max_load` and `/entropy` over
    real tokens only (`router_token_masks`). In a task mixture every key is prefixed with the batch's task
    (`asr_ce`, `tts_mel_loss`, ...) and `<task>_loss` is logged too.

    task: the task of batches that carry no `task` key (a single-task run); speech_output_tasks: the tasks whose
    batches the model scores itself (mel and duration losses, no token count); batch_sampler: one-task batches of a
    mixture (`TaskBatchSampler`), replacing the Trainer's sampler; gradient_filter: Grokfast (processing/grokfast.py),
    run once per optimizer step on the accumulated gradients, before they are clipped.
    """

    def __init__(self, *args, task: str | None = None, speech_output_tasks: Sequence[str] = (),
                 batch_sampler: Sampler | None = None, ttt_lr_multiplier: float = 1.0,
                 gradient_filter: GradientFilter | None = None, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.task, self.speech_output_tasks, self.batch_sampler = task, tuple(speech_output_tasks), batch_sampler
        self.ttt_lr_multiplier, self.gradient_filter = ttt_lr_multiplier, gradient_filter
        self._logged: dict[str, list[float]] = defaultdict(list)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with Test-Time-Training parameters (TTT_PARAMETERS) in groups of their own at
        `ttt_lr_multiplier` times the learning rate: they start from nothing while the rest is pretrained. The
        schedule scales every group alike."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if not fresh or self.ttt_lr_multiplier == 1.0:
            return optimizer
        names = {id(parameter): name for name, parameter in (model or self.model).named_parameters()}
        for group in list(optimizer.param_groups):
            ttt = [p for p in group["params"] if any(part in names.get(id(p), "") for part in TTT_PARAMETERS)]
            if ttt:
                moved = {id(p) for p in ttt}
                group["params"] = [p for p in group["params"] if id(p) not in moved]
                optimizer.add_param_group({**group, "params": ttt, "lr": group["lr"] * self.ttt_lr_multiplier})
        return optimizer

    def get_train_dataloader(self) -> DataLoader:
        if self.batch_sampler is None:
            return super().get_train_dataloader()
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's forward and backward of one micro-batch; after the last one of an optimizer step (the
        Trainer sets `sync_gradients` for it, and the gradients are then complete on every process) the gradient
        filter runs, so the Trainer's clipping and the optimizer step see the filtered gradients, as in Grokfast."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.gradient_filter is not None and self.accelerator.sync_gradients:
            self.gradient_filter(model.named_parameters())
        return loss

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = dict(inputs)
        task = inputs.pop(TASK_KEY, None)
        if (task or self.task) in self.speech_output_tasks:  # mel targets: the Trainer's token count is not theirs
            outputs = model(**inputs)
            loss = outputs.loss
        else:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)  # fmt: skip
        if model.training:
            prefix = f"{task}_" if task else ""
            parts = {"loss": loss} if task else {}
            parts.update(self.loss_parts(outputs, inputs))
            parts.update(self.router_parts(outputs, inputs))
            for name, value in parts.items():
                self._logged[prefix + name].append(float(value.detach()) if torch.is_tensor(value) else float(value))
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def loss_parts(self, outputs, inputs: dict) -> dict[str, torch.Tensor]:
        """The named parts of this batch's loss, unweighted: where a new loss term is added to the logs."""
        parts = {name: getattr(outputs, name) for name in LOSS_PARTS if getattr(outputs, name, None) is not None}
        labels, logits = inputs.get("labels"), getattr(outputs, "logits", None)
        if logits is not None and labels is not None and labels.dtype == torch.long:
            flat = logits.float().flatten(0, 1)
            parts["ce"] = F.cross_entropy(flat, labels.to(logits.device).flatten(), ignore_index=IGNORE_INDEX)
        return parts

    @torch.no_grad()
    def router_parts(self, outputs, inputs: dict) -> dict[str, float]:
        """`router/<side>.<layer>/max_load` and `/entropy` of each sparse layer, over real tokens only."""
        logits = {side: getattr(outputs, f"{side}_router_logits", None) for side in ("encoder", "decoder")}
        if not any(logits.values()):  # a dense baseline, or a speech-output batch
            return {}
        config, values = self.accelerator.unwrap_model(self.model).config, {}
        masks = router_token_masks(config, inputs, training=self.model.training)
        for side, router_logits in logits.items():
            sparse_layers = [i for i in range(getattr(config, f"{side}_layers")) if config.is_sparse_layer(side, i)]
            for layer, layer_logits in zip(sparse_layers, router_logits or ()):
                offset = 0  # a model that grew experts: each group over its own columns (null columns excluded)
                for group, (size, top_k) in enumerate(config.expert_groups(side, layer)):
                    if size > 1:
                        (stats,) = router_statistics((layer_logits[:, offset : offset + size],), top_k, masks[side])
                        name = f"router/{side}.{layer}" + (f".group{group}" if group else "")
                        values.update({f"{name}/{key}": value for key, value in stats.items()})
                    offset += size
        return values

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._logged and "loss" in logs:
            logs.update({key: round(sum(values) / len(values), 4) for key, values in self._logged.items()})
            self._logged.clear()
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
