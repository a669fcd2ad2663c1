"""Lifelong learning by adding experts: grow a (trained) WhisperMoE with new experts per layer, exactly.

A growth phase appends `num_experts` experts to each chosen layer's stacked experts and as many rows to its router,
recorded in `config.expert_growth`. They form a group of their own: every token keeps its top-k of the old experts,
routed exactly as before, and gets the phase's top-k as well, weighted by their softmax probabilities against a
learned null logit (see `WhisperMoERouter`). The new experts start with a zero output projection, so the grown model
computes what its source computed, bit for bit, until it is trained; their input projection starts as a copy of
an old expert's (`init="copy"`) or random (`init="random"`). A dense layer that grows becomes sparse: its block is
the single expert of the base group. In a model with fine-grained experts (`expert_segments` > 1) new experts have
the old ones' narrow width, and only sparse layers can grow.

A phase may instead (or also) give each chosen layer a PEER block beside its feed-forward block (`grow_peer`, the
phase's "peer" entry): many single-neuron experts retrieved by product keys (peer.py), whose zero up vectors make
that growth exact as well.

The previous model is the grown one with its newest phase switched off (`previous_model`: its expert groups stop
routing and its PEER blocks are skipped), as long as the old parameters stay frozen: distillation against it needs
no second copy of the model.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers.utils.output_capturing import install_output_capuring_hook

from .configuration_whisper_moe import GROWTH_MODALITIES_KEY, GROWTH_PEER_KEY, PEER_DEFAULTS, WhisperMoEConfig
from .modeling_whisper_moe import WhisperMoEMLP, WhisperMoERouter, WhisperMoESparseBlock
from .peer import PEER

GROWTH_INITS = ("copy", "random")
ROUTER_LOGITS = "router_logits"  # the output the encoder and decoder record from every router
SIDES = ("encoder", "decoder")


def grow_experts(
    model: nn.Module,
    num_new: int,
    num_experts_per_tok: int = 1,
    encoder_layers: Sequence[int] | None = None,
    decoder_layers: Sequence[int] | None = None,
    init: str = "copy",
    seed: int = 0,
    peer: dict | None = None,
    modalities: Sequence[str] | None = None,
) -> nn.Module:
    """Append `num_new` experts, routed top-`num_experts_per_tok` among themselves, to the chosen layers; in place.

    `encoder_layers` / `decoder_layers`: layer indices to grow; `None` grows every layer that is sparse already on
    that side, `[]` none. Naming a dense layer makes it sparse. `peer` (a "peer" entry of
    `WhisperMoEConfig.expert_growth`) also gives each of those layers a PEER block, in the same phase; with it
    `num_new` may be 0 (a PEER-only phase, `grow_peer`). `modalities` (e.g. ["text"]) restricts the phase to inputs
    of those modalities: for the others the model stays what it was, whatever the phase learns. Returns `model`,
    whose outputs are unchanged.
    """
    config: WhisperMoEConfig = model.config
    if config.quantization is not None:
        raise ValueError("grow_experts needs a float model; grow the float folder, then quantize it.")
    if init not in GROWTH_INITS:
        raise ValueError(f"init must be one of {GROWTH_INITS}, got {init!r}.")
    if num_new == 0 and peer is None:
        raise ValueError("grow_experts was given num_new=0 and no PEER block: nothing to grow.")
    chosen = {
        side: sorted(layers if layers is not None else _sparse_layers(config, side))
        for side, layers in (("encoder", encoder_layers), ("decoder", decoder_layers))
    }
    phase = {
        "num_experts": num_new,
        "num_experts_per_tok": num_experts_per_tok if num_new else 0,
        "encoder_layers": chosen["encoder"],
        "decoder_layers": chosen["decoder"],
    }
    if peer is not None:
        phase[GROWTH_PEER_KEY] = dict(peer)
    if modalities is not None:
        phase[GROWTH_MODALITIES_KEY] = list(modalities)
    if not phase["encoder_layers"] and not phase["decoder_layers"]:
        raise ValueError("grow_experts was given no layer to grow (the model has no sparse layer; name some).")
    previous, config.expert_growth = config.expert_growth, [*(config.expert_growth or []), phase]
    try:
        config.check_growth()
    except ValueError:
        config.expert_growth = previous  # an impossible phase leaves the model as it was
        raise
    generator = torch.Generator().manual_seed(seed)
    for side in SIDES:
        layers, ffn_dim = _stack(model, side).layers, getattr(config, f"{side}_ffn_dim")
        for idx in chosen[side]:
            if num_new:
                groups, phases = config.expert_groups(side, idx), config.growth_phases(side, idx)
                layers[idx].mlp = _grown_block(layers[idx].mlp, config, ffn_dim, groups, phases, init, generator)
            if peer is not None:
                layers[idx].peers.append(_grown_peer(layers[idx].mlp, config, peer, generator))
        if num_new and getattr(_stack(model, side), "_output_capturing_hooks_installed", False):
            # a model that already ran has its router-logit hooks on the old routers only (transformers installs
            # them once): without these the grown layers' logits would be missing and the router losses misaligned
            for idx in chosen[side]:
                install_output_capuring_hook(layers[idx].mlp.router, ROUTER_LOGITS, index=0)
    return model


def grow_peer(
    model: nn.Module,
    encoder_layers: Sequence[int] | None = None,
    decoder_layers: Sequence[int] | None = None,
    seed: int = 0,
    **sizes: int,
) -> nn.Module:
    """A growth phase that gives each chosen layer (as in `grow_experts`) a PEER block of `num_keys`**2 experts,
    `num_heads` x top-`num_experts_per_head` per token with queries `key_dim` wide (peer.py), and no new routed
    experts; in place. `sizes` override `PEER_DEFAULTS` (configuration_whisper_moe.py). Returns `model`, whose outputs
    are unchanged."""
    spec = {**PEER_DEFAULTS, **sizes}
    WhisperMoEConfig.check_peer(spec)  # before anything changes, naming any unknown size
    return grow_experts(model, 0, 0, encoder_layers, decoder_layers, seed=seed, peer=spec)


def _sparse_layers(config: WhisperMoEConfig, side: str) -> list[int]:
    return [idx for idx in range(getattr(config, f"{side}_layers")) if config.expert_groups(side, idx)]


def _stack(model: nn.Module, side: str) -> nn.Module:
    """The encoder or decoder module of any WhisperMoE head."""
    return model.get_encoder() if side == "encoder" else model.get_decoder()


@torch.no_grad()
def _grown_block(
    old: nn.Module,
    config: WhisperMoEConfig,
    ffn_dim: int,
    groups: list[tuple[int, int]],
    phases: list[int],
    init: str,
    generator: torch.Generator,
) -> WhisperMoESparseBlock:
    """A sparse block with `groups` whose old experts, router rows and null logits are `old`'s (a sparse block, or a
    dense one that becomes the single base expert) and whose newest group starts with zero output. `ffn_dim`: the
    layer's dense width (new experts get the old ones' width, a segment of it with `expert_segments`)."""
    if isinstance(old, WhisperMoEMLP):
        old = _as_single_expert(old, config)
    reference = old.experts.fc1_weight
    block = WhisperMoESparseBlock(config, ffn_dim, groups, phases).to(reference.device, reference.dtype)
    block.train(old.training)
    num_old, num_new = old.router.num_experts, groups[-1][0]
    for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
        getattr(block.experts, name)[:num_old] = getattr(old.experts, name)
    source = torch.arange(num_new) % num_old
    if init == "copy":  # each new expert reads the hidden features of an old one, round robin
        block.experts.fc1_weight[num_old:] = old.experts.fc1_weight[source]
        block.experts.fc1_bias[num_old:] = old.experts.fc1_bias[source]
    else:
        std = config.init_std
        noise = torch.randn(block.experts.fc1_weight[num_old:].shape, generator=generator) * std
        block.experts.fc1_weight[num_old:] = noise.to(reference.dtype)
        block.experts.fc1_bias[num_old:] = 0.0
    block.experts.fc2_weight[num_old:] = 0.0  # zero output: the grown model computes what its source did
    block.experts.fc2_bias[num_old:] = 0.0
    block.router.weight[:num_old] = old.router.weight
    rows = torch.randn(num_new, config.d_model, generator=generator) * config.init_std
    block.router.weight[num_old:] = rows.to(reference.dtype)  # small, random: ties would send every token to one
    if hasattr(old.router, "null_logits"):  # the new group's null logit starts at 0 (the router's own init)
        block.router.null_logits[: old.router.null_logits.numel()] = old.router.null_logits
    if old.shared_experts is not None:
        block.shared_experts.load_state_dict(old.shared_experts.state_dict())
    elif block.shared_experts is not None:  # a dense layer made sparse in a model with shared experts: silent ones
        block.shared_experts.fc2.weight.zero_()
        block.shared_experts.fc2.bias.zero_()
    return block


def _grown_peer(mlp: nn.Module, config: WhisperMoEConfig, spec: dict, generator: torch.Generator) -> PEER:
    """A PEER block of the newest phase, on `mlp`'s device and dtype, in its train/eval mode, adding 0 for now."""
    reference = next(mlp.parameters())
    peer = PEER(config, spec, phase=len(config.expert_growth) - 1)
    peer.init_weights(config.init_std, generator)  # on the CPU: the generator's draws do not depend on the device
    peer.train(mlp.training)
    return peer.to(reference.device, reference.dtype)


