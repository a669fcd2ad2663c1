"""Sparse upcycling: turn a dense Whisper state dict into a WhisperMoE one that computes the same function.

Every routed expert starts as a copy of the dense feed-forward block. With renormalised top-k weights the weighted
sum of k identical experts is the dense block itself, so the upcycled model reproduces its source at step 0 and
training only has to make the experts diverge. Shared experts, when configured, take half of the dense output and
the routed experts the other half, so the sum is still exact.
"""

import torch
from transformers import WhisperConfig

from .configuration_whisper_moe import WhisperMoEConfig

# Keys of a dense config that describe where it came from rather than what it is.
_PROVENANCE_KEYS = ("model_type", "architectures", "auto_map", "_name_or_path", "transformers_version", "dtype")
SIDES = ("encoder", "decoder")


def moe_config_from_dense(dense_config: WhisperConfig, **moe_options) -> WhisperMoEConfig:
    """A WhisperMoEConfig with every dense field of `dense_config` and the given MoE fields (see WhisperMoEConfig)."""
    fields = {k: v for k, v in dense_config.to_dict().items() if k not in _PROVENANCE_KEYS}
    unknown = set(moe_options) - set(WhisperMoEConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"Unknown WhisperMoE options {sorted(unknown)}; see WhisperMoEConfig for the accepted ones.")
    return WhisperMoEConfig(**{**fields, **moe_options})


def _expert_weights(fc1_w, fc1_b, fc2_w, fc2_b, config: WhisperMoEConfig, output_share: float) -> dict:
    """Stacked copies of one dense block for `num_experts` experts; fc2 is scaled by `output_share`."""
    num = config.num_experts
    return {
        "experts.fc1_weight": fc1_w.unsqueeze(0).repeat(num, 1, 1),
        "experts.fc1_bias": fc1_b.unsqueeze(0).repeat(num, 1),
        "experts.fc2_weight": (fc2_w * output_share).unsqueeze(0).repeat(num, 1, 1),
        "experts.fc2_bias": (fc2_b * output_share).unsqueeze(0).repeat(num, 1),
    }


def _shared_weights(fc1_w, fc1_b, fc2_w, fc2_b, config: WhisperMoEConfig, output_share: float) -> dict:
    """`num_shared_experts` copies of the dense block fused side by side; together they output `output_share` of it."""
    copies = config.num_shared_experts
    return {
        "shared_experts.fc1.weight": fc1_w.repeat(copies, 1),
        "shared_experts.fc1.bias": fc1_b.repeat(copies),
        "shared_experts.fc2.weight": fc2_w.repeat(1, copies) * (output_share / copies),
        "shared_experts.fc2.bias": fc2_b * output_share,
    }


def _upcycle_block(dense: dict, prefix: str, config: WhisperMoEConfig, generator: torch.Generator) -> dict:
    """The sparse block replacing the dense fc1/fc2 under `prefix` (e.g. 'model.encoder.layers.0.')."""
    fc1_w, fc1_b = dense[f"{prefix}fc1.weight"], dense[f"{prefix}fc1.bias"]
    fc2_w, fc2_b = dense[f"{prefix}fc2.weight"], dense[f"{prefix}fc2.bias"]
    routed_share = 0.5 if config.num_shared_experts > 0 else 1.0
    block = _expert_weights(fc1_w, fc1_b, fc2_w, fc2_b, config, routed_share)
    if config.num_shared_experts > 0:
        block.update(_shared_weights(fc1_w, fc1_b, fc2_w, fc2_b, config, 1.0 - routed_share))
    router = torch.randn(config.num_experts, config.d_model, generator=generator) * config.init_std
    block["router.weight"] = router.to(fc1_w.dtype)
    return {f"{prefix}mlp.{name}": tensor for name, tensor in block.items()}


def upcycle_state_dict(dense: dict[str, torch.Tensor], config: WhisperMoEConfig, seed: int = 0) -> dict:
    """Map a `WhisperForConditionalGeneration` state dict onto `WhisperMoEForConditionalGeneration`'s keys.

    Sparse layers get experts copied from their dense block and a freshly drawn router (std `init_std`, seeded);
    dense layers move `fc1`/`fc2` under `mlp.`; everything else is copied unchanged.
    """
    generator = torch.Generator().manual_seed(seed)
    upcycled = {}
    for key, tensor in dense.items():
        if ".fc1." not in key and ".fc2." not in key:
            upcycled[key] = tensor
    for side in SIDES:
        for idx in range(getattr(config, f"{side}_layers")):
            prefix = f"model.{side}.layers.{idx}."
            if f"{prefix}fc1.weight" not in dense:
                raise KeyError(f"The dense state dict has no {prefix}fc1.weight: is it a Whisper checkpoint?")
            if config.is_sparse_layer(side, idx):
                upcycled.update(_upcycle_block(dense, prefix, config, generator))
            else:
                for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                    upcycled[f"{prefix}mlp.{name}"] = dense[f"{prefix}{name}"]
    return upcycled
