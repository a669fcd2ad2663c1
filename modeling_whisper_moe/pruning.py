"""Expert pruning: measure how often each expert is chosen on real data, keep the busiest ones.

Each sparse layer keeps its own `keep` most-used experts (their stacked weights and router rows are sliced), so the
pruned model has `num_experts = keep` everywhere and routes among the survivors exactly as before, minus the others.
"""

from collections.abc import Iterable

import torch

from .modeling_whisper_moe import WhisperMoEForConditionalGeneration, WhisperMoERouter, WhisperMoESparseBlock


@torch.no_grad()
def routing_counts(
    model: WhisperMoEForConditionalGeneration, batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Routing slots given to each expert, per sparse block: {block name: (num_experts,) counts}.

    `batches` yields model inputs (e.g. `input_features` and `decoder_input_ids` or `labels`); each is run once.
    """
    counts: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, WhisperMoERouter):
            block = name.removesuffix("router").rstrip(".")
            counts[block] = torch.zeros(module.num_experts, dtype=torch.long)

            def record(_module, _inputs, outputs, block=block):
                counts[block] += torch.bincount(outputs[2].reshape(-1).cpu(), minlength=counts[block].numel())

            handles.append(module.register_forward_hook(record))
    try:
        model.eval()
        for batch in batches:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return counts


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
