"""Which routed tokens are real, and router statistics over those only.

Padding must not count: a 0.5 s clip in a 30 s window is 97 % silence frames, so unmasked expert loads and router
entropies would describe the padding, not the speech.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from modeling_whisper_moe.configuration_whisper_moe import WhisperMoEConfig
from modeling_whisper_moe.modeling_whisper_moe import ENCODER_DOWNSAMPLING, IGNORE_INDEX, expert_shares, token_weights
from modeling_whisper_moe.packing import plan_clip_packing, plan_packing
from modeling_whisper_moe.patches import tubelet_mask

ENTROPY_EPSILON = 1e-9  # keeps log(0) out of the entropy of a one-hot router


def router_token_masks(
    config: WhisperMoEConfig, batch: Mapping[str, torch.Tensor], training: bool = False
) -> dict[str, torch.Tensor | None]:
    """Bool masks of the real tokens each side's routers see for `batch` (the model's inputs), laid out as the
    router logits' rows: {"encoder": mask or None, "decoder": mask or None}, None where every token is real.

    Encoder: text tokens or pose frames of `attention_mask` (text or pose input; the frames as the encoder packs them
    when `pack_pose`); the video tubelets the patch front-end gives `pixel_values` (after its token dropping when
    `training`); for audio one position per two mel frames of `attention_mask` in a 30 s window, or, with
    `variable_length_audio`, the clips' real positions as the encoder lays them out (packed when `pack_audio`).
    Decoder: positions whose label is not IGNORE_INDEX.
    """
    labels, attention_mask = batch.get("labels"), batch.get("attention_mask")
    decoder = labels.ne(IGNORE_INDEX) if labels is not None and batch.get("decoder_input_ids") is None else None
    if batch.get("pixel_values") is not None:
        encoder = tubelet_mask(config, batch["pixel_values"], attention_mask, training)
    elif attention_mask is None:
        encoder = None
    elif batch.get("pose_values") is not None and config.pack_pose:  # frames laid out as the encoder packs them
        encoder = plan_clip_packing(attention_mask).real
    elif batch.get("input_ids") is not None or batch.get("pose_values") is not None:  # one position per token/frame
        encoder = attention_mask.bool()
    elif config.variable_length_audio:
        encoder = _variable_length_positions(config, attention_mask)
    else:
        encoder = attention_mask[:, ::ENCODER_DOWNSAMPLING].bool()
    return {"encoder": encoder, "decoder": decoder}


def _variable_length_positions(config: WhisperMoEConfig, attention_mask: torch.Tensor) -> torch.Tensor:
    """(rows, row_len) real encoder positions of clips encoded without 30 s padding (see forward_variable_length)."""
    frames = attention_mask.sum(-1)
    lengths = (frames + ENCODER_DOWNSAMPLING - 1) // ENCODER_DOWNSAMPLING  # conv2 halves each clip, rounding up
    seq_len = int(lengths.max())
    if config.pack_audio:
        return plan_packing(lengths, seq_len, config.max_source_positions).real
    return torch.arange(seq_len, device=lengths.device)[None] < lengths[:, None]


def router_statistics(
    router_logits: tuple[torch.Tensor, ...], top_k: int, mask: torch.Tensor | None = None
) -> list[dict[str, float]]:
    """Per sparse layer: how evenly tokens spread over experts, and how sure the router is.

    router_logits holds one (tokens, num_experts) tensor per layer; mask is (tokens,) or of any shape with that many
    elements, 1 = real. `max_load` is the busiest expert's share of routing slots times num_experts (1.0 =
    perfectly even); `entropy` is the mean router entropy divided by log(num_experts) (1.0 = uniform, 0.0 = one-hot).
    """
    stats = []
    for logits in router_logits:
        logits = logits.detach().float()
        weights = token_weights(1, logits.shape[0], mask, logits.device)
        num_experts = logits.shape[-1]
        load, _ = expert_shares(logits, top_k, weights)
        probs = logits.softmax(dim=-1)
        entropy = -(probs * probs.clamp(min=ENTROPY_EPSILON).log()).sum(-1)
        mean_entropy = (entropy * weights).sum() / weights.sum().clamp(min=1.0)
        stats.append(
            {"max_load": (load.max() * num_experts).item(), "entropy": (mean_entropy / math.log(num_experts)).item()}
        )
    return stats
