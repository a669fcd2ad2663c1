"""WhisperMoE: Whisper's encoder-decoder whose feed-forward blocks are sparse Mixtures of Experts.

Read top to bottom: router losses, router, experts, sparse block, layers, encoder, decoder, model, head.
Everything not about experts (attention, embeddings) is Whisper's own, inherited from transformers, unless the config
switches on an Echo element (rotary positions, position bias, local attention, convolution: echo.py); the head's
generation lives in generation_whisper_moe.py, its Hub saving in hub.py, upcycling and the text front-end surgery in
upcycling.py.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperForConditionalGeneration, WhisperModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.moe import ExpertsInterface, use_experts_implementation
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.models.whisper.modeling_whisper import (
    WhisperDecoder,
    WhisperDecoderLayer,
    WhisperEncoder,
    WhisperEncoderLayer,
    WhisperPositionalEmbedding,
    WhisperPreTrainedModel,
    shift_tokens_right,
    sinusoids,
)
from transformers.utils import ModelOutput
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_whisper_moe import WhisperMoEConfig
from .echo import ECHO_MODULES, EchoSelfAttention, convolution_module, needs_echo_attention, position_table
from .generation_whisper_moe import WhisperMoEGenerationMixin, language_token_id, text_decoder_prompt
from .hub import HubSavingMixin
from .model_card import model_card
from .packing import block_diagonal_mask, pack, plan_clip_packing, plan_packing, unpack
from .patches import PatchFrontend, Video, add_patch_frontend
from .peer import PEER, peer_blocks
from .pose import PoseFrontend, add_pose_frontend
from .quantization import quantize_model
from .ttt import TTTBase, add_ttt, cached_state, ttt_sublayer
from .upcycling import add_text_frontend, upcycle
from .wavenet import WaveNetBranch, add_wavenet_branch

IGNORE_INDEX = -100  # label value the cross-entropy skips (padding)
ENCODER_DOWNSAMPLING = 2  # conv2's stride: one encoder position per two mel frames


# ---------------------------------------------------------------------------------------------------------------------
# Router losses
# ---------------------------------------------------------------------------------------------------------------------


def token_weights(num_layers: int, num_tokens: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor:
    """Per-token weights (1 real, 0 padding) matching `torch.cat(router_logits)`, shape (num_layers * num_tokens,)."""
    if attention_mask is None:
        return torch.ones(num_layers * num_tokens, device=device)
    mask = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    if mask.numel() != num_tokens:
        raise ValueError(f"attention_mask covers {mask.numel()} tokens, but the router saw {num_tokens} per layer.")
    return mask.repeat(num_layers)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer load-balancing loss over all sparse layers, padding excluded.

    `router_logits` holds one (batch * seq_len, num_experts) tensor per layer; `attention_mask` is (batch, seq_len)
    with 1 for real tokens. The loss is num_experts * sum_e f_e * P_e / top_k, where f_e is the fraction of routing
    slots given to expert e and P_e its mean router probability: 1.0 when tokens spread evenly, up to num_experts
    when one expert takes everything.
    """
    logits = torch.cat(router_logits, dim=0).float()  # (layers * tokens, E)
    weights = token_weights(len(router_logits), router_logits[0].shape[0], attention_mask, logits.device)
    slots_per_expert, prob_per_expert = expert_shares(logits, top_k, weights)
    return num_experts * (slots_per_expert * prob_per_expert).sum()


