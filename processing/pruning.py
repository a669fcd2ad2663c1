"""Expert pruning: measure how often each expert is chosen on real data, keep the busiest ones.

Each sparse layer keeps its own `keep` most-used experts (their stacked weights and router rows are sliced), so the
pruned model has `num_experts = keep` everywhere and routes among the survivors exactly as before, minus the others.
"""

from collections.abc import Callable, Iterable, Iterator
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
def each_routing(model: WhisperMoEForConditionalGeneration, batches: Iterable[dict], record: Callable) -> None:
    """Run each of `batches` (model inputs) once and call `record(block, side, router, weights, index)` for every
    sparse block, with the (real tokens, k) top-k routing weights and expert indices of that block.

    Only real tokens count (see `router_token_masks`): decoder positions whose label is not -100, text positions
    and mel frames that `attention_mask` marks real (a 30 s window's padding is left out).
    """
    masks: dict[str, torch.Tensor | None] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, WhisperMoERouter):
            block = name.removesuffix("router").rstrip(".")
            side = "decoder" if ".decoder." in f".{block}." else "encoder"

            def hook(router, _inputs, outputs, block=block, side=side):
                weights, index = (tensor.reshape(-1, tensor.shape[-1]).cpu() for tensor in outputs[1:])
                if masks[side] is not None:
                    real = masks[side].reshape(-1).cpu()
                    weights, index = weights[real], index[real]
                record(block, side, router, weights.float(), index)

            handles.append(module.register_forward_hook(hook))
    try:
        model.eval()
        for batch in batches:
            masks.update(router_token_masks(model.config, batch))
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()


def routing_counts(
    model: WhisperMoEForConditionalGeneration, batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Routing slots given to each expert, per sparse block, from the real tokens of `batches` (see
    `each_routing`): {block name: (num_experts,) counts}."""
    counts = {  # every block, the ones these inputs never reach (text skips deep encoder layers) left at 0
        name.removesuffix("router").rstrip("."): torch.zeros(module.num_experts, dtype=torch.long)
        for name, module in model.named_modules()
        if isinstance(module, WhisperMoERouter)
    }

    def record(block, _side, router, _weights, index):
        counts[block] += torch.bincount(index.reshape(-1), minlength=router.num_experts)

    each_routing(model, batches, record)
    return counts


def phase_weight_shares(
    model: WhisperMoEForConditionalGeneration, batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, dict[str, float]]:
    """Per side, the share of all routing weight that real tokens give to the experts the model started with
    ("base") and to those each growth phase added ("phase i"): {side: {label: share}}, summing to 1 per side.

    A grown group gives every token its top-k experts, weighted by their probability against the group's null
    expert, so slot counts say nothing for it; the weight is what its experts add to the block's output. The share
    of an old domain's weight on new experts is how much of its traffic moved to them.
    """
    totals: dict[str, dict[str, float]] = {}

    def record(_block, side, router, weights, index):
        labels = ["base"] + [f"phase {phase}" for phase in router.phases]
        column_group = torch.cat([torch.full((size,), g) for g, (size, _) in enumerate(router.groups)])
        groups = column_group[index.reshape(-1)]
        group_weight = torch.zeros(len(router.groups)).index_add_(0, groups, weights.reshape(-1))
        side_totals = totals.setdefault(side, {})
        for label, weight in zip(labels, group_weight.tolist()):
            side_totals[label] = side_totals.get(label, 0.0) + weight

    each_routing(model, batches, record)
    return {side: {label: weight / sum(parts.values()) for label, weight in parts.items()}
            for side, parts in totals.items() if sum(parts.values()) > 0}  # fmt: skip


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