def _as_single_expert(dense: WhisperMoEMLP, config: WhisperMoEConfig) -> WhisperMoESparseBlock:
    """A dense feed-forward block as a sparse block of one expert (the softmax over one logit is 1: exact)."""
    block = WhisperMoESparseBlock(config, dense.fc1.out_features, [(1, 1)]).to(dense.fc1.weight.device)
    block.train(dense.training)
    block.experts.fc1_weight.copy_(dense.fc1.weight[None])
    block.experts.fc1_bias.copy_(dense.fc1.bias[None])
    block.experts.fc2_weight.copy_(dense.fc2.weight[None])
    block.experts.fc2_bias.copy_(dense.fc2.bias[None])
    block.router.weight.zero_()
    block.shared_experts = None
    return block


@contextmanager
def previous_model(model: nn.Module, phase: int | None = None) -> Iterator[nn.Module]:
    """Within the block, `model` routes as it did before growth phase `phase` (default: the newest). With the
    parameters older than that phase frozen, this is the previous model exactly: the teacher for distillation."""
    num_phases = len(model.config.expert_growth or [])
    if num_phases == 0:
        raise ValueError("previous_model needs a model that grew experts or PEER (config.expert_growth is empty).")
    phase = num_phases - 1 if phase is None else phase
    routers = [module for module in model.modules() if isinstance(module, WhisperMoERouter)]
    peers = [module for module in model.modules() if isinstance(module, PEER)]
    saved = [router.routed_phases for router in routers], [peer.enabled for peer in peers]
    try:
        for router in routers:
            router.routed_phases = phase
        for peer in peers:
            peer.enabled = peer.enabled and peer.phase < phase
        yield model
    finally:
        for router, state in zip(routers, saved[0]):
            router.routed_phases = state
        for peer, state in zip(peers, saved[1]):
            peer.enabled = state