def expert_shares(logits: torch.Tensor, top_k: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's share of the routing slots and its mean router probability, both (num_experts,).

    logits: (tokens, num_experts) float; weights: (tokens,), 1 for real tokens and 0 for padding.
    """
    probs = logits.softmax(dim=-1)
    routed = F.one_hot(probs.topk(top_k, dim=-1).indices, logits.shape[-1]).sum(dim=1).float()  # (tokens, E)
    total = weights.sum().clamp(min=1.0)
    slots_per_expert = (routed * weights[:, None]).sum(dim=0) / (total * top_k)
    prob_per_expert = (probs * weights[:, None]).sum(dim=0) / total
    return slots_per_expert, prob_per_expert


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: the mean squared log-partition of the router logits, padding excluded."""
    logits = torch.cat(router_logits, dim=0).float()
    weights = token_weights(len(router_logits), router_logits[0].shape[0], attention_mask, logits.device)
    z = torch.logsumexp(logits, dim=-1) ** 2  # (layers * tokens,)
    return (z * weights).sum() / weights.sum().clamp(min=1.0)


def grown_router_losses(
    router_logits: tuple[torch.Tensor, ...],
    groups_per_layer: list[list[tuple[int, int]]],
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Load-balancing and z-loss of a model that grew experts (`WhisperMoEConfig.expert_growth`), padding excluded.

    `router_logits` holds one (tokens, E + null columns) tensor per sparse layer, `groups_per_layer` that layer's
    (num_experts, top_k) groups. The base groups wider than one expert are balanced together exactly as in a model
    that never grew; each grown group is balanced over its own experts, and those losses are averaged with the base
    one, so every group is pulled towards using all of its experts. The z-loss covers every logit.
    Returns (balance, z_loss); balance is None when no group has more than one expert.
    """
    wide = [(logits, groups[0]) for logits, groups in zip(router_logits, groups_per_layer) if groups[0][0] > 1]
    balances = []
    if wide:  # every sparse-from-the-start layer has the config's base group; dense-made-sparse ones have one expert
        (size, top_k), base = wide[0][1], tuple(logits[:, : group[0]] for logits, group in wide)
        balances.append(load_balancing_loss(base, size, top_k, attention_mask))
    for logits, groups in zip(router_logits, groups_per_layer):
        offset = groups[0][0]
        for size, top_k in groups[1:]:
            if size > 1:
                balances.append(load_balancing_loss((logits[:, offset : offset + size],), size, top_k, attention_mask))
            offset += size
    z_loss = torch.stack([router_z_loss((logits,), attention_mask) for logits in router_logits]).mean()
    return (torch.stack(balances).mean() if balances else None), z_loss


def router_losses(
    encoder_router_logits: tuple[torch.Tensor, ...] | None,
    decoder_router_logits: tuple[torch.Tensor, ...] | None,
    encoder_mask: torch.Tensor | None,
    decoder_mask: torch.Tensor | None,
    config: WhisperMoEConfig,
) -> dict[str, torch.Tensor | None]:
    """Load-balancing and z-losses of the encoder's and the decoder's sparse layers, padding masked, and their sum.

    Each side's router logits are one (tokens, num_experts) tensor per sparse layer (plus one null
    column per grown group in a model that grew experts), and its mask covers those tokens
    (1 = real, any shape with that many elements; None counts every token). Returns `aux_loss` =
    router_aux_loss_coef * (encoder_aux_loss + decoder_aux_loss) + router_z_loss_coef * (encoder_z_loss +
    decoder_z_loss) and the four unweighted parts; a side without sparse layers gives None for its parts.
    """
    losses: dict[str, torch.Tensor | None] = {"aux_loss": None}
    for side, logits, mask in (
        ("encoder", encoder_router_logits, encoder_mask),
        ("decoder", decoder_router_logits, decoder_mask),
    ):
        if not logits:
            losses[f"{side}_aux_loss"] = losses[f"{side}_z_loss"] = None
            continue
        if config.expert_growth:
            balance, z_loss = grown_router_losses(logits, config.sparse_layer_groups(side), mask)
            balance = balance if balance is not None else torch.zeros_like(z_loss)
        else:
            balance = load_balancing_loss(logits, config.num_experts, config.num_experts_per_tok, mask)
            z_loss = router_z_loss(logits, mask)
        weighted = config.router_aux_loss_coef * balance + config.router_z_loss_coef * z_loss
        losses[f"{side}_aux_loss"], losses[f"{side}_z_loss"] = balance, z_loss
        total = losses["aux_loss"]
        losses["aux_loss"] = weighted if total is None else total + weighted.to(total.device)
    return losses


# ---------------------------------------------------------------------------------------------------------------------
# Mixture-of-Experts blocks
# ---------------------------------------------------------------------------------------------------------------------


class WhisperMoERouter(nn.Module):
    """Scores experts per token and keeps the top k. Returns (router_logits, top_k_weights, top_k_index).

    `groups` lists (num_experts, top_k) per expert group: the base group, then one per growth phase (see
    `WhisperMoEConfig.expert_growth`). The base group routes as in any top-k MoE. A grown group adds its own top-k
    experts to each token, weighted by their softmax probabilities over the group's experts and a learned null
    logit, so the weights of a grown group can sum to nearly 0 (the null expert computes nothing).
    `phases` gives the growth phase of each grown group. Groups of phases at or after `routed_phases` (when set) do
    not route: with `routed_phases = p` the block computes what it did before phase p. Nor do groups of phases that
    serve other input modalities than `input_modality` (set by `routing_modality` for each forward pass; None
    = unknown, every group routes); their logits come back detached, so no loss trains them on inputs they skip.
    """

    def __init__(
        self,
        config: WhisperMoEConfig,
        groups: list[tuple[int, int]] | None = None,
        phases: list[int] | None = None,
    ):
        super().__init__()
        self.groups = list(groups or [(config.num_experts, config.num_experts_per_tok)])
        self.phases = list(phases or [])
        if len(self.phases) != len(self.groups) - 1:
            raise ValueError(f"{len(self.groups) - 1} grown expert groups need as many phases, got {self.phases}.")
        self.num_experts = sum(size for size, _ in self.groups)
        self.top_k = self.groups[0][1]  # the base group's
        self.norm_topk_prob = config.norm_topk_prob
        self.jitter_noise = config.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.d_model))
        if len(self.groups) > 1:
            self.null_logits = nn.Parameter(torch.zeros(len(self.groups) - 1))  # one per grown group
        self.routed_phases: int | None = None
        self.group_modalities = [config.growth_modalities(phase) for phase in self.phases]
        self.input_modality: str | None = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states: (tokens, d_model) -> logits (tokens, E [+ one null column per grown group]),
        weights (tokens, K), expert indices (tokens, K), K the summed top-k of the groups that route."""
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        router_logits = F.linear(hidden_states, self.weight)
        base_size, base_top_k = self.groups[0]
        # softmax in fp32: in bf16 near-tied experts would otherwise swap places at random
        probs = router_logits[:, :base_size].softmax(dim=-1, dtype=torch.float32)
        top_k_weights, top_k_index = probs.topk(base_top_k, dim=-1)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        if len(self.groups) == 1:
            return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index
        null_logits = self.null_logits.to(router_logits.dtype).expand(router_logits.shape[0], -1)  # (tokens, G)
        top_k_weights, top_k_index = self._route_grown_groups(router_logits, null_logits, top_k_weights, top_k_index)
        logits = torch.cat([router_logits, null_logits], dim=-1)
        silent = self._silent_columns()
        if silent is not None:
            logits = torch.where(silent.to(logits.device), logits.detach(), logits)
        return logits, top_k_weights.to(hidden_states.dtype), top_k_index

    def routes(self, group: int) -> bool:
        """Whether grown group `group` (0 = the first grown one) routes in this forward pass."""
        if self.routed_phases is not None and self.phases[group] >= self.routed_phases:
            return False
        return self._serves(group)

    def _serves(self, group: int) -> bool:
        modalities = self.group_modalities[group]
        return modalities is None or self.input_modality is None or self.input_modality in modalities

    def _silent_columns(self) -> torch.Tensor | None:
        """(E + G,) bool: the logit columns (experts and null) of grown groups that serve other input modalities;
        None when every group serves this one."""
        if all(self._serves(group) for group in range(len(self.phases))):
            return None
        silent = torch.zeros(self.num_experts + len(self.phases), dtype=torch.bool)
        offset = self.groups[0][0]
        for group, (size, _) in enumerate(self.groups[1:]):
            if not self._serves(group):
                silent[offset : offset + size] = silent[self.num_experts + group] = True
            offset += size
        return silent

    def _route_grown_groups(
        self, logits: torch.Tensor, null_logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each routing grown group's top-k (weights unnormalised, the null expert's share left out) to the
        base's."""
        all_weights, all_index, offset = [weights], [index], self.groups[0][0]
        for group, (size, top_k) in enumerate(self.groups[1:]):
            if self.routes(group):
                group_logits = torch.cat([logits[:, offset : offset + size], null_logits[:, group, None]], dim=-1)
                probs = group_logits.softmax(dim=-1, dtype=torch.float32)[:, :size]
                group_weights, group_index = probs.topk(top_k, dim=-1)
                all_weights.append(group_weights)
                all_index.append(group_index + offset)
            offset += size
        return torch.cat(all_weights, dim=-1), torch.cat(all_index, dim=-1)


@contextmanager
def routing_modality(module: nn.Module, modality: str | None) -> Iterator[None]:
    """Within the block the routers and PEER blocks in `module` know the encoder's input modality ("speech", "text"
    or "pose"), so that growth phases serving other modalities stay silent (`WhisperMoEConfig.expert_growth`)."""
    if not module.config.modality_growth:
        yield
        return
    gated = [block for block in module.modules() if isinstance(block, (WhisperMoERouter, PEER))]
    saved = [block.input_modality for block in gated]
    try:
        for block in gated:
            block.input_modality = modality
        yield
    finally:
        for block, state in zip(gated, saved):
            block.input_modality = state


def grouped_experts_forward(
    self: "WhisperMoEExperts", hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Sort the (token, expert) slots by expert once, run each expert on its contiguous segment, scatter back.

    hidden_states (tokens, d_model), top_k_index / top_k_weights (tokens, k) -> (tokens, d_model).
    """
    top_k = top_k_index.shape[-1]
    flat_experts = top_k_index.reshape(-1)  # (tokens * k,)
    order = flat_experts.argsort(stable=True)
    token_of_slot = order // top_k
    counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
    grouped = hidden_states[token_of_slot].split(counts)
    outputs = [
        self.expert_forward(weights, tokens)
        for weights, tokens in zip(self.per_expert_weights(), grouped)
        if tokens.shape[0] > 0
    ]
    expert_out = torch.cat(outputs) * top_k_weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden_states).index_add_(0, token_of_slot, expert_out.to(hidden_states.dtype))


def loop_experts_forward(
    self: "WhisperMoEExperts", hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The reference: for each expert, find its tokens with a mask and add its weighted output."""
    output = torch.zeros_like(hidden_states)
    for expert_idx, weights in enumerate(self.per_expert_weights()):
        token_idx, slot = torch.where(top_k_index == expert_idx)
        if token_idx.numel() == 0:
            continue
        expert_out = self.expert_forward(weights, hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
        output.index_add_(0, token_idx, expert_out.to(hidden_states.dtype))
    return output


class WhisperMoEExpertsInterface(ExpertsInterface):
    """transformers' experts kernels ("grouped_mm", "batched_mm", ...) plus this model's "grouped" and "loop"."""

    _global_mapping = {
        **ExpertsInterface._global_mapping,
        "grouped": grouped_experts_forward,
        "loop": loop_experts_forward,
    }


EXPERTS_FUNCTIONS = WhisperMoEExpertsInterface()


@use_experts_implementation(experts_interface=EXPERTS_FUNCTIONS, has_gate=False, has_bias=True)
class WhisperMoEExperts(nn.Module):
    """`num_experts` feed-forward blocks like Whisper's (fc1 -> activation -> fc2) of `ffn_dim` hidden units (the
    dense width, or a segment of it with `config.expert_segments`), stored as stacked tensors.

    transformers' `use_experts_implementation` dispatches the forward on `config._experts_implementation` (see
    `WhisperMoEConfig.experts_implementation`): "grouped" (default), "loop" (the reference), or transformers' own
    "grouped_mm" / "batched_mm", which find the weights under the names `up_proj` / `down_proj` aliased below.
    """

    def __init__(self, config: WhisperMoEConfig, ffn_dim: int, num_experts: int | None = None):
        super().__init__()
        self.num_experts = num_experts = num_experts or config.num_experts
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, ffn_dim, config.d_model))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, ffn_dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, config.d_model, ffn_dim))
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, config.d_model))
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout

    # transformers' experts kernels read the weights and activation under these names
    act_fn = property(lambda self: self.activation_fn)
    up_proj = property(lambda self: self.fc1_weight)
    up_proj_bias = property(lambda self: self.fc1_bias)
    down_proj = property(lambda self: self.fc2_weight)
    down_proj_bias = property(lambda self: self.fc2_bias)

    def per_expert_weights(self) -> list[tuple[torch.Tensor, ...]]:
        """(fc1_weight, fc1_bias, fc2_weight, fc2_bias) of each expert.

        unbind, not indexing: the backward of one unbind is one stack, while indexing each expert would materialise a
        full-size zero gradient per expert.
        """
        stacked = (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)
        return list(zip(*(tensor.unbind(0) for tensor in stacked)))

    def expert_forward(self, weights: tuple[torch.Tensor, ...], hidden_states: torch.Tensor) -> torch.Tensor:
        """One expert, given its (fc1_weight, fc1_bias, fc2_weight, fc2_bias), on its tokens: (n, d) -> (n, d)."""
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = weights
        hidden_states = self.activation_fn(F.linear(hidden_states, fc1_weight, fc1_bias))
        hidden_states = F.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        return F.linear(hidden_states, fc2_weight, fc2_bias)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states (tokens, d_model), top_k_index / top_k_weights (tokens, k) -> (tokens, d_model).

        The "eager" implementation is the grouped dispatch.
        """
        return grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights)


class WhisperMoEMLP(nn.Module):
    """Whisper's dense feed-forward block; used by dense layers and as the fused shared experts."""

    def __init__(self, config: WhisperMoEConfig, ffn_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, config.d_model)
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = F.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        return self.fc2(hidden_states)


