"""A Distil-Whisper student of a WhisperMoE teacher (Gandhi et al. 2023): the teacher's encoder and embeddings, and
a few of its decoder layers, evenly spaced with the first and the last kept (the reference's choice).

An MoE teacher's student keeps sparse decoder layers, or dense ones (`dense="average"`: each layer's routed experts
averaged into one block; `dense="busiest"`: the expert that real tokens use most). Both are exact for a freshly
upcycled teacher, whose experts are copies of one block; after fine-tuning they are starting points to distil from.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import torch

from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration

DENSE_MERGES = ("average", "busiest")
DECODER_LAYER_KEY = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.*)$")
EXPERT_TENSORS = {
    "fc1_weight": "fc1.weight",
    "fc1_bias": "fc1.bias",
    "fc2_weight": "fc2.weight",
    "fc2_bias": "fc2.bias",
}


def student_decoder_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher's decoder layers a student of `student_layers` keeps: evenly spaced, the first and last kept."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"a student keeps 1 to {teacher_layers} decoder layers (the teacher's), got {student_layers}")
    return sorted({int(i) for i in np.linspace(0, teacher_layers - 1, student_layers).round()})


def make_student(
    teacher: WhisperMoEForConditionalGeneration,
    decoder_layers: int = 2,
    dense: str | None = None,
    usage: dict[str, torch.Tensor] | None = None,
) -> WhisperMoEForConditionalGeneration:
    """The student (a new model; the teacher is untouched). `usage`: {"model.decoder.layers.i.mlp": expert counts}
    (processing.pruning.routing_counts), needed by `dense="busiest"`."""
    kept = student_decoder_layers(teacher.config.decoder_layers, decoder_layers)
    config = _student_config(teacher.config, kept, dense)
    student = WhisperMoEForConditionalGeneration(config)
    state = {}
    for key, value in teacher.state_dict().items():
        match = DECODER_LAYER_KEY.match(key)
        if match is None:
            state[key] = value
        elif int(match[1]) in kept:
            state.update(_layer_tensors(int(match[1]), kept.index(int(match[1])), match[2], value, dense, usage))
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()


def _student_config(config: WhisperMoEConfig, kept: list[int], dense: str | None) -> WhisperMoEConfig:
    if dense is not None and dense not in DENSE_MERGES:
        raise ValueError(f"dense must be None (sparse decoder) or one of {DENSE_MERGES}, got {dense!r}")
    if any(phase["decoder_layers"] for phase in config.expert_growth or ()):
        raise ValueError("the teacher grew experts in its decoder (lifelong phases); a student of it is not supported")
    if dense is not None and (config.expert_segments > 1 or config.num_shared_experts):
        raise ValueError(
            "a dense student merges whole experts into the dense block: not with expert_segments > 1 or shared "
            "experts; keep the decoder sparse (no --dense-decoder)."
        )
    values = config.to_dict()
    values["decoder_layers"] = len(kept)
    sparse = config.decoder_sparse_layers
    values["decoder_sparse_layers"] = [] if dense else (None if sparse is None else _renumber(sparse, kept))
    values["decoder_ttt_layers"] = _renumber(config.decoder_ttt_layers or [], kept) or None
    return WhisperMoEConfig.from_dict(values)


def _renumber(layers: list[int], kept: list[int]) -> list[int]:
    return [kept.index(layer) for layer in layers if layer in kept]


def _layer_tensors(source: int, target: int, name: str, value: torch.Tensor, dense: str | None, usage) -> dict:
    """The student's tensors for the teacher's decoder layer `source` tensor `name`: renamed to layer `target`, and
    for a dense student the experts merged into one block and the router dropped."""
    prefix = f"model.decoder.layers.{target}."
    if dense is None or not name.startswith("mlp."):
        return {prefix + name: value}
    part = name.removeprefix("mlp.")
    if part.startswith("router."):
        return {}
    if not part.startswith("experts."):  # a layer that was dense already
        return {prefix + name: value}
    tensor = part.removeprefix("experts.")
    if dense == "average":
        merged = value.mean(dim=0)
    else:
        block = f"model.decoder.layers.{source}.mlp"
        if usage is None or block not in usage:
            raise ValueError(f"dense='busiest' needs the routing counts of {block} (routing_counts on some audio)")
        merged = value[int(usage[block].argmax())]
    return {prefix + "mlp." + EXPERT_TENSORS[tensor]: merged.clone()}
