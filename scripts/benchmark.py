#!/usr/bin/env python
"""Speed of WhisperMoE next to the dense Whisper it came from, side by side in one process.

    python scripts/benchmark.py --dense checkpoints/whisper-tiny.en --moe checkpoints/whisper-moe-tiny.en

Measures, each as a median over repeats and as a ratio to its baseline:
- expert dispatch: forward + backward of one sparse block over N tokens, grouped vs the per-expert loop;
- transcription through the ASR pipeline on real speech (real-time factor, tokens per second): dense, MoE with
  each expert implementation, and faster-whisper on a CTranslate2 checkpoint when given;
- one training step (forward + backward + AdamW) with the encoder frozen and in full, MoE vs dense.
Prints a markdown table and writes JSON. A benchmark, not a test: numbers depend on the machine and its load.
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import WhisperForConditionalGeneration, pipeline  # noqa: E402

from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration, load_audio  # noqa: E402
from modeling_whisper_moe.modeling_whisper_moe import WhisperMoESparseBlock  # noqa: E402
from modeling_whisper_moe.training import apply_training_mode  # noqa: E402
from processing import read_manifest  # noqa: E402

SAMPLING_RATE = 16_000
DEFAULT_MANIFEST = REPO_ROOT.parent / "shared" / "data" / "librispeech" / "test-other" / "manifest.csv"
MEL_FRAMES = 3000  # a 30 s window
TRAIN_LABEL_TOKENS = 24  # label length of the synthetic training batch


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_dispatch(tokens: int, d_model: int, ffn_dim: int, repeats: int) -> list[dict]:
    """Forward + backward of one 8-expert top-2 block over `tokens` tokens, per implementation."""
    rows = []
    hidden = torch.randn(tokens, d_model)
    for implementation in ("loop", "grouped"):
        config = WhisperMoEConfig(d_model=d_model, experts_implementation=implementation)
        torch.manual_seed(0)
        block = WhisperMoESparseBlock(config, ffn_dim)
        for parameter in block.parameters():
            torch.nn.init.normal_(parameter, std=0.02)

        seconds = median_seconds(partial(_block_step, block, hidden), repeats)
        rows.append({"benchmark": f"dispatch {tokens} tokens fwd+bwd", "system": implementation, "seconds": seconds})
    return _with_ratio(rows, baseline="loop")


def _block_step(block: torch.nn.Module, hidden: torch.Tensor) -> None:
    block.zero_grad(set_to_none=True)
    block(hidden[None]).square().mean().backward()


def _transcribe(asr, audio: list[np.ndarray], batch: int) -> list[str]:
    inputs = [{"raw": clip, "sampling_rate": SAMPLING_RATE} for clip in audio]  # fresh: the pipeline pops keys
    return [out["text"] for out in asr(inputs, batch_size=batch, generate_kwargs={"num_beams": 1})]


def _train_step(model: torch.nn.Module, optimizer, features: torch.Tensor, labels: torch.Tensor) -> None:
    model(input_features=features, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_transcription(models: dict[str, str], ct2: str | None, manifest: Path, limit: int, batch: int) -> list:
    dataset = read_manifest(manifest).select(range(limit))
    audio = [load_audio(path, SAMPLING_RATE) for path in dataset["audio"]]
    audio_seconds = sum(len(clip) for clip in audio) / SAMPLING_RATE
    rows = []
    for name, (folder, implementation) in models.items():
        asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
        if implementation:
            for module in asr.model.modules():
                if hasattr(module, "implementation"):
                    module.implementation = implementation
        _transcribe(asr, audio[:1], batch)  # warm-up
        start = time.perf_counter()
        texts = _transcribe(asr, audio, batch)
        seconds = time.perf_counter() - start
        tokens = sum(len(asr.tokenizer(text).input_ids) for text in texts)
        rows.append({"benchmark": f"transcribe {limit} clips ({audio_seconds:.0f} s)", "system": name,
                     "seconds": seconds, "rtf": seconds / audio_seconds,
                     "tokens_per_s": tokens / seconds})  # fmt: skip
    if ct2:
        rows.append(_faster_whisper_row(ct2, audio, audio_seconds, limit))
    return _with_ratio(rows, baseline="dense")


def _faster_whisper_row(ct2: str, audio: list[np.ndarray], audio_seconds: float, limit: int) -> dict:
    from faster_whisper import WhisperModel

    model = WhisperModel(ct2, device="cpu", compute_type="default")

    options = dict(beam_size=1, without_timestamps=True, condition_on_previous_text=False)
    list(model.transcribe(audio[0], **options)[0])  # warm-up
    start = time.perf_counter()
    for clip in audio:
        list(model.transcribe(clip, **options)[0])
    seconds = time.perf_counter() - start
    return {"benchmark": f"transcribe {limit} clips ({audio_seconds:.0f} s)", "system": "faster-whisper",
            "seconds": seconds, "rtf": seconds / audio_seconds}  # fmt: skip


def bench_training(dense_folder: str, moe_folder: str, batch: int, repeats: int) -> list[dict]:
    rows = []
    features = torch.randn(batch, 80, MEL_FRAMES)
    labels = torch.randint(0, 50_000, (batch, TRAIN_LABEL_TOKENS))
    for mode in ("freeze_encoder", "full"):
        for name, cls, folder in (("dense", WhisperForConditionalGeneration, dense_folder),
                                  ("moe", WhisperMoEForConditionalGeneration, moe_folder)):  # fmt: skip
            model = apply_training_mode(cls.from_pretrained(folder).train(), mode)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
            seconds = median_seconds(partial(_train_step, model, optimizer, features, labels), repeats)
            rows.append({"benchmark": f"train step, batch {batch}, {mode}", "system": name, "seconds": seconds})
    return [row for mode_rows in _chunks(rows, 2) for row in _with_ratio(mode_rows, "dense")]


def _chunks(rows: list, size: int) -> list[list]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _with_ratio(rows: list[dict], baseline: str) -> list[dict]:
    """Each row's time as a multiple of the baseline row's (below 1 = faster than the baseline)."""
    base = next(row["seconds"] for row in rows if row["system"] == baseline)
    for row in rows:
        row["vs_" + baseline] = row["seconds"] / base
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| benchmark | system | seconds | RTF | tokens/s | time vs baseline |", "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        ratio = next((value for key, value in row.items() if key.startswith("vs_")), None)
        lines.append(
            f"| {row['benchmark']} | {row['system']} | {row['seconds']:.3f} | {_fmt(row.get('rtf'), 3)} "
            f"| {_fmt(row.get('tokens_per_s'), 1)} | {_fmt(ratio, 2)}x |"
        )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, help="dense Whisper folder (the upcycling source)")
    parser.add_argument("--moe", required=True, help="WhisperMoE folder upcycled from --dense")
    parser.add_argument("--faster-whisper", metavar="CT2_DIR", help="also time faster-whisper on this checkpoint")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--limit", type=int, default=16, help="clips to transcribe")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dispatch-tokens", type=int, default=3000)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-json", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    moe_config = WhisperMoEConfig.from_pretrained(args.moe)
    rows = bench_dispatch(args.dispatch_tokens, moe_config.d_model, moe_config.encoder_ffn_dim, args.repeats)
    models = {"dense": (args.dense, None), "moe grouped": (args.moe, "grouped"), "moe loop": (args.moe, "loop")}
    rows += bench_transcription(models, args.faster_whisper, args.manifest, args.limit, args.batch_size)
    rows += bench_training(args.dense, args.moe, args.train_batch, args.repeats)
    print(markdown(rows))
    if args.output_json:
        partial = args.output_json.with_name(args.output_json.name + ".tmp")
        partial.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str) + "\n")
        partial.replace(args.output_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