class WhisperMoESparseBlock(nn.Module):
    """Router -> top-k experts -> weighted sum, plus the shared experts when the config has them.

    `ffn_dim` is the layer's dense width: each routed expert has `config.expert_ffn_dim(ffn_dim)` hidden units, the
    fused shared experts `num_shared_experts * ffn_dim`. `groups`: see `WhisperMoERouter`; the experts of all groups
    are stacked in one `WhisperMoEExperts`.
    """

    def __init__(
        self,
        config: WhisperMoEConfig,
        ffn_dim: int,
        groups: list[tuple[int, int]] | None = None,
        phases: list[int] | None = None,
    ):
        super().__init__()
        self.router = WhisperMoERouter(config, groups, phases)
        self.experts = WhisperMoEExperts(config, config.expert_ffn_dim(ffn_dim), self.router.num_experts)
        self.shared_experts = (
            WhisperMoEMLP(config, ffn_dim * config.num_shared_experts) if config.num_shared_experts > 0 else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, seq_len, d_model) -> (batch, seq_len, d_model)."""
        batch_size, seq_len, d_model = hidden_states.shape
        tokens = hidden_states.reshape(-1, d_model)
        _, top_k_weights, top_k_index = self.router(tokens)
        output = self.experts(tokens, top_k_index, top_k_weights)
        if self.shared_experts is not None:
            output = output + self.shared_experts(tokens)
        return output.reshape(batch_size, seq_len, d_model)


def _feed_forward_block(config: WhisperMoEConfig, side: str, layer_idx: int, ffn_dim: int) -> nn.Module:
    groups = config.expert_groups(side, layer_idx)
    if groups:
        return WhisperMoESparseBlock(config, ffn_dim, groups, config.growth_phases(side, layer_idx))
    return WhisperMoEMLP(config, ffn_dim)


# ---------------------------------------------------------------------------------------------------------------------
# Layers: Whisper's, with `self.mlp` (dense or sparse) in place of fc1/fc2
# ---------------------------------------------------------------------------------------------------------------------


# Adapted from transformers.models.whisper.modeling_whisper (5.x)
class _FeedForwardResidual:
    """The pre-norm residual feed-forward sub-block both layer kinds end with; a layer given PEER blocks by growth
    (peer.py) adds their output to the feed-forward block's, inside the residual branch."""

    def test_time_training(self, hidden_states: torch.Tensor, cache=None) -> torch.Tensor:
        """The layer's Test-Time-Training sub-layer (ttt.py), pre-norm and residual; the identity without one."""
        if self.ttt is None:
            return hidden_states
        normed = self.ttt_layer_norm(hidden_states)
        state = cached_state(cache, self.ttt, self.self_attn.layer_idx, normed) if self.ttt.causal else None
        return hidden_states + F.dropout(self.ttt(normed, state), p=self.dropout, training=self.training)

    def convolution(self, hidden_states: torch.Tensor, cache=None) -> torch.Tensor:
        """The layer's Conformer convolution module (echo.py), residual; the identity without one."""
        if self.conv_module is None:
            return hidden_states
        change = self.conv_module(hidden_states, cache, self.self_attn.layer_idx)
        return hidden_states + F.dropout(change, p=self.dropout, training=self.training)

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        normed = self.final_layer_norm(hidden_states)
        hidden_states = self.mlp(normed)
        for peer in self.peers:
            if peer.active:
                hidden_states = hidden_states + peer(normed)
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        return residual + hidden_states


