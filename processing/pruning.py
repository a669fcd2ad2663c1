"""Expert pruning: measure how often each expert is chosen on real data, keep the busiest ones.

Each sparse layer keeps its own `keep` most-used experts (their stacked weights and router rows are sliced), so the
pruned model has `num_experts = keep` everywhere and routes among the survivors exactly as before, minus the others.
"""

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from modeling_whisper_moe.audio import SAMPLING_RATE, load_audio
from modeling_whisper_moe.modeling_whisper_moe import (
    WhisperMoEForConditionalGeneration,
    WhisperMoERouter,
    WhisperMoESparseBlock,
)
from processing.data import read_manifest
from processing.routing import router_token_masks


@torch.no_grad()
def routing_counts(
    model: WhisperMoEForConditionalGeneration, batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Routing slots given to each expert, per sparse block: {block name: (num_experts,) counts}.

    `batches` yields model inputs (`input_features` or text `input_ids`, with `labels` or `decoder_input_ids`); each
    is run once. Only real tokens count (see `router_token_masks`): decoder positions whose label is not -100, text
    positions and mel frames that `attention_mask` marks real (a 30 s window's padding is left out).
    """
    counts: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor | None] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, WhisperMoERouter):
            block = name.removesuffix("router").rstrip(".")
            side = "decoder" if ".decoder." in f".{block}." else "encoder"
            counts[block] = torch.zeros(module.num_experts, dtype=torch.long)

            def record(_module, _inputs, outputs, block=block, side=side):
                chosen = outputs[2].reshape(-1, outputs[2].shape[-1]).cpu()  # (tokens, top_k)
                if masks[side] is not None:
                    chosen = chosen[masks[side].reshape(-1).cpu()]
                counts[block] += torch.bincount(chosen.reshape(-1), minlength=counts[block].numel())

            handles.append(module.register_forward_hook(record))
    try:
        model.eval()
        for batch in batches:
            masks.update(router_token_masks(model.config, batch))
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def manifest_batches(
    manifest: Path, processor, limit: int, batch_size: int, split: str | None, real_frames_only: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Model inputs (features and teacher-forced labels) for the first `limit` rows of a path,text CSV (of `split`
    when given). `real_frames_only` adds the feature extractor's `attention_mask`, so that `routing_counts` leaves
    the 30 s window's padding out of the encoder's counts."""
    manifest_rows = read_manifest(manifest, split=split)
    rows = manifest_rows.select(range(min(limit, len(manifest_rows))))
    for start in range(0, len(rows), batch_size):
        chunk = rows.select(range(start, min(start + batch_size, len(rows))))
        audio = [load_audio(path, SAMPLING_RATE) for path in chunk["audio"]]
        features = processor.feature_extractor(
            audio, sampling_rate=SAMPLING_RATE, return_attention_mask=real_frames_only, return_tensors="pt"
        )
        # without <|startoftranscript|>: the model prepends it when it shifts the labels right
        ids = [processor.tokenizer(" " + text).input_ids[1:] for text in chunk["text"]]
        labels = torch.full((len(ids), max(map(len, ids))), -100)
        for row, row_ids in enumerate(ids):
            labels[row, : len(row_ids)] = torch.tensor(row_ids)
        batch = {"input_features": features.input_features, "labels": labels}
        yield batch | ({"attention_mask": features.attention_mask} if real_frames_only else {})


def check_keep(config, keep: int) -> None:
    """Raise ValueError unless `keep` experts can still serve top-`num_experts_per_tok` routing."""
    if not config.num_experts_per_tok <= keep <= config.num_experts:
        raise ValueError(
            f"keep must be between num_experts_per_tok={config.num_experts_per_tok} and "
            f"num_experts={config.num_experts}, got {keep}."
        )


def prune_experts(
    model: WhisperMoEForConditionalGeneration, counts: dict[str, torch.Tensor], keep: int
) -> WhisperMoEForConditionalGeneration:
    """Keep the `keep` most-used experts of every sparse block (in place); returns the model."""
    config = model.config
    check_keep(config, keep)
    for name, module in model.named_modules():
        if isinstance(module, WhisperMoESparseBlock):
            if name not in counts:
                raise KeyError(f"No routing counts for {name}; collect them with routing_counts on this model.")
            survivors = counts[name].argsort(descending=True, stable=True)[:keep].sort().values
            _slice_block(module, survivors)
    config.num_experts = keep
    return model


def _slice_block(block: WhisperMoESparseBlock, survivors: torch.Tensor) -> None:
    experts, router = block.experts, block.router
    for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
        setattr(experts, name, torch.nn.Parameter(getattr(experts, name).data[survivors].clone()))
    router.weight = torch.nn.Parameter(router.weight.data[survivors].clone())
    experts.num_experts = router.num_experts = len(survivors)
