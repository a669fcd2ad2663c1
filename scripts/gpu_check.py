#!/usr/bin/env python
"""A short, prepared check of WhisperMoE on a GPU: bf16, SDPA, transformers' grouped_mm experts, torch.compile.

    python scripts/gpu_check.py --moe checkpoints/whisper-moe-tiny.en [--output-json results/gpu-check.json]

Runs in about two minutes on one GPU and prints one JSON line per measurement; `--device cpu` dry-runs it.
Nothing in the tests or CI needs a GPU: this is what to run when one is lent.
1. Expert dispatch, forward + backward of one 8-expert block over 3,000 tokens in bf16: grouped, loop, grouped_mm
   (same outputs, then time).
2. Transcription of real speech through the pipeline: fp32 vs bf16 (SDPA attention), texts and real-time factor.
3. `torch.compile` of the model's forward with a static KV cache: greedy tokens per second vs eager.
"""

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
from transformers import pipeline

from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration, load_audio
from modeling_whisper_moe.modeling_whisper_moe import WhisperMoESparseBlock

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_AUDIO = REPO_ROOT.parent / "shared" / "data" / "misc" / "jfk.flac"
DISPATCH_TOKENS = 3000
SAMPLING_RATE = 16_000
DECODE_TOKENS = 64  # greedy tokens timed for the compile check


def timed(run, device: str, repeats: int = 5) -> float:
    """Median seconds of `run()` after one warm-up, synchronising the device around each call."""
    run()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check_dispatch(config: WhisperMoEConfig, device: str, dtype: torch.dtype) -> list[dict]:
    hidden = torch.randn(DISPATCH_TOKENS, config.d_model, device=device, dtype=dtype)
    rows, reference = [], None
    for implementation in ("loop", "grouped", "grouped_mm"):
        block_config = WhisperMoEConfig(**{**config.to_dict(), "experts_implementation": implementation})
        torch.manual_seed(0)
        block = WhisperMoESparseBlock(block_config, config.encoder_ffn_dim).to(device, dtype)
        for parameter in block.parameters():
            torch.nn.init.normal_(parameter, std=0.02)
        output = block(hidden[None])
        reference = output if reference is None else reference
        error = (output - reference).abs().max().item()
        seconds = timed(partial(_step, block, hidden), device)
        rows.append({"check": f"dispatch {DISPATCH_TOKENS} tokens fwd+bwd {dtype}", "system": implementation,
                     "seconds": seconds, "max_abs_diff_vs_loop": error})  # fmt: skip
    return rows


def _step(block: torch.nn.Module, hidden: torch.Tensor) -> None:
    block.zero_grad(set_to_none=True)
    block(hidden[None]).float().square().mean().backward()


def check_transcription(folder: str, audio_path: Path, device: str) -> list[dict]:
    audio = load_audio(audio_path, SAMPLING_RATE)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True, device=device,
                       dtype=dtype, model_kwargs={"attn_implementation": "sdpa"})  # fmt: skip
        text = asr(audio.copy())["text"]
        seconds = timed(lambda asr=asr: asr(audio.copy()), device, repeats=3)
        rows.append({"check": "transcribe jfk.flac", "system": str(dtype), "seconds": seconds,
                     "rtf": seconds / (len(audio) / SAMPLING_RATE), "text": text})  # fmt: skip
    return rows


def check_compile(folder: str, audio_path: Path, device: str) -> list[dict]:
    model = WhisperMoEForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    features = processor(load_audio(audio_path, SAMPLING_RATE), return_tensors="pt").input_features
    features = features.to(device, torch.bfloat16)
    options = dict(max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, num_beams=1)
    rows = []
    for name, extra in (("eager", {}), ("static cache + torch.compile", {"cache_implementation": "static"})):
        if extra:
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        seconds = timed(lambda extra=extra: model.generate(features, **options, **extra), device, repeats=3)
        rows.append({"check": f"greedy {DECODE_TOKENS} tokens, bf16", "system": name, "seconds": seconds,
                     "tokens_per_s": DECODE_TOKENS / seconds})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moe", required=True, help="a WhisperMoE folder")
    parser.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("No CUDA device here: run this on a GPU machine, or pass --device cpu for a dry run.", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = check_dispatch(WhisperMoEConfig.from_pretrained(args.moe), args.device, dtype)
    rows += check_transcription(args.moe, args.audio, args.device)
    if args.device == "cuda":
        rows += check_compile(args.moe, args.audio, args.device)
    for row in rows:
        print(json.dumps(row, default=str))
    if args.output_json:
        partial_file = args.output_json.with_name(args.output_json.name + ".tmp")
        partial_file.write_text(json.dumps(rows, indent=2, default=str) + "\n")
        partial_file.replace(args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
