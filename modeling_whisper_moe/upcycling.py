"""Sparse upcycling: turn a dense Whisper state dict into a WhisperMoE one that computes the same function.

Every routed expert starts as a copy of the dense feed-forward block. With renormalised top-k weights the weighted
sum of k identical experts is the dense block itself, so the upcycled model reproduces its source at step 0 and
training only has to make the experts diverge. Shared experts, when configured, take half of the dense output and
the routed experts the other half, so the sum is still exact. Fine-grained experts (`expert_segments`, DeepSeek-MoE)
split each copy into narrower experts that still add up to it (see `split_experts`).

Also here: the text front-end surgery, which gives a trained model's encoder a token embedding made from the
decoder's.
"""

import copy
import os
import warnings
from typing import TypeVar

import torch
from torch import nn
from transformers import WhisperConfig, WhisperForConditionalGeneration

from .configuration_whisper_moe import ROTARY_TYPES, WhisperMoEConfig
from .echo import inexact_elements, load_with_new_echo_modules

Model = TypeVar("Model", bound=nn.Module)

# Keys of a dense config that describe where it came from rather than what it is.
_PROVENANCE_KEYS = ("model_type", "architectures", "auto_map", "_name_or_path", "transformers_version", "dtype")
SIDES = ("encoder", "decoder")


def moe_config_from_dense(dense_config: WhisperConfig, **moe_options) -> WhisperMoEConfig:
    """A WhisperMoEConfig with every dense field of `dense_config` and the given MoE fields (see WhisperMoEConfig),
    whose expert counts are coarse ones that `expert_segments` splits (see `segmented_options`)."""
    fields = {k: v for k, v in dense_config.to_dict().items() if k not in _PROVENANCE_KEYS}
    unknown = set(moe_options) - set(WhisperMoEConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"Unknown WhisperMoE options {sorted(unknown)}; see WhisperMoEConfig for the accepted ones.")
    return WhisperMoEConfig(**{**fields, **segmented_options(moe_options)})


def segmented_options(options: dict) -> dict:
    """MoE options whose `num_experts` / `num_experts_per_tok` count coarse experts (each the dense block's width),
    as WhisperMoEConfig fields, which count the experts `expert_segments` cuts them into.

    With m segments, E experts top-k become E * m experts top-(k * m), each 1/m as wide: the same parameters and
    the same active parameters per token. Unset counts are the config's defaults.
    """
    segments = options.get("expert_segments", 1)
    if not isinstance(segments, int) or segments < 1:
        raise ValueError(f"expert_segments must be an integer of at least 1, got {segments!r}.")
    if segments == 1:
        return dict(options)
    counts = {
        name: options.get(name, WhisperMoEConfig.__dataclass_fields__[name].default) * segments
        for name in ("num_experts", "num_experts_per_tok")
    }
    return {**options, **counts}


def _expert_weights(fc1_w, fc1_b, fc2_w, fc2_b, num: int, output_share: float) -> dict:
    """Stacked copies of one dense block for `num` experts; fc2 is scaled by `output_share`."""
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


def split_experts(block: dict[str, torch.Tensor], segments: int) -> dict[str, torch.Tensor]:
    """One sparse block's tensors (keys `experts.*`, `router.weight`, ...) with each routed expert split into
    `segments` experts of 1/segments its hidden width, computing the same block; other tensors pass through.

    Expert e becomes experts e*m .. e*m + m-1 (m = segments), holding consecutive slices of its hidden units. They
    get copies of e's router row, so their logits tie: the softmax gives each p_e / m and top-(k*m) picks the m
    segments of each top-k expert together, each weighted w_e / m (w_e: e's coarse weight, with or without
    norm_topk_prob). Scaling fc2 by m makes the weighted segments sum to w_e * fc2(h) over the full width; each
    keeps e's whole fc2 bias, which m weights of w_e / m add up to w_e * bias. Exact for a block that never grew.
    """
    if "router.null_logits" in block:
        raise ValueError("split_experts needs a block without grown expert groups (it has router.null_logits).")
    if segments == 1:
        return dict(block)
    fc1_weight, fc2_weight = block["experts.fc1_weight"], block["experts.fc2_weight"]
    num, ffn_dim, d_model = fc1_weight.shape  # fc2_weight: (num, d_model, ffn_dim)
    if segments < 1 or ffn_dim % segments:
        raise ValueError(f"expert_segments must be at least 1 and divide the expert width {ffn_dim}, got {segments}.")
    width, fine = ffn_dim // segments, num * segments
    fc2_columns = (fc2_weight * segments).reshape(num, d_model, segments, width).transpose(1, 2)
    split = {
        "experts.fc1_weight": fc1_weight.reshape(fine, width, d_model),
        "experts.fc1_bias": block["experts.fc1_bias"].reshape(fine, width),
        "experts.fc2_weight": fc2_columns.reshape(fine, d_model, width),
        "experts.fc2_bias": block["experts.fc2_bias"].repeat_interleave(segments, dim=0),
        "router.weight": block["router.weight"].repeat_interleave(segments, dim=0),
    }
    return {**block, **split}


