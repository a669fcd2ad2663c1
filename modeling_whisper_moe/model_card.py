"""The README.md (Hub model card) written next to a saved WhisperMoE."""

from pathlib import Path

import torch

from .configuration_whisper_moe import WhisperMoEConfig

ENGLISH_ONLY_VOCAB_SIZE = 51864  # the *.en Whisper checkpoints; multilingual ones have 51865 or more


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token): of each sparse block's routed experts only the top-k of every expert group (the
    base group and each growth phase's) count as active; of a PEER block, the heads x top-k retrieved experts (its
    query map and sub-keys score every token, so they count in full)."""
    total = sum(parameter.numel() for parameter in model.parameters())
    inactive = 0
    for block in model.modules():
        router, experts = getattr(block, "router", None), getattr(block, "experts", None)
        if router is not None and experts is not None and hasattr(router, "groups"):
            routed = sum(top_k for _, top_k in router.groups)
            rows = sum(parameter.numel() for parameter in experts.parameters())
            inactive += rows * (router.num_experts - routed) // router.num_experts
        elif type(block).__name__ == "PEER":
            unused = block.num_experts - block.num_heads * block.top_k
            inactive += unused * (block.down.embedding_dim + block.up.embedding_dim)
    return total, total - inactive


def _sparse_layers(config: WhisperMoEConfig, side: str) -> str:
    layers = getattr(config, f"{side}_sparse_layers")
    return "all" if layers is None else (", ".join(map(str, layers)) or "none")


def model_card(model: torch.nn.Module, training: dict | None = None) -> str:
    """Markdown with YAML metadata describing `model` (a WhisperMoEForConditionalGeneration).

    `training`, when given, is the training script's record (keys `base`, `data`, `recipe`, `metrics`): the card
    then says what the model was fine-tuned on, how, and what it scored.
    """
    config: WhisperMoEConfig = model.config
    total, active = count_parameters(model)
    source = config.upcycled_from
    metadata = [
        "---",
        "library_name: transformers",
        "pipeline_tag: automatic-speech-recognition",
        "license: mit",
        "tags: [whisper, whisper-moe, mixture-of-experts, moe, upcycling, custom_code]",
    ]
    if config.vocab_size == ENGLISH_ONLY_VOCAB_SIZE:
        metadata.append("language: en")
    if source and not Path(source).exists():
        metadata.append(f"base_model: {source}")
    metadata.append("---")
    how_made = (
        f"Upcycled from the dense Whisper checkpoint `{source}`: every expert started as "
        f"{_expert_origin(config)}, so before any training this model transcribes exactly like its source."
        if source
        else "Built from a WhisperMoE configuration."
    )
    body = f"""
# WhisperMoE

Whisper with sparse Mixture-of-Experts feed-forward blocks: in each sparse layer a router sends every token to
{config.num_experts_per_tok} of {config.num_experts} experts{_shared_note(config)}.

| | |
|---|---|
| parameters | {total / 1e6:.1f} M in total, {active / 1e6:.1f} M active per token |
| encoder sparse layers | {_sparse_layers(config, "encoder")} of {config.encoder_layers} |
| decoder sparse layers | {_sparse_layers(config, "decoder")} of {config.decoder_layers} |
| d_model / expert width | {config.d_model} / {config.expert_ffn_dim(config.encoder_ffn_dim)} |

{how_made}

## Use

```python
from transformers import pipeline

asr = pipeline("automatic-speech-recognition", model="<this repo>", trust_remote_code=True)
print(asr("audio.flac", return_timestamps=True))
```

or `AutoModelForSpeechSeq2Seq.from_pretrained("<this repo>", trust_remote_code=True)` with
`AutoProcessor.from_pretrained("<this repo>", trust_remote_code=True)`. The code ships in this repository
(made with [whisper-moe](https://pypi.org/project/whisper-moe/)).
{_text_tasks(model)}"""
    return "\n".join(metadata) + "\n" + body + (_training_section(training) if training else "")


def _text_tasks(model: torch.nn.Module) -> str:
    """Use examples for the text front-end (translation) and speech output (text-to-speech), where the model has
    them."""
    lines = []
    if model.config.text_frontend:
        lines += ['translate = pipeline("translation", model="<this repo>", trust_remote_code=True)',
                  'translate("Where is the station?", src_lang="en", tgt_lang="de")']  # fmt: skip
    if hasattr(model, "generate_speech"):
        lines += ['tts = pipeline("text-to-audio", model="<this repo>", trust_remote_code=True)',
                  'speech = tts("three one four one")  # {"audio": array, "sampling_rate": 16000}']  # fmt: skip
    if not lines:
        return ""
    return "\nText in (the encoder's text front-end) and speech out:\n\n```python\n" + "\n".join(lines) + "\n```\n"


def _training_section(record: dict) -> str:
    data = record.get("data", {})
    source = data.get("train_manifest") or data.get("dataset_name")
    held_out = ", ".join(data.get("exclude_speakers") or []) or "none"
    settings = "\n".join(f"| {key} | {value} |" for key, value in record.get("hyperparameters", {}).items())
    metrics = record.get("metrics", {})
    rows = "\n".join(f"| {key} | {value:.4g} |" for key, value in metrics.items() if isinstance(value, (int, float)))
    return f"""
## Training

Fine-tuned from `{record.get("base")}` on `{source}` (split `{data.get("train_split")}`, speakers held out of
training: {held_out}) with

```bash
python {" ".join(record.get("command", []))}
```

on top of the recipe `{record.get("recipe", {}).get("path")}`. Effective settings:

| setting | value |
|---|---|
{settings}

## Evaluation

On `{data.get("eval_manifest") or source}` (split `{data.get("eval_split")}`); WER/CER in percent after Whisper's
English normalisation.

| metric | value |
|---|---|
{rows}
"""


def _expert_origin(config: WhisperMoEConfig) -> str:
    if config.expert_segments == 1:
        return "a copy of its feed-forward block"
    return f"one of {config.expert_segments} slices of a copy of its feed-forward block (the slices add up to it)"


def _shared_note(config: WhisperMoEConfig) -> str:
    segments = "" if config.expert_segments == 1 else f" (fine-grained: each 1/{config.expert_segments} of a block)"
    if config.num_shared_experts == 0:
        return segments
    return f"{segments}, and {config.num_shared_experts} shared expert(s) see every token"