class WhisperMoEEncoderLayer(_FeedForwardResidual, WhisperEncoderLayer):
    def __init__(self, config: WhisperMoEConfig, layer_idx: int):
        super().__init__(config)
        del self.fc1, self.fc2
        self.mlp = _feed_forward_block(config, "encoder", layer_idx, config.encoder_ffn_dim)
        self.peers = peer_blocks(config, "encoder", layer_idx)
        self.ttt_layer_norm, self.ttt = ttt_sublayer(config, "encoder", layer_idx)
        if needs_echo_attention(config, "encoder"):
            self.self_attn = EchoSelfAttention(config, "encoder")
        self.conv_module = convolution_module(config, "encoder")

    # Adapted from transformers.models.whisper.modeling_whisper (5.x)
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
        """(batch, 1500, d_model) -> (batch, 1500, d_model)."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask, **kwargs
        )
        hidden_states = residual + F.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.feed_forward(self.convolution(self.test_time_training(hidden_states)))
        if hidden_states.dtype == torch.float16:
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = hidden_states.clamp(min=-clamp_value, max=clamp_value)
        return hidden_states


class WhisperMoEDecoderLayer(_FeedForwardResidual, WhisperDecoderLayer):
    def __init__(self, config: WhisperMoEConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.fc1, self.fc2
        self.mlp = _feed_forward_block(config, "decoder", layer_idx, config.decoder_ffn_dim)
        self.peers = peer_blocks(config, "decoder", layer_idx)
        self.ttt_layer_norm, self.ttt = ttt_sublayer(config, "decoder", layer_idx)
        if needs_echo_attention(config, "decoder"):
            self.self_attn = EchoSelfAttention(config, "decoder", layer_idx)
        self.conv_module = convolution_module(config, "decoder")

    # Adapted from transformers.models.whisper.modeling_whisper (5.x)
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = True,
        encoder_padding_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """(batch, tgt_len, d_model) -> (batch, tgt_len, d_model), attending to (batch, src_len, d_model).

        encoder_padding_mask: (batch, src_len), 1 = real encoder position (padded text input). WhisperDecoder hands
        its layers encoder_attention_mask=None, so the 2D mask comes through its keyword arguments under this name.
        """
        if encoder_attention_mask is None and encoder_padding_mask is not None:
            encoder_attention_mask = create_bidirectional_mask(
                config=self.self_attn.config,
                inputs_embeds=hidden_states,
                attention_mask=encoder_padding_mask,
                encoder_hidden_states=encoder_hidden_states,
            )
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.self_attn_layer_norm(hidden_states), cache=cache, attention_mask=attention_mask, **kwargs
        )
        hidden_states = residual + F.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.convolution(self.test_time_training(hidden_states, cache), cache)
        if encoder_hidden_states is not None:
            residual = hidden_states
            hidden_states, _ = self.encoder_attn(
                self.encoder_attn_layer_norm(hidden_states),
                key_value_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                cache=cache,
                **kwargs,
            )
            hidden_states = residual + F.dropout(hidden_states, p=self.dropout, training=self.training)
        return self.feed_forward(hidden_states)


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained base, encoder, decoder
# ---------------------------------------------------------------------------------------------------------------------


class WhisperMoEPreTrainedModel(WhisperPreTrainedModel):
    config_class = WhisperMoEConfig
    config: WhisperMoEConfig
    _no_split_modules = ["WhisperMoEEncoderLayer", "WhisperMoEDecoderLayer"]

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers caches this answer as a class attribute found by inheritance: once a dense Whisper has been
        # built, WhisperPreTrainedModel says False and every subclass would read that cached False
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """The requested experts implementation, else the config's saved default; "eager" means the grouped one."""
        implementation = requested_experts or self.config.experts_implementation
        if implementation != "eager" and implementation not in EXPERTS_FUNCTIONS:
            raise ValueError(
                f"experts_implementation={implementation!r} is not available; choose one of "
                f"{['eager', *EXPERTS_FUNCTIONS.valid_keys()]}."
            )
        return implementation

    def add_experts(self, num_new: int, **options) -> "WhisperMoEPreTrainedModel":
        """Grow `num_new` experts into the chosen layers (every sparse layer by default), outputs unchanged; in place.
        `options`: num_experts_per_tok, encoder_layers, decoder_layers, init, seed, peer, modalities (e.g. ["text"]:
        the only inputs they serve); see growth.grow_experts."""
        from .growth import grow_experts

        return grow_experts(self, num_new, **options)

    def add_peer(
        self, encoder_layers: list[int] | None = None, decoder_layers: list[int] | None = None, seed: int = 0, **sizes
    ) -> "WhisperMoEPreTrainedModel":
        """Grow a PEER block of `num_keys`**2 single-neuron experts beside the chosen layers' feed-forward blocks
        (every sparse layer by default), outputs unchanged; in place. `sizes`: num_keys, num_heads,
        num_experts_per_head, key_dim (defaults: `PEER_DEFAULTS`). See peer.py and growth.py."""
        from .growth import grow_peer

        return grow_peer(self, encoder_layers, decoder_layers, seed, **sizes)

    # model.add_ttt(encoder_layers=None, decoder_layers=None, ttt_type="mlp", ...): ttt.add_ttt as a method
    add_ttt = add_ttt

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.init_std
        if isinstance(module, WhisperMoERouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if hasattr(module, "null_logits"):
                init.zeros_(module.null_logits)
        elif isinstance(module, WhisperMoEExperts):
            init.normal_(module.fc1_weight, mean=0.0, std=std)
            init.normal_(module.fc2_weight, mean=0.0, std=std)
            init.zeros_(module.fc1_bias)
            init.zeros_(module.fc2_bias)
        elif isinstance(module, PEER):  # after its Linear and Embedding children: zero up vectors win
            module.init_weights(std)
        elif isinstance(module, TTTBase):  # its own parameters, gates closed
            module.init_weights(std)
        elif isinstance(module, WaveNetBranch):  # after its convolutions and norm: alpha at its start
            module.init_weights()
        elif isinstance(module, ECHO_MODULES):  # after their children: zero output layers win
            module.init_weights()
        elif isinstance(module, EncoderSinusoids):  # after Embedding's normal init: Whisper's sinusoids win
            init.copy_(module.weight, sinusoids(*module.weight.shape))


class EncoderSinusoids(nn.Embedding):
    """Whisper's fixed sinusoidal encoder position table. Its own class so that `_init_weights` gives a model built
    from a config the sinusoids: transformers copies them in when it initialises the encoder, but skips an encoder of
    custom code as it holds no parameters of its own, which left the table random (and frozen)."""


def _router_recorder() -> dict:
    return {"router_logits": OutputRecorder(WhisperMoERouter, index=0)}


class WhisperMoEEncoder(WhisperMoEPreTrainedModel, WhisperEncoder):
    _can_record_outputs = {**WhisperEncoder._can_record_outputs, **_router_recorder()}

    # Adapted from transformers.models.whisper.modeling_whisper (5.x)
    def __init__(self, config: WhisperMoEConfig):
        WhisperMoEPreTrainedModel.__init__(self, config)
        self.dropout = config.dropout
        self.layerdrop = config.encoder_layerdrop
        embed_dim = config.d_model
        self.num_mel_bins = config.num_mel_bins
        self.padding_idx = config.pad_token_id
        self.max_source_positions = config.max_source_positions
        self.embed_scale = embed_dim**0.5 if config.scale_embedding else 1.0
        self.conv1 = nn.Conv1d(self.num_mel_bins, embed_dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(embed_dim, embed_dim, kernel_size=3, stride=ENCODER_DOWNSAMPLING, padding=1)
        whisper_table = EncoderSinusoids(self.max_source_positions, embed_dim).requires_grad_(False)  # fixed
        self.embed_positions = position_table(config, "encoder", whisper_table)
        if config.text_frontend:
            self.embed_text_tokens = nn.Embedding(config.vocab_size, embed_dim, self.padding_idx)
            self.embed_text_positions = nn.Embedding(config.max_text_positions, embed_dim)
        if config.pose_frontend:
            self.embed_pose = PoseFrontend(config)
        if config.patch_frontend:
            self.embed_patches = PatchFrontend(config)
        self.layers = nn.ModuleList([WhisperMoEEncoderLayer(config, i) for i in range(config.encoder_layers)])
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        pose_values: torch.Tensor | None = None,
        pixel_values: Video | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """Audio: `input_features` (batch, num_mel_bins, 3000) -> last_hidden_state (batch, 1500, d_model), Whisper's
        encoder. Text (`config.text_frontend`): `input_ids` (batch, text_len) and `attention_mask` (batch, text_len),
        1 = real token -> `WhisperMoEEncoderOutput`, last_hidden_state (batch, text_len, d_model). Poses
        (`config.pose_frontend`): `pose_values` (batch, frames, 27, 4) and `attention_mask` (batch, frames), 1 = real
        frame -> last_hidden_state (batch, frames, d_model). Video (`config.patch_frontend`): `pixel_values` (see
        `forward_video`) -> last_hidden_state (batch, tubelets, d_model). The output's "modality" ("speech", "text",
        "pose" or "video") tells the decoder which growth phases serve it."""
        given = [x is not None for x in (input_features, input_ids, pose_values, pixel_values)]
        if sum(given) > 1:
            raise ValueError(
                "Pass the encoder one input of input_features (audio), input_ids (text), pose_values or pixel_values "
                "(video), not both or several."
            )
        modality = ("pose" if pose_values is not None else "video" if pixel_values is not None
                    else "text" if input_ids is not None else "speech")  # fmt: skip
        with routing_modality(self, modality):
            if pixel_values is not None:
                outputs = self.forward_video(pixel_values, attention_mask=attention_mask, **kwargs)
            elif pose_values is not None:
                outputs = self.forward_pose(pose_values, attention_mask=attention_mask, **kwargs)
            elif input_ids is not None:
                outputs = self.forward_text(input_ids, attention_mask=attention_mask, **kwargs)
            elif self.config.variable_length_audio:
                outputs = self.forward_variable_length(input_features, attention_mask=attention_mask, **kwargs)
            else:
                outputs = super().forward(input_features, attention_mask=attention_mask, **kwargs)
        if isinstance(outputs, BaseModelOutput):
            outputs["modality"] = modality
        return outputs

    def embed_text(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text front-end: (batch, text_len) ids -> (batch, text_len, d_model), token embedding plus learned position.

        Positions count real tokens only, so left and right padding give the real tokens the same inputs.
        """
        if not self.config.text_frontend:
            raise ValueError(
                "This model has no text front-end (config.text_frontend=False); add one with "
                "WhisperMoEForConditionalGeneration.add_text_frontend()."
            )
        if input_ids.shape[1] > self.config.max_text_positions:
            raise ValueError(
                f"input_ids have {input_ids.shape[1]} tokens, more than max_text_positions="
                f"{self.config.max_text_positions}."
            )
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (batch, text_len)
        return self.embed_text_tokens(input_ids) * self.embed_scale + self.embed_text_positions(position_ids)

    @capture_outputs
    def forward_text(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> "WhisperMoEEncoderOutput":
        """(batch, text_len) ids and mask -> last_hidden_state (batch, text_len, d_model); padding is masked out of
        self-attention and the mask is returned with the output for the decoder's cross-attention."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden_states = self.embed_text(input_ids, attention_mask)
        return self._encode_embedded(hidden_states, attention_mask, self.layers[: self.config.text_encoder_layers])

    @capture_outputs
    def forward_pose(
        self, pose_values: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> "WhisperMoEEncoderOutput":
        """(batch, frames, 27, 4) keypoints with visibility (pose.pose_values) and (batch, frames) mask ->
        last_hidden_state (batch, frames, d_model) through every encoder layer; the mask comes back with it. With
        `config.pack_pose` the clips run packed (right padding only), zeros past each clip's end; either way each
        clip's output is what it would get alone."""
        if not self.config.pose_frontend:
            raise ValueError("This model has no pose front-end (config.pose_frontend=False).")
        frames = pose_values.shape[1]
        if frames > self.max_source_positions:
            raise ValueError(
                f"pose_values have {frames} frames, more than max_source_positions={self.max_source_positions}."
            )
        if attention_mask is None:
            attention_mask = torch.ones(pose_values.shape[:2], dtype=torch.long, device=pose_values.device)
        positions = self.embed_positions(torch.arange(frames, device=pose_values.device))  # (frames, d_model)
        hidden_states = self.embed_pose(pose_values, positions)
        if self.config.pack_pose:
            return self._encode_packed(hidden_states, attention_mask, **kwargs)
        return self._encode_embedded(hidden_states, attention_mask, self.layers, **kwargs)

    def _encode_packed(self, hidden_states, attention_mask, **kwargs) -> "WhisperMoEEncoderOutput":
        """A front-end's right-padded (batch, len, d_model) inputs through every layer packed (plan_clip_packing),
        then back in the padded layout; router_mask marks the packed rows' real tokens for the router losses."""
        batch_size, seq_len, _ = hidden_states.shape
        packing = plan_clip_packing(attention_mask)
        hidden_states = F.dropout(pack(hidden_states, packing), p=self.dropout, training=self.training)
        self_attention_mask = self._attention_mask(block_diagonal_mask(packing), hidden_states.dtype)
        hidden_states = self._run_layers(hidden_states, self_attention_mask, self.layers, **kwargs)
        hidden_states = unpack(self.layer_norm(hidden_states), packing, batch_size, seq_len)
        return WhisperMoEEncoderOutput(
            last_hidden_state=hidden_states, attention_mask=attention_mask, router_mask=packing.real.reshape(-1).long()
        )

    @capture_outputs
    def forward_video(
        self, pixel_values: Video, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> "WhisperMoEEncoderOutput":
        """RGB video -> last_hidden_state (batch, tubelets, d_model) through every encoder layer, with the (batch,
        tubelets) mask of real tubelets. pixel_values: (batch, frames, height, width, 3) pixels in [0, 255] with
        attention_mask (batch, frames), 1 = real frame, or a list of (frames, height, width, 3) clips of any sizes
        (patches.py)."""
        if not self.config.patch_frontend:
            raise ValueError(
                "This model has no patch front-end (config.patch_frontend=False); add one with "
                "WhisperMoEForConditionalGeneration.add_patch_frontend()."
            )
        hidden_states, token_mask = self.embed_patches(pixel_values, attention_mask)
        return self._encode_embedded(hidden_states, token_mask, self.layers, **kwargs)

    def _encode_embedded(self, hidden_states, attention_mask, layers, **kwargs) -> "WhisperMoEEncoderOutput":
        """A front-end's (batch, len, d_model) inputs through `layers` with padding masked; the mask comes back for
        the decoder's cross-attention."""
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        self_attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        hidden_states = self._run_layers(hidden_states, self_attention_mask, layers, **kwargs)
        return WhisperMoEEncoderOutput(last_hidden_state=self.layer_norm(hidden_states), attention_mask=attention_mask)

    @capture_outputs
    def forward_variable_length(
        self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> "WhisperMoEEncoderOutput":
        """Encode only real mel frames (`config.variable_length_audio`).

        input_features (batch, num_mel_bins, frames <= 3000) and attention_mask (batch, frames), 1 = real frame ->
        last_hidden_state (batch, seq_len, d_model) with seq_len = ceil(longest clip's frames / 2), zeros past each
        clip's end, and attention_mask (batch, seq_len) of real positions for the decoder's cross-attention. With
        `config.pack_audio` the clips run packed (see packing.py); either way each clip's output is what it would
        get alone.
        """
        batch_size, _, frames = input_features.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, frames, dtype=torch.long, device=input_features.device)
        frame_lengths = attention_mask.sum(-1)
        if bool((frame_lengths == 0).any()):
            raise ValueError("A clip has no real mel frames (its attention_mask row is all zeros).")
        longest = int(frame_lengths.max())
        frame_mask = attention_mask[:, None, :longest].to(input_features.dtype)  # (batch, 1, longest)
        # zero what lies past each clip after every convolution, so edges see the zeros they would see alone
        hidden_states = F.gelu(self.conv1(input_features[..., :longest] * frame_mask)) * frame_mask
        hidden_states = F.gelu(self.conv2(hidden_states)).transpose(1, 2)  # (batch, seq_len, d_model)
        seq_len = hidden_states.shape[1]
        if seq_len > self.max_source_positions:
            raise ValueError(
                f"{longest} mel frames need {seq_len} encoder positions, more than max_source_positions="
                f"{self.max_source_positions} (30 s); transcribe longer audio in chunks (chunk_length_s=30)."
            )
        lengths = (frame_lengths + ENCODER_DOWNSAMPLING - 1) // ENCODER_DOWNSAMPLING  # (batch,)
        real = torch.arange(seq_len, device=lengths.device)[None] < lengths[:, None]  # (batch, seq_len)
        hidden_states = hidden_states + self.embed_positions(torch.arange(seq_len, device=hidden_states.device))
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        packing = plan_packing(lengths, seq_len, self.max_source_positions) if self.config.pack_audio else None
        if packing is not None:
            hidden_states = pack(hidden_states, packing)  # (rows, row_len, d_model)
            keep, router_mask = block_diagonal_mask(packing), packing.real
        else:
            keep, router_mask = real[:, None, None, :].expand(-1, 1, seq_len, -1), real
        self_attention_mask = self._attention_mask(keep, hidden_states.dtype)
        hidden_states = self._run_layers(hidden_states, self_attention_mask, self.layers, **kwargs)
        hidden_states = self.layer_norm(hidden_states)
        if packing is not None:
            hidden_states = unpack(hidden_states, packing, batch_size, seq_len)
        else:
            hidden_states = hidden_states * real[..., None].to(hidden_states.dtype)
        return WhisperMoEEncoderOutput(
            last_hidden_state=hidden_states, attention_mask=real.long(), router_mask=router_mask.reshape(-1).long()
        )

    def _run_layers(self, hidden_states, self_attention_mask, layers, **kwargs) -> torch.Tensor:
        """(rows, len, d_model) through `layers` under `self_attention_mask`, with Whisper's layer drop in training."""
        for encoder_layer in layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            hidden_states = encoder_layer(hidden_states, self_attention_mask, **kwargs)
        return hidden_states

    def _attention_mask(self, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A (batch, 1, q, k) bool mask, True = attend, in the form this model's attention implementation takes."""
        implementation = self.config._attn_implementation
        if implementation == "sdpa":
            return keep
        if implementation == "eager":
            return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
        raise ValueError(
            f"variable_length_audio and packed pose clips run with attn_implementation 'sdpa' or 'eager', not "
            f"{implementation!r}."
        )


@dataclass
class WhisperMoEEncoderOutput(BaseModelOutput):
    """The encoder's output for text or variable-length audio; it travels through generate with its masks.

    attention_mask: (batch, seq_len), 1 on real positions; the decoder's cross-attention skips the rest.
    router_mask: (routed tokens,), 1 on the tokens the router losses count, when they are not `attention_mask`'s
    (packed audio or pose rows); None for text.
    """

    attention_mask: torch.Tensor | None = None
    router_mask: torch.Tensor | None = None


class WhisperMoEDecoder(WhisperMoEPreTrainedModel, WhisperDecoder):
    _can_record_outputs = {**WhisperDecoder._can_record_outputs, **_router_recorder()}
    main_input_name = "input_ids"

    # Adapted from transformers.models.whisper.modeling_whisper (5.x)
    def __init__(self, config: WhisperMoEConfig):
        WhisperMoEPreTrainedModel.__init__(self, config)
        self.dropout = config.dropout
        self.layerdrop = config.decoder_layerdrop
        self.padding_idx = config.pad_token_id
        self.max_target_positions = config.max_target_positions
        self.max_source_positions = config.max_source_positions
        self.embed_scale = config.d_model**0.5 if config.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, self.padding_idx)
        learned = WhisperPositionalEmbedding(self.max_target_positions, config.d_model)
        self.embed_positions = position_table(config, "decoder", learned)
        self.layers = nn.ModuleList([WhisperMoEDecoderLayer(config, i) for i in range(config.decoder_layers)])
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.gradient_checkpointing = False
        self.post_init()


# ---------------------------------------------------------------------------------------------------------------------
# Encoder-decoder and generation head
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class WhisperMoEModelOutput(Seq2SeqModelOutput):
    """Whisper's encoder-decoder output plus each sparse layer's router logits, (batch * seq_len, num_experts)."""

    encoder_router_logits: tuple[torch.Tensor, ...] | None = None
    decoder_router_logits: tuple[torch.Tensor, ...] | None = None
    encoder_attention_mask: torch.Tensor | None = None  # (batch, text_len) for text input; None for audio
    encoder_router_mask: torch.Tensor | None = None  # (routed tokens,) for variable-length audio, packed poses


@dataclass
class WhisperMoEOutput(Seq2SeqLMOutput):
    """Whisper's LM output plus the router losses.

    `aux_loss` is what the router losses add to `loss`: router_aux_loss_coef * (encoder_aux_loss + decoder_aux_loss)
    + router_z_loss_coef * (encoder_z_loss + decoder_z_loss). The four parts are kept unweighted so training can log
    each.
    """

    aux_loss: torch.Tensor | None = None
    encoder_aux_loss: torch.Tensor | None = None
    decoder_aux_loss: torch.Tensor | None = None
    encoder_z_loss: torch.Tensor | None = None
    decoder_z_loss: torch.Tensor | None = None
    encoder_router_logits: tuple[torch.Tensor, ...] | None = None
    decoder_router_logits: tuple[torch.Tensor, ...] | None = None


def _shared_fields(output: ModelOutput, target: type[ModelOutput]) -> dict:
    """The fields of `output` that `target` has too (cache, hidden states, attentions, router logits), by name."""
    names = {field.name for field in fields(target)}
    return {field.name: getattr(output, field.name) for field in fields(output) if field.name in names}


class WhisperMoEModel(WhisperMoEPreTrainedModel, WhisperModel):
    def __init__(self, config: WhisperMoEConfig):
        WhisperMoEPreTrainedModel.__init__(self, config)
        self.encoder = WhisperMoEEncoder(config)
        self.decoder = WhisperMoEDecoder(config)
        if config.quantization is not None:  # an int8 folder: build its int8 modules before loading fills them
            quantize_model(self)
        self.post_init()

    # Adapted from transformers.models.whisper.modeling_whisper (5.x)
    def forward(
        self,
        input_features: torch.Tensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: tuple | BaseModelOutput | None = None,
        cache=None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        input_ids: torch.LongTensor | None = None,
        pose_values: torch.Tensor | None = None,
        pixel_values: Video | None = None,
        **kwargs,
    ) -> WhisperMoEModelOutput:
        """Whisper's forward; with `output_router_logits` it also returns each sparse layer's router logits.

        input_features: (batch, num_mel_bins, 3000) log-mel; decoder_input_ids: (batch, tgt_len). Text instead of
        audio (`config.text_frontend`): input_ids (batch, text_len) with attention_mask (batch, text_len).
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if encoder_outputs is None and (input_ids is not None or pose_values is not None or pixel_values is not None):
            encoder_outputs = self.encoder(input_ids=input_ids, pose_values=pose_values, pixel_values=pixel_values,
                                           attention_mask=attention_mask, output_router_logits=output_router_logits,
                                           **kwargs)  # fmt: skip
        elif encoder_outputs is None:
            input_features = self._mask_input_features(input_features, attention_mask=attention_mask)
            encoder_mask = attention_mask if self.config.variable_length_audio else None
            encoder_outputs = self.encoder(
                input_features, attention_mask=encoder_mask, output_router_logits=output_router_logits, **kwargs
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
        encoder_mask = encoder_outputs.get("attention_mask")  # set by the text, pose and patch front-ends only
        if encoder_mask is not None:
            kwargs["encoder_padding_mask"] = encoder_mask
        with routing_modality(self.decoder, encoder_outputs.get("modality")):
            decoder_outputs = self.decoder(
                input_ids=decoder_input_ids,
                attention_mask=decoder_attention_mask,
                encoder_hidden_states=encoder_outputs[0],
                cache=cache,
                inputs_embeds=decoder_inputs_embeds,
                position_ids=decoder_position_ids,
                use_cache=use_cache,
                output_router_logits=output_router_logits,
                **kwargs,
            )
        return WhisperMoEModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            encoder_router_logits=encoder_outputs.get("router_logits"),
            decoder_router_logits=decoder_outputs.get("router_logits"),
            encoder_attention_mask=encoder_mask,
            encoder_router_mask=encoder_outputs.get("router_mask"),
        )


class WhisperMoEForConditionalGeneration(
    HubSavingMixin, WhisperMoEGenerationMixin, WhisperMoEPreTrainedModel, WhisperForConditionalGeneration
):
    """WhisperMoE with Whisper's language-model head and all of Whisper's generation (languages, tasks, timestamps,
    prompts, long-form). Make one from a dense checkpoint with [`from_dense`](upcycling.py)."""

    def __init__(self, config: WhisperMoEConfig):
        WhisperMoEPreTrainedModel.__init__(self, config)
        self.model = WhisperMoEModel(config)
        self.proj_out = nn.Linear(config.d_model, config.vocab_size, bias=False)
        wavenet = config.wavenet_settings()
        self.wavenet_branch = WaveNetBranch(config.d_model, wavenet) if wavenet is not None else None
        self.max_target_positions = config.max_target_positions
        if config.quantization is not None:  # an int8 folder: build its int8 modules before loading fills them
            quantize_model(self)
        self.post_init()

    @classmethod
    def from_dense(
        cls,
        dense: "WhisperForConditionalGeneration | str | os.PathLike",
        seed: int = 0,
        text_frontend: bool = False,
        max_text_positions: int | None = None,
        **moe_options,
    ) -> "WhisperMoEForConditionalGeneration":
        """Upcycle a dense Whisper (a `WhisperForConditionalGeneration` or a folder / Hub id holding one).

        `moe_options` are WhisperMoEConfig fields (num_experts, num_experts_per_tok, encoder_sparse_layers, ...).
        Every expert is a copy of the dense feed-forward block and routers are drawn with `seed`, so the result's
        logits equal the source's; with `expert_segments=m` each copy is split into m narrower experts and
        num_experts / num_experts_per_tok are multiplied by m (see `upcycling.split_experts`). The source's
        generation config (languages, tasks, suppressed tokens, alignment heads) comes along. `text_frontend=True`
        adds a text front-end (see `add_text_frontend`).
        """
        return upcycle(cls, dense, seed, text_frontend, max_text_positions, **moe_options)

    def add_text_frontend(
        self, max_text_positions: int | None = None, text_encoder_layers: int | None = None
    ) -> "WhisperMoEForConditionalGeneration":
        """Give the encoder a text front-end (token embedding from the decoder's, positions from the encoder's) and
        set `config.text_frontend`; returns the model. See `upcycling.add_text_frontend`."""
        return add_text_frontend(self, max_text_positions, text_encoder_layers)

    def add_pose_frontend(self) -> "WhisperMoEForConditionalGeneration":
        """Give the encoder a pose front-end (sign-language keypoints, pose.py) and set `config.pose_frontend`."""
        return add_pose_frontend(self)

    def add_patch_frontend(self) -> "WhisperMoEForConditionalGeneration":
        """Give the encoder a patch front-end (RGB video tubelets, patches.py) and set `config.patch_frontend`."""
        return add_patch_frontend(self)

    def add_wavenet_branch(
        self, layers: int, channels: int, dilations: list[int] | None = None, kernel_size: int = 2, seed: int = 0
    ) -> "WhisperMoEForConditionalGeneration":
        """Give the decoder a WaveNet branch whose mixing weight starts at 0, outputs unchanged; in place. See
        wavenet.py."""
        return add_wavenet_branch(self, layers, channels, dilations, kernel_size, seed)

    def hub_model_card(self) -> str:
        return model_card(self)

    # Adapted from transformers.models.whisper.modeling_whisper (5.x)
    def forward(
        self,
        input_features: torch.Tensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: tuple | BaseModelOutput | None = None,
        cache=None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        pose_values: torch.Tensor | None = None,
        pixel_values: Video | None = None,
        wavenet_input_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> WhisperMoEOutput:
        """Whisper's forward plus router losses.

        labels: (batch, tgt_len) token ids with -100 on padding. With labels, `loss` is the token cross-entropy plus
        `aux_loss`. Under gradient accumulation the Trainer passes `num_items_in_batch`, the real label count of the
        whole accumulated batch: the cross-entropy is summed and divided by it, and the router losses are weighted by
        this micro-batch's share of it, so the update does not depend on how the batch was split.
        `attention_mask` (batch, 3000) marks real mel frames and keeps padding out of the encoder's router losses.
        With text input (`input_ids`, batch x text_len) it marks real tokens instead, with poses (`pose_values`, batch
        x frames x 27 x 4) or video (`pixel_values`, batch x frames x height x width x 3) real frames (the encoder
        returns its own mask of real tubelets for the router losses). `wavenet_input_ids` (batch, window): the tokens
        the WaveNet branch reads, ending at the last decoder token (generation passes them, wavenet.py);
        `decoder_input_ids` when unset.
        """
        if labels is not None:
            if labels.shape[1] > self.max_target_positions:
                raise ValueError(
                    f"labels have {labels.shape[1]} tokens, "
                    f"more than max_target_positions={self.max_target_positions}."
                )
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = shift_tokens_right(
                    labels, self.config.pad_token_id, self.config.decoder_start_token_id
                )
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits or labels is not None
        outputs = self.model(
            input_features,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            decoder_inputs_embeds=decoder_inputs_embeds,
            decoder_position_ids=decoder_position_ids,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            input_ids=input_ids,
            pose_values=pose_values,
            pixel_values=pixel_values,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if self.wavenet_branch is not None:
            tokens = self._wavenet_inputs(wavenet_input_ids, decoder_input_ids, decoder_inputs_embeds)
            hidden = self.wavenet_branch.mix(hidden, tokens)
        logits = self.proj_out(hidden)
        encoder_mask, decoder_mask = self._router_masks(outputs, attention_mask, decoder_attention_mask, labels)
        losses = router_losses(
            outputs.encoder_router_logits, outputs.decoder_router_logits, encoder_mask, decoder_mask, self.config
        )
        loss = None
        if labels is not None:
            loss = self._cross_entropy(logits, labels, num_items_in_batch)
            if losses["aux_loss"] is not None and num_items_in_batch is not None:
                # each micro-batch adds its router losses weighted by its share of the accumulated batch's labels,
                # so the accumulated sum is a weighted mean at the scale of one full-batch step
                share = (labels != IGNORE_INDEX).sum().to(logits.device) / num_items_in_batch
                losses["aux_loss"] = losses["aux_loss"] * share
            if losses["aux_loss"] is not None:
                loss = loss + losses["aux_loss"].to(loss.device)
        return WhisperMoEOutput(loss=loss, logits=logits, **_shared_fields(outputs, WhisperMoEOutput), **losses)

    def _wavenet_inputs(
        self,
        wavenet_input_ids: torch.LongTensor | None,
        decoder_input_ids: torch.LongTensor | None,
        decoder_inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """(batch, window, d_model): the decoder's embeddings of the tokens the WaveNet branch reads."""
        ids = wavenet_input_ids if wavenet_input_ids is not None else decoder_input_ids
        if ids is None:
            return decoder_inputs_embeds
        decoder = self.model.decoder
        return decoder.embed_tokens(ids) * decoder.embed_scale

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args, **kwargs) -> dict:
        """Whisper's, plus the WaveNet branch's window of the generated tokens (`input_ids`, batch x length) when
        there is a branch: with a cache the decoder reads only the new tokens, the branch its receptive field."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if self.wavenet_branch is not None:
            inputs["wavenet_input_ids"] = self.wavenet_branch.window(input_ids, inputs["decoder_input_ids"].shape[1])
        return inputs

    def _cross_entropy(
        self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None
    ) -> torch.Tensor:
        labels = labels.to(logits.device)
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
        if num_items_in_batch is None:
            return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
        summed = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(summed.device)
        return summed / num_items_in_batch

    def _router_masks(
        self,
        outputs: WhisperMoEModelOutput,
        attention_mask: torch.Tensor | None,
        decoder_attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The real tokens each side's routers saw: (encoder mask, decoder mask), None where all were real."""
        encoder_mask = attention_mask[:, ::ENCODER_DOWNSAMPLING] if attention_mask is not None else None
        if outputs.encoder_attention_mask is not None:  # text, poses, video: the mask covers encoder positions
            encoder_mask = outputs.encoder_attention_mask
        if outputs.encoder_router_mask is not None:  # variable-length audio, packed poses: the tokens routed
            encoder_mask = outputs.encoder_router_mask[None]
        if decoder_attention_mask is None and labels is not None:
            decoder_attention_mask = labels != IGNORE_INDEX
        return encoder_mask, decoder_attention_mask


__all__ = [
    "WhisperMoEPreTrainedModel",
    "WhisperMoEModel",
    "WhisperMoEForConditionalGeneration",
    "WhisperMoEEncoderOutput",
    "load_balancing_loss",
    "router_losses",
    "router_z_loss",
    # re-exported for older imports; their home is generation_whisper_moe.py
    "language_token_id",
    "text_decoder_prompt",
]