def _upcycle_block(dense: dict, prefix: str, config: WhisperMoEConfig, generator: torch.Generator) -> dict:
    """The sparse block replacing the dense fc1/fc2 under `prefix` (e.g. 'model.encoder.layers.0.')."""
    fc1_w, fc1_b = dense[f"{prefix}fc1.weight"], dense[f"{prefix}fc1.bias"]
    fc2_w, fc2_b = dense[f"{prefix}fc2.weight"], dense[f"{prefix}fc2.bias"]
    routed_share = 0.5 if config.num_shared_experts > 0 else 1.0
    if config.num_experts % config.expert_segments:
        raise ValueError(
            f"num_experts={config.num_experts} must be a multiple of expert_segments={config.expert_segments} "
            "(each coarse expert is split into that many)."
        )
    coarse = config.num_experts // config.expert_segments
    block = _expert_weights(fc1_w, fc1_b, fc2_w, fc2_b, coarse, routed_share)
    router = torch.randn(coarse, config.d_model, generator=generator) * config.init_std
    block["router.weight"] = router.to(fc1_w.dtype)
    block = split_experts(block, config.expert_segments)
    if config.num_shared_experts > 0:
        block.update(_shared_weights(fc1_w, fc1_b, fc2_w, fc2_b, config, 1.0 - routed_share))
    return {f"{prefix}mlp.{name}": tensor for name, tensor in block.items()}


def upcycle_state_dict(dense: dict[str, torch.Tensor], config: WhisperMoEConfig, seed: int = 0) -> dict:
    """Map a `WhisperForConditionalGeneration` state dict onto `WhisperMoEForConditionalGeneration`'s keys.

    Sparse layers get experts copied from their dense block (split into `expert_segments` each) and a freshly drawn
    router (std `init_std`, seeded; one row per coarse expert, shared by its segments);
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


def upcycle(
    model_class: type[Model],
    dense: WhisperForConditionalGeneration | str | os.PathLike,
    seed: int = 0,
    text_frontend: bool = False,
    max_text_positions: int | None = None,
    **moe_options,
) -> Model:
    """Upcycle a dense Whisper (a `WhisperForConditionalGeneration` or a folder / Hub id holding one) into a
    `model_class` (a WhisperMoE encoder-decoder head); see `WhisperMoEForConditionalGeneration.from_dense`."""
    if not isinstance(dense, WhisperForConditionalGeneration):
        dense = WhisperForConditionalGeneration.from_pretrained(dense)
    source = str(dense.config._name_or_path or "") or None
    config = moe_config_from_dense(dense.config, upcycled_from=source, **moe_options)
    if not config.norm_topk_prob and config.num_experts_per_tok > 1:
        raise ValueError(
            "from_dense needs norm_topk_prob=True: without renormalised top-k weights the upcycled experts "
            "would not sum to the dense block."
        )
    inexact = inexact_elements(config)
    if inexact:
        warnings.warn(
            f"from_dense: {', '.join(inexact)} change what the dense model computes (see WhisperMoEConfig's Echo "
            "section): the upcycled model is not its source until fine-tuned.",
            stacklevel=3,
        )
    state = upcycle_state_dict(dense.state_dict(), config, seed=seed)
    with torch.device("meta"):
        model = model_class(config)
    load_with_new_echo_modules(model, state, seed)  # strict, but new Echo modules start from their initialisation
    model.tie_weights()
    model.generation_config = copy.deepcopy(dense.generation_config)
    if text_frontend:
        add_text_frontend(model, max_text_positions)
    return model.to(dense.dtype).train(dense.training)


def add_text_frontend(
    model: Model, max_text_positions: int | None = None, text_encoder_layers: int | None = None
) -> Model:
    """Give `model`'s encoder (`model.model.encoder`) a text front-end and set `config.text_frontend`; returns it.

    The token embedding starts as a copy of the decoder's (Whisper's tokenizer serves both sides, so the encoder
    reads the same ids with embeddings that already mean something), rescaled to the size of the encoder's own
    positions; the positions start as the encoder's sinusoids, which its layers already read. Unscaled, the
    decoder's embeddings are ~30x smaller than what the audio front-end feeds the layers, and the pretrained
    layers wash the token identities out. `text_encoder_layers`: see the config field.
    """
    config = model.config
    if config.text_frontend:
        raise ValueError("This model already has a text front-end (config.text_frontend=True).")
    if config.echo_setting("position_embedding_type", "encoder") in ROTARY_TYPES:
        raise ValueError(
            "add_text_frontend starts the text positions from the encoder's absolute ones, which a rotary encoder "
            f"(position_embedding_type={config.position_embedding_type!r}) does not have."
        )
    max_text_positions = max_text_positions or config.max_text_positions
    decoder, encoder = model.model.decoder, model.model.encoder
    if not 1 <= max_text_positions <= encoder.embed_positions.num_embeddings:
        raise ValueError(
            f"max_text_positions must be between 1 and the encoder's {encoder.embed_positions.num_embeddings} "
            f"positions it is copied from, got {max_text_positions}."
        )
    config.check_text_encoder_layers(text_encoder_layers)
    config.text_frontend, config.max_text_positions = True, max_text_positions
    config.text_encoder_layers = text_encoder_layers
    positions = encoder.embed_positions(torch.arange(max_text_positions)).detach().clone()
    tokens = decoder.embed_tokens.weight.detach().clone()
    tokens *= positions.pow(2).mean().sqrt() / tokens.pow(2).mean().sqrt()
    encoder.embed_text_tokens = nn.Embedding.from_pretrained(tokens, freeze=False, padding_idx=encoder.padding_idx)
    encoder.embed_text_positions = nn.Embedding.from_pretrained(positions, freeze=False)
    return model
