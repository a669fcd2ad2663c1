"""Fine-tuning WhisperMoE with transformers' `Seq2SeqTrainer`: what is trained, and router health in the logs.

Not part of the Hub code (nothing the model imports): it is the training side of the package.
"""

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Seq2SeqTrainer

from modeling_whisper_moe.modeling_whisper_moe import IGNORE_INDEX, expert_shares, token_weights

TRAINING_MODES = ("full", "freeze_encoder", "experts", "attention", "lora")
# Parameter-name fragments of what "experts" mode trains: routed experts, routers, shared experts.
EXPERT_PARAMETERS = (".mlp.experts.", ".mlp.router.", ".mlp.shared_experts.")
# What "attention" mode keeps fixed: routed and shared experts, token embeddings (the decoder's is tied to proj_out),
# the audio convolutions.
FROZEN_IN_ATTENTION_MODE = (
    ".mlp.experts.",
    ".mlp.shared_experts.",
    "embed_tokens.",
    "embed_text_tokens.",
    "proj_out.",
    "encoder.conv",
)
LORA_ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_EXPERT_PARAMETERS = ["experts.fc1_weight", "experts.fc2_weight"]


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
    # Whisper keeps its sinusoidal encoder positions fixed in every mode
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


def router_statistics(
    router_logits: tuple[torch.Tensor, ...], top_k: int, mask: torch.Tensor | None = None
) -> list[dict[str, float]]:
    """Per sparse layer: how evenly tokens spread over experts, and how sure the router is.

    router_logits holds one (tokens, num_experts) tensor per layer; mask is (tokens,) or broadcastable, 1 = real.
    `max_load` is the busiest expert's share of routing slots times num_experts (1.0 = perfectly even);
    `entropy` is the mean router entropy divided by log(num_experts) (1.0 = uniform, 0.0 = one-hot).
    """
    stats = []
    for logits in router_logits:
        logits = logits.detach().float()
        weights = token_weights(1, logits.shape[0], mask, logits.device)
        num_experts = logits.shape[-1]
        load, _ = expert_shares(logits, top_k, weights)
        probs = logits.softmax(dim=-1)
        entropy = -(probs * probs.clamp(min=1e-9).log()).sum(-1)
        mean_entropy = (entropy * weights).sum() / weights.sum().clamp(min=1.0)
        stats.append(
            {"max_load": (load.max() * num_experts).item(), "entropy": (mean_entropy / math.log(num_experts)).item()}
        )
    return stats


class WhisperMoETrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` that also logs the loss parts and each sparse layer's router statistics.

    Logged next to `loss`: `ce` (token cross-entropy), the unweighted router losses `encoder_aux_loss`,
    `decoder_aux_loss` (load balancing, 1.0 = balanced), `encoder_z_loss`, `decoder_z_loss`, and per sparse layer
    `router/<side>.<layer>/max_load` and `/entropy`. They go wherever the Trainer logs (console, TensorBoard when
    installed, ...), averaged over the micro-batches since the previous log.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._router_logs: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and getattr(outputs, "aux_loss", None) is not None:
            self._record(outputs, inputs["labels"])
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record(self, outputs, labels: torch.Tensor) -> None:
        logits = outputs.logits
        ce = F.cross_entropy(
            logits.float().flatten(0, 1), labels.to(logits.device).flatten(), ignore_index=IGNORE_INDEX
        )
        self._router_logs["ce"].append(ce.item())
        for name in ("encoder_aux_loss", "decoder_aux_loss", "encoder_z_loss", "decoder_z_loss"):
            if getattr(outputs, name) is not None:
                self._router_logs[name].append(getattr(outputs, name).item())
        config = self.model.config
        decoder_mask = labels != IGNORE_INDEX
        for side, router_logits, mask in (
            ("encoder", outputs.encoder_router_logits, None),
            ("decoder", outputs.decoder_router_logits, decoder_mask),
        ):
            sparse_layers = [i for i in range(getattr(config, f"{side}_layers")) if config.is_sparse_layer(side, i)]
            layer_stats = router_statistics(router_logits or (), config.num_experts_per_tok, mask)
            for layer, stats in zip(sparse_layers, layer_stats):
                for key, value in stats.items():
                    self._router_logs[f"router/{side}.{layer}/{key}"].append(value)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._router_logs and "loss" in logs:
            logs.update({key: round(sum(values) / len(values), 4) for key, values in self._router_logs.items()})
            self._router_logs.clear()
        super().log(logs, *args, **kwargs)
