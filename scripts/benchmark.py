#!/usr/bin/env python
"""Speed of WhisperMoE next to the dense Whisper it came from, side by side in one process.

    python scripts/benchmark.py --dense checkpoints/whisper-tiny.en --moe checkpoints/whisper-moe-tiny.en
    python scripts/benchmark.py --dense checkpoints/whisper-tiny.en --variants 8x2 8x2-seg4 8x1-shared1

Measures, each as a median over repeats and as a ratio to its baseline:
- expert dispatch: forward + backward of one sparse block over N tokens, grouped vs the per-expert loop;
- transcription through the ASR pipeline on real speech (real-time factor, tokens per second, WER): dense, MoE with
  each expert implementation, the int8 MoE when given, and faster-whisper fp32 / int8 on a CTranslate2 checkpoint
  when given, every system on the same clips at each of --transcription-batches (faster-whisper's
  BatchedInferencePipeline above batch 1), as ratios to the dense model at the same batch size;
- one training step (forward + backward + AdamW) with the encoder frozen and in full, MoE vs dense;
- the new capacity of a lifelong phase (`--sections growth`): the MoE as it is, with new experts in every decoder
  layer, and with a PEER block beside every decoder layer's feed-forward block (growth.py, peer.py), transcribing the
  same clips at the same batch size (growth is exact, so all three decode the same tokens) and taking a lifelong
  training step (only the new parameters train), with total parameters and those one token uses.
- long-form (`--sections long_form`): whole recordings over 30 s, one file at a time, as `whisper-moe transcribe`
  runs them with no options (sequential long-form, greedy, WhisperMoE's LONG_FORM_DEFAULTS, which the dense
  Whisper gets passed), and faster-whisper's sequential `transcribe` at the same beam size with its own fallback
  defaults, with WER on the same files, as ratios to faster-whisper's time (the dense one only with --dense); and,
  for each --long-form-batches above 1, the same chunked (30 s windows decoded that many at a time: the pipeline's
  `chunk_length_s`, faster-whisper's `BatchedInferencePipeline`); --long-form-beams above 1 runs every system at
  that beam size and adds each WhisperMoE with its LoopStop off;
- where the time goes (`--sections profile`): --dense, --moe and --int8 transcribing the --limit clips at batch 1,
  split into log-mel features, encoder, decoder forward passes, the rest of `generate` and the rest of the pipeline;
- speculative decoding (`--sections speculative --assistant STUDENT`): --moe alone, the student alone, and --moe with
  the student as its assistant, the same --limit clips one at a time (greedy), with how many assisted transcripts
  are exactly the teacher's, as ratios to the teacher's time;
- Test-Time-Training (`--sections ttt`): one layer at --moe's width over 1,500 (Whisper's encoder frames), 6,000 and
  24,000 tokens (--ttt-tokens), batch 1: causal attention (PyTorch's scaled-dot-product kernel), TTT-Linear and
  TTT-MLP (causal, mini-batch 16), forward alone and forward + backward, time and peak memory, each measured in a
  fresh process so one row's allocations cannot hide another's peak; ratios to attention at the same length;
- packed pose clips (`--sections pose_packing`, no --dense needed): --moe with a pose front-end (new random weights:
  the time does not depend on them) on --pose-clips fingerspelled words composed as the fingerspelling-ase recipe
  composes its training words (processing/sign_data.py), in batches of each of --pose-batches, padded to each batch's
  longest clip vs packed (`config.pack_pose`), the same clips and batches: the encoder alone, and encoding then greedy
  generation of POSE_NEW_TOKENS tokens, each system's runs taking turns (wall and process CPU time); with the encoder
  positions each runs and the largest difference of the encoder's outputs on real frames and the share of generated
  tokens that differ;
With --variants, only this instead: MoE variants upcycled in memory from --dense (coarse, fine-grained with
`expert_segments`, with shared experts), their sizes, then each one's transcription of the same clips at each of
--variant-batches and one training step on the same batch (frozen encoder, as configuration/recipes/asr-finetune.json),
as ratios to the first variant, the dense source alongside.
Prints a markdown table and writes JSON. A benchmark, not a test: numbers depend on the machine and its load.

    python scripts/benchmark.py --sections growth --moe checkpoints/whisper-moe-tiny.en --limit 16 --batch-size 8
    python scripts/benchmark.py --sections pose_packing --moe checkpoints/whisper-moe-tiny.en
"""

import argparse
import copy
import json
import multiprocessing
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import WhisperForConditionalGeneration, pipeline

from modeling_whisper_moe import (
    WhisperMoEConfig,
    WhisperMoEForConditionalGeneration,
    WhisperMoEProcessor,
    load_audio,
)
from modeling_whisper_moe.configuration_whisper_moe import EXPERTS_IMPLEMENTATIONS, PEER_DEFAULTS
from modeling_whisper_moe.generation_whisper_moe import LONG_FORM_DEFAULTS
from modeling_whisper_moe.growth import grow_experts, grow_peer
from modeling_whisper_moe.model_card import count_parameters
from modeling_whisper_moe.modeling_whisper_moe import WhisperMoESparseBlock
from modeling_whisper_moe.packing import plan_clip_packing
from modeling_whisper_moe.pipeline_whisper_moe import WhisperMoEASRPipeline
from modeling_whisper_moe.pose import pose_values
from modeling_whisper_moe.processing_whisper_moe import log_mel_30s
from processing import read_manifest
from processing.lifelong import apply_lifelong_mode
from processing.metrics import english_normalizer, error_rates
from processing.sign_data import Augmentation, PoseCollator, compose, read_lexicon, split_words, words_from_sentences
from processing.tasks.translation import add_text_languages
from processing.tasks.video_to_text import OUTPUT_LANGUAGE as VIDEO_TO_TEXT_LANGUAGE
from processing.training import apply_training_mode

REPO_ROOT = Path(__file__).resolve().parents[1]

SAMPLING_RATE = 16_000
DEFAULT_MANIFEST = REPO_ROOT.parent / "shared" / "data" / "librispeech" / "test-other" / "manifest.csv"
DEFAULT_SHORT_CLIPS = REPO_ROOT.parent / "shared" / "data" / "fsdd" / "manifest.csv"
DEFAULT_LONG_FORM = REPO_ROOT.parent / "shared" / "data" / "librispeech" / "longform" / "manifest.csv"
MEMORY_SAMPLE_S = 0.005  # resident-memory sampling period
SHORT_CLIP_TOKENS = 16  # a spoken digit is 1-3 tokens; the cap keeps a hallucinating model from running to 448
MEL_FRAMES = 3000  # a 30 s window
TRAIN_LABEL_TOKENS = 24  # label length of the synthetic training batch
VARIANT_PATTERN = re.compile(r"(\d+)x(\d+)(?:-seg(\d+))?(?:-shared(\d+))?")  # ExK[-segM][-sharedS]
# all but the last have the active parameters of two dense blocks per token; 8x2-shared1 (the shared preset) has three
DEFAULT_VARIANTS = ("8x2", "8x2-seg4", "8x1-shared1", "8x1-seg4-shared1", "8x2-shared1")
SECTIONS = ("dispatch", "transcription", "training", "short_clips", "growth", "long_form", "ttt", "pose_packing",
            "profile", "speculative")  # fmt: skip
DEFAULT_SECTIONS = SECTIONS[:-1]  # speculative needs a student (--assistant)
POSE_WORDS = tuple(
    REPO_ROOT.parent / "shared" / "data" / "translation" / f"tatoeba_en_{language}.csv" for language in ("de", "fr")
)  # the words configuration/recipes/fingerspelling-ase.json spells
POSE_NEW_TOKENS = 12  # a word of 5-6 letters spelled one token each; a random front-end never ends one early
TTT_SYSTEMS = ("attention", "ttt-linear", "ttt-mlp")
DENSE_SECTIONS = ("transcription", "training")  # the ones that time the dense source next to the MoE


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
    """Forward + backward of one 8-expert top-2 block over `tokens` tokens, per implementation, next to the floor:
    the same expert matmuls on tokens already sorted into equal contiguous segments, with no routing at all."""
    rows = []
    hidden = torch.randn(tokens, d_model)
    # batched_mm copies every slot's expert weights: 6,000 x 1536 x 384 floats (14 GB) at 3,000 tokens of tiny
    for implementation in (name for name in EXPERTS_IMPLEMENTATIONS if name != "batched_mm"):
        config = WhisperMoEConfig(d_model=d_model, experts_implementation=implementation)
        torch.manual_seed(0)
        block = WhisperMoESparseBlock(config, ffn_dim)
        for parameter in block.parameters():
            torch.nn.init.normal_(parameter, std=0.02)

        seconds = median_seconds(partial(_block_step, block, hidden), repeats)
        rows.append({"benchmark": f"dispatch {tokens} tokens fwd+bwd", "system": implementation, "seconds": seconds})
    seconds = median_seconds(partial(_matmul_floor, block, hidden), repeats)
    rows.append({"benchmark": f"dispatch {tokens} tokens fwd+bwd", "system": "matmuls only", "seconds": seconds})
    return _with_ratio(rows, baseline="loop")


def bench_ttt(d_model: int, num_heads: int, lengths: list[int], repeats: int) -> list[dict]:
    """Attention vs TTT-Linear vs TTT-MLP, one layer, at each length: see the module docstring."""
    rows = []
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter per row: its peak memory is its own
    for tokens in lengths:
        for backward in (False, True):
            group = []
            for system in TTT_SYSTEMS:
                with spawn.Pool(1) as pool:
                    seconds, peak_mb = pool.apply(_ttt_row, (system, d_model, num_heads, tokens, backward, repeats))
                mode = "fwd+bwd" if backward else "fwd"
                group.append({"benchmark": f"one layer, {tokens} tokens, {mode}", "system": system,
                              "seconds": seconds, "peak_mb": peak_mb})  # fmt: skip
            rows += _with_ratio(group, baseline="attention")
    return rows


def _ttt_row(system: str, d_model: int, num_heads: int, tokens: int, backward: bool, repeats: int):
    """(median seconds, peak MB above the process's resident memory before the first run) of one layer."""
    import resource

    from modeling_whisper_moe.ttt import TTT_CLASSES

    torch.manual_seed(0)
    if system == "attention":
        projections = torch.nn.Linear(d_model, 3 * d_model), torch.nn.Linear(d_model, d_model)

        def layer(hidden: torch.Tensor) -> torch.Tensor:
            q, k, v = projections[0](hidden).unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return projections[1](mixed.transpose(1, 2).flatten(2))
    else:
        layer = TTT_CLASSES[system.removeprefix("ttt-")](d_model, num_heads)
    hidden = torch.randn(1, tokens, d_model, requires_grad=backward)

    def step() -> None:
        if backward:
            layer(hidden).square().mean().backward()
        else:
            with torch.no_grad():
                layer(hidden)

    before = _rss_bytes()
    seconds = median_seconds(step, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return seconds, (peak - before) / 1e6


def _matmul_floor(block: torch.nn.Module, hidden: torch.Tensor) -> None:
    """The expert matmuls of a top-k step without routing: tokens * k rows in equal per-expert segments."""
    experts = block.experts
    experts.zero_grad(set_to_none=True)
    slots = hidden.repeat(block.router.top_k, 1).chunk(experts.num_experts)
    out = [experts.expert_forward(weights, rows) for weights, rows in zip(experts.per_expert_weights(), slots)]
    torch.cat(out).square().mean().backward()


def _block_step(block: torch.nn.Module, hidden: torch.Tensor) -> None:
    block.zero_grad(set_to_none=True)
    block(hidden[None]).square().mean().backward()


def _transcribe(
    asr, audio: list[np.ndarray], batch: int, max_new_tokens: int | None = None, assistant=None
) -> list[str]:
    """Greedy transcripts of `audio` through the pipeline `asr`; `assistant`: a student model drafting tokens for
    it (speculative decoding, batch 1)."""
    inputs = [{"raw": clip, "sampling_rate": SAMPLING_RATE} for clip in audio]  # fresh: the pipeline pops keys
    options = {"num_beams": 1} if max_new_tokens is None else {"num_beams": 1, "max_new_tokens": max_new_tokens}
    if assistant is not None:
        options["assistant_model"] = assistant
    return [out["text"] for out in asr(inputs, batch_size=batch, generate_kwargs=options)]


def bench_long_form(
    models: dict[str, str], ct2: str | None, manifest: Path, limit: int | None, batches: list[int], beams: int = 1
) -> list[dict]:
    """Each recording of `manifest` (over 30 s each) transcribed whole by every system at `beams` beams, in this
    process: at batch 1 sequentially, one file at a time (WhisperMoE's LONG_FORM_DEFAULTS; faster-whisper's
    `transcribe`); above, chunked, each file's 30 s windows decoded `batch` at a time (the pipeline's
    `chunk_length_s=30`; faster-whisper's `BatchedInferencePipeline`). With beams, also each WhisperMoE with its
    `LoopStop` switched off, the loops beam search falls into being where it acts."""
    dataset = read_manifest(manifest)
    dataset = dataset.select(range(min(limit or len(dataset), len(dataset))))
    audio = [load_audio(path, SAMPLING_RATE) for path in dataset["audio"]]
    audio_seconds = sum(len(clip) for clip in audio) / SAMPLING_RATE
    references = list(dataset["text"])
    pipelines = {name: pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
                 for name, folder in models.items()}  # fmt: skip
    rows = []
    for batch in batches:
        how = "sequential, batch 1" if batch == 1 else f"chunked 30 s, batch {batch}"
        how += f", {beams} beams" if beams > 1 else ""
        benchmark = f"long-form, {len(audio)} files ({audio_seconds:.0f} s), {how}"
        systems = {name: partial(_transcribe_long, asr, batch=batch, beams=beams) for name, asr in pipelines.items()}
        if beams > 1:  # each WhisperMoE also with its LoopStop off (the dense Whisper has none)
            for name, asr in pipelines.items():
                if asr.model.config.model_type == WhisperMoEConfig.model_type:
                    off = partial(_transcribe_long, asr, batch=batch, beams=beams, loops=True)
                    systems[f"{name}, loop_stop off"] = off
        if ct2:
            systems["faster-whisper"] = _faster_whisper_long(ct2, batch, beams)
        group = []
        for name, transcribe in systems.items():
            with PeakMemory() as memory:
                start = time.perf_counter()
                texts = transcribe(audio)
                seconds = time.perf_counter() - start
            group.append({"benchmark": benchmark, "system": name, "seconds": seconds, "rtf": seconds / audio_seconds,
                          "peak_mb": memory.megabytes, "wer": _word_error_rate(references, texts)})  # fmt: skip
        rows += _with_ratio(group, baseline="faster-whisper" if ct2 else "moe")
    return rows


def _faster_whisper_long(ct2: str, batch: int, beams: int = 1) -> Callable[[list[np.ndarray]], list[str]]:
    """faster-whisper fp32 on whole recordings at `beams` beams, no conditioning on previous text (as the
    pipeline)."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    model = WhisperModel(ct2, device="cpu", compute_type="default")
    options = dict(beam_size=beams, condition_on_previous_text=False)
    if batch == 1:
        return partial(_faster_whisper_sequential, model, options)
    batched = BatchedInferencePipeline(model)
    return lambda clips: [
        "".join(segment.text for segment in batched.transcribe(clip, batch_size=batch, **options)[0]) for clip in clips
    ]


def _transcribe_long(asr, audio: list[np.ndarray], batch: int = 1, beams: int = 1, loops: bool = False) -> list[str]:
    """`asr` on whole recordings at `beams` beams: at batch 1 sequential long-form with WhisperMoE's long-form
    defaults (transformers' own Whisper pipeline needs them passed), above it 30 s chunks decoded `batch` at a time.
    `loops`: with WhisperMoE's `LoopStop` switched off (`generation_config.loop_stop`)."""
    inputs = [{"raw": clip, "sampling_rate": SAMPLING_RATE} for clip in audio]
    config = asr.model.generation_config
    previous, config.loop_stop = getattr(config, "loop_stop", True), not loops
    try:
        if batch == 1:
            options = {"num_beams": beams, **LONG_FORM_DEFAULTS}
            outputs = asr(inputs, batch_size=1, return_timestamps=True, generate_kwargs=options)
        else:
            outputs = asr(inputs, batch_size=batch, chunk_length_s=30, generate_kwargs={"num_beams": beams})
    finally:
        config.loop_stop = previous
    return [output["text"] for output in outputs]


def _train_step(model: torch.nn.Module, optimizer, features: torch.Tensor, labels: torch.Tensor, **inputs) -> None:
    model(input_features=features, labels=labels, **inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_transcription(
    models: dict[str, str], ct2: str | None, manifest: Path, limit: int, batches: list[int], repeats: int
) -> list[dict]:
    """Every system on the same clips at each of `batches`, the systems taking turns `repeats` times (`_race`), as
    ratios to the dense model at the same batch size."""
    dataset = read_manifest(manifest).select(range(limit))
    audio = [load_audio(path, SAMPLING_RATE) for path in dataset["audio"]]
    references = list(dataset["text"])
    audio_seconds = sum(len(clip) for clip in audio) / SAMPLING_RATE
    pipelines = {}
    for name, (folder, implementation) in models.items():
        pipelines[name] = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
        if implementation:
            pipelines[name].model.set_experts_implementation(implementation)
    rows = []
    for batch in batches:
        systems = {name: partial(_transcribe, asr, batch=batch) for name, asr in pipelines.items()}
        for compute_type in ("default", "int8") if ct2 else ():
            name = "faster-whisper" if compute_type == "default" else f"faster-whisper {compute_type}"
            systems[name] = _faster_whisper_system(ct2, compute_type, batch)
        group = []
        for name, result in _race(systems, audio, repeats).items():
            tokenizer = pipelines[name].tokenizer if name in pipelines else None
            tokens = sum(len(tokenizer(text).input_ids) for text in result["texts"]) if tokenizer else None
            group.append({"benchmark": f"transcribe {limit} clips ({audio_seconds:.0f} s), batch {batch}",
                          "system": name, "seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
                          "rtf": result["seconds"] / audio_seconds, "peak_mb": result["peak_mb"],
                          "tokens_per_s": tokens / result["seconds"] if tokens else None, "repeats": repeats,
                          "wer": _word_error_rate(references, result["texts"]), "texts": result["texts"]})  # fmt: skip
        rows += _with_ratio(group, baseline="dense")
    return rows


def _race(systems: dict[str, Callable[[list], list[str]]], audio: list[np.ndarray], repeats: int) -> dict[str, dict]:
    """Each system transcribes `audio` `repeats` times after a one-clip warm-up, the systems taking turns so that a
    change in the machine's load hits all alike: the median wall and process-CPU seconds, and the first turn's peak
    memory (MB) and texts."""
    for transcribe in systems.values():
        transcribe(audio[:1])
    times = {name: [] for name in systems}
    results = {}
    for turn in range(repeats):
        for name, transcribe in systems.items():
            with PeakMemory() as memory:
                start, cpu_start = time.perf_counter(), time.process_time()
                texts = transcribe(audio)
                times[name].append((time.perf_counter() - start, time.process_time() - cpu_start))
            if turn == 0:
                results[name] = {"texts": texts, "peak_mb": memory.megabytes}
    for name, runs in times.items():
        results[name]["seconds"], results[name]["cpu_seconds"] = (statistics.median(column) for column in zip(*runs))
    return results


def _transcription_row(
    asr, benchmark: str, system: str, audio: list[np.ndarray], references: list[str], batch: int, assistant=None
) -> dict:
    """Time one pipeline transcribing `audio` at `batch` (after a one-clip warm-up): a row of the speed table, with
    the transcripts (`texts`, in the JSON only)."""
    audio_seconds = sum(len(clip) for clip in audio) / SAMPLING_RATE
    _transcribe(asr, audio[:1], batch, assistant=assistant)  # warm-up
    with PeakMemory() as memory:
        start = time.perf_counter()
        texts = _transcribe(asr, audio, batch, assistant=assistant)
        seconds = time.perf_counter() - start
    tokens = sum(len(asr.tokenizer(text).input_ids) for text in texts)
    return {"benchmark": benchmark, "system": system, "seconds": seconds, "rtf": seconds / audio_seconds,
            "tokens_per_s": tokens / seconds, "peak_mb": memory.megabytes,
            "wer": _word_error_rate(references, texts), "texts": texts}  # fmt: skip


def bench_profile(models: dict[str, tuple[str, str | None]], manifest: Path, limit: int) -> list[dict]:
    """Where one pipeline call's time goes, each of `limit` clips transcribed at batch 1 (greedy) after a warm-up:
    the log-mel features (`log_mel_30s`, timed on its own), the encoder, the decoder's forward passes, the rest of
    `generate` (the LM head, logits processors, cache, search loop) and the rest of the pipeline (collate,
    detokenising); each as a share of the whole call."""
    dataset = read_manifest(manifest).select(range(limit))
    audio = [load_audio(path, SAMPLING_RATE) for path in dataset["audio"]]
    rows = []
    for name, (folder, implementation) in models.items():
        asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
        if implementation:
            asr.model.set_experts_implementation(implementation)
        model = asr.model.model
        timers = {
            part: _timed_method(module, "forward")
            for part, module in (("encoder", model.encoder), ("decoder", model.decoder))
        }
        generate = _timed_method(asr.model, "generate")
        _transcribe(asr, audio[:1], 1)  # warm-up
        for timer in (*timers.values(), generate):
            timer.clear()
        start = time.perf_counter()
        _transcribe(asr, audio, 1)
        total = time.perf_counter() - start
        start = time.perf_counter()
        for clip in audio:
            log_mel_30s(clip, asr.feature_extractor)
        parts = {"features (log-mel)": time.perf_counter() - start, "encoder": sum(timers["encoder"]),
                 "decoder forward passes": sum(timers["decoder"])}  # fmt: skip
        parts["generate, the rest (LM head, logits processors, loop)"] = (
            sum(generate) - parts["encoder"] - parts["decoder forward passes"]
        )
        parts["pipeline, the rest"] = total - sum(generate) - parts["features (log-mel)"]
        benchmark = f"where the time goes, {limit} clips, batch 1"
        rows.append({"benchmark": benchmark, "system": f"{name}: whole call", "seconds": total, "vs_total": 1.0})
        rows += [{"benchmark": benchmark, "system": f"{name}: {part}", "seconds": seconds, "vs_total": seconds / total,
                  "calls": len(timers["decoder"]) if part.startswith("decoder") else None}
                 for part, seconds in parts.items()]  # fmt: skip
    return rows


def _timed_method(owner, name: str) -> list[float]:
    """Wall seconds of each call of `owner.name` from now on, appended to the returned list."""
    seconds, method = [], getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(owner, name, timed)
    return seconds


def bench_speculative(moe_folder: str, student_folder: str, manifest: Path, limit: int) -> list[dict]:
    """The teacher alone, its student alone, and the teacher with the student as assistant (speculative decoding),
    each transcribing the same clips one at a time, greedy, in this process; the assisted row says how many of its
    transcripts are exactly the teacher's."""
    dataset = read_manifest(manifest).select(range(limit))
    audio = [load_audio(path, SAMPLING_RATE) for path in dataset["audio"]]
    references = list(dataset["text"])
    benchmark = f"transcribe {limit} clips ({sum(len(clip) for clip in audio) / SAMPLING_RATE:.0f} s), batch 1"
    teacher = pipeline("automatic-speech-recognition", model=moe_folder, trust_remote_code=True)
    student = pipeline("automatic-speech-recognition", model=student_folder, trust_remote_code=True)
    rows = [_transcription_row(teacher, benchmark, "teacher", audio, references, 1),
            _transcription_row(student, benchmark, "student", audio, references, 1),
            _transcription_row(teacher, benchmark, "teacher + assistant", audio, references, 1,
                               assistant=student.model)]  # fmt: skip
    same = sum(mine == theirs for mine, theirs in zip(rows[2]["texts"], rows[0]["texts"]))
    rows[2]["system"] += f" ({same}/{limit} transcripts = teacher's)"
    rows[2]["identical_to_teacher"] = same
    return _with_ratio(rows, baseline="teacher")


def _faster_whisper_system(ct2: str, compute_type: str, batch: int) -> Callable[[list[np.ndarray]], list[str]]:
    """faster-whisper transcribing clips, greedy: at batch 1 `WhisperModel.transcribe` clip after clip; above, its
    `BatchedInferencePipeline` over the clips joined into one array with one clip timestamp each, so that `batch`
    clips share each decoding step (it batches the chunks of one input)."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    model = WhisperModel(ct2, device="cpu", compute_type=compute_type)
    options = dict(beam_size=1, without_timestamps=True, condition_on_previous_text=False)
    if batch == 1:
        return partial(_faster_whisper_sequential, model, options)
    return partial(_faster_whisper_batched, BatchedInferencePipeline(model), options, batch)


def _faster_whisper_sequential(model, options: dict, audio: list[np.ndarray]) -> list[str]:
    return ["".join(segment.text for segment in model.transcribe(clip, **options)[0]) for clip in audio]


def _faster_whisper_batched(batched, options: dict, batch: int, audio: list[np.ndarray]) -> list[str]:
    """Each clip's text from one batched transcription of all of them, found by the segments' start times."""
    starts = np.cumsum([0] + [len(clip) for clip in audio]) / SAMPLING_RATE
    clips = [{"start": float(start), "end": float(end)} for start, end in zip(starts[:-1], starts[1:])]
    segments, _ = batched.transcribe(np.concatenate(audio), clip_timestamps=clips, batch_size=batch, **options)
    texts = [""] * len(audio)
    for segment in segments:  # a clip's segments start at or after its own start (rounded to a sample)
        texts[int(np.searchsorted(starts, segment.start + 0.5 / SAMPLING_RATE, side="right")) - 1] += segment.text
    return texts


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
    """One table of every row; parameter columns (millions, total and used per token) when a row counts them."""
    counts = any("params" in row for row in rows)
    differences = any("max_difference" in row for row in rows)
    cpu = not differences and any("cpu_seconds" in row for row in rows)
    lines = [
        "| benchmark | system | seconds | RTF | tokens/s | clips/s | peak MB | WER % | time vs baseline |"
        + (" params M | active/token M |" if counts else "")
        + (" CPU s | CPU vs baseline | encoder positions | max difference |" if differences else "")
        + (" CPU s |" if cpu else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|---:|" if counts else "")
        + ("---:|---:|---:|---:|" if differences else "")
        + ("---:|" if cpu else ""),
    ]
    for row in rows:
        ratio = next((value for key, value in row.items() if key.startswith("vs_")), None)
        line = (
            f"| {row['benchmark']} | {row['system']} | {row['seconds']:.3f} | {_fmt(row.get('rtf'), 3)} "
            f"| {_fmt(row.get('tokens_per_s'), 1)} | {_fmt(row.get('clips_per_s'), 1)} "
            f"| {_fmt(row.get('peak_mb'), 0)} | {_fmt(row.get('wer'), 2)} | {_fmt(ratio, 2)}x |"
        )
        if counts:
            line += f" {_fmt(_millions(row.get('params')), 2)} | {_fmt(_millions(row.get('active_params')), 2)} |"
        if differences:
            line += (
                f" {_fmt(row.get('cpu_seconds'), 3)} | {_fmt(row.get('cpu_vs_padded'), 2)} | {row.get('frames', '')} "
                f"| {_fmt(row.get('max_difference'), 7)} |"
            )
        if cpu:
            line += f" {_fmt(row.get('cpu_seconds'), 3)} |"
        lines.append(line)
    return "\n".join(lines)


def _millions(count: int | None) -> float | None:
    return None if count is None else count / 1e6


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every few milliseconds from a thread (MB)."""

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_S):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def megabytes(self) -> float:
        return (self.peak - self.start) / 1e6


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_short_clips(moe_folder: str, packed_folder: str | None, manifest: Path, limit: int, batch: int) -> list:
    """Short clips (FSDD digits, ~0.5 s): Whisper's 30 s padding vs variable-length packed encoding.

    The encoder alone on `limit` clips, then transcription through the pipeline. The packed rows use
    `packed_folder` (a model fine-tuned with `variable_length_audio`), else --moe with the option switched on:
    throughput does not depend on the weights.
    """
    dataset = read_manifest(manifest, split="test").select(range(limit))
    audio = [load_audio(path, SAMPLING_RATE) for path in dataset["audio"]]
    audio_seconds = sum(len(clip) for clip in audio) / SAMPLING_RATE
    encoder_rows, pipeline_rows = [], []
    for name, folder, variable_length in (("30 s padding", moe_folder, False),
                                          ("packed", packed_folder or moe_folder, True)):  # fmt: skip
        asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
        asr.model.config.variable_length_audio = variable_length
        features = [log_mel_30s(clip, asr.feature_extractor) for clip in audio]
        input_features = torch.cat([f for f, _ in features])
        attention_mask = torch.cat([m for _, m in features])
        encoder = asr.model.get_encoder()
        with torch.inference_mode():
            seconds = median_seconds(partial(encoder, input_features, attention_mask=attention_mask), repeats=3)
        encoder_rows.append({"benchmark": f"encode {limit} FSDD clips ({audio_seconds:.0f} s)", "system": name,
                             "seconds": seconds, "clips_per_s": limit / seconds})  # fmt: skip
        _transcribe(asr, audio[:batch], batch, SHORT_CLIP_TOKENS)  # warm-up
        with PeakMemory() as memory:
            start = time.perf_counter()
            texts = _transcribe(asr, audio, batch, SHORT_CLIP_TOKENS)
            seconds = time.perf_counter() - start
        wer = _word_error_rate(dataset["text"], texts)
        pipeline_rows.append({"benchmark": f"transcribe {limit} FSDD clips ({audio_seconds:.0f} s)", "system": name,
                              "seconds": seconds, "rtf": seconds / audio_seconds, "clips_per_s": limit / seconds,
                              "peak_mb": memory.megabytes, "wer": wer})  # fmt: skip
    return _with_ratio(encoder_rows, "30 s padding") + _with_ratio(pipeline_rows, "30 s padding")


def fingerspelled_clips(count: int, seed: int) -> list[np.ndarray]:
    """`count` (frames, 27, 4) clips of ASL fingerspelled words drawn as the fingerspelling-ase recipe draws its
    training words: a word of POSE_WORDS spellable by the lexicon, composed with the default augmentation."""
    lexicon = read_lexicon("ase")
    words, _ = split_words(words_from_sentences(POSE_WORDS), set(lexicon))
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(count):
        keypoints, visible = compose(words[int(rng.integers(len(words)))], lexicon, rng, Augmentation())
        clips.append(pose_values(keypoints, visible))
    return clips


def bench_pose_packing(moe_folder: str, clips: list[np.ndarray], batch_sizes: list[int], repeats: int) -> list:
    """Padded to each batch's longest clip vs packed, on the same batches: see the module docstring."""
    padded = WhisperMoEForConditionalGeneration.from_pretrained(moe_folder, pack_pose=False).add_pose_frontend().eval()
    tokenizer = WhisperMoEProcessor.from_pretrained(moe_folder).tokenizer
    add_text_languages(padded.generation_config, tokenizer, (VIDEO_TO_TEXT_LANGUAGE,))  # as the video_to_text task
    packed = copy.deepcopy(padded)
    packed.config.pack_pose = True
    systems = {"padded to longest": padded, "packed": packed}
    frames = [len(clip) for clip in clips]
    rows = []
    for batch in batch_sizes:
        batches = [PoseCollator()([{"pose_values": clip, "labels": [0] * (POSE_NEW_TOKENS + 1)} for clip in chunk])
                   for chunk in _chunks(clips, batch)]  # fmt: skip
        packed_frames = sum(plan_clip_packing(b["attention_mask"]).real.numel() for b in batches)
        frames_in = {"padded to longest": sum(b["attention_mask"].numel() for b in batches), "packed": packed_frames}
        name = f"{len(clips)} clips of {min(frames)}-{max(frames)} frames (mean {np.mean(frames):.0f}), batch {batch}"
        tasks = (("encode", _pose_encode, _real_frames_difference),
                 (f"encode + generate {POSE_NEW_TOKENS} tokens", _pose_generate, _token_difference))  # fmt: skip
        for task, run, compare in tasks:
            outputs = {system: run(model, batches) for system, model in systems.items()}  # also the warm-up
            times = _interleaved_seconds({system: partial(run, model, batches) for system, model in systems.items()},
                                         repeats)  # fmt: skip
            group = [{"benchmark": f"{task}, {name}", "system": system, "seconds": seconds, "cpu_seconds": cpu,
                      "clips_per_s": len(clips) / seconds, "frames": frames_in[system]}
                     for system, (seconds, cpu) in times.items()]  # fmt: skip
            group[-1]["cpu_vs_padded"] = group[-1]["cpu_seconds"] / group[0]["cpu_seconds"]
            group[-1]["max_difference"] = compare(outputs["padded to longest"], outputs["packed"], batches)
            rows += _with_ratio(group, "padded to longest")
    return rows


def _interleaved_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, process CPU seconds) of each run, the runs taking turns, so that a change in the
    machine's load hits all alike; CPU time counts only what this process ran, which other processes change less."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            times[name].append((time.perf_counter() - start, time.process_time() - cpu_start))
    return {name: tuple(statistics.median(column) for column in zip(*runs)) for name, runs in times.items()}


def _pose_encode(model, batches: list[dict]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model.get_encoder()(pose_values=b["pose_values"], attention_mask=b["attention_mask"])[0]
                for b in batches]  # fmt: skip


def _pose_generate(model, batches: list[dict]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model.generate_from_pose(b["pose_values"], b["attention_mask"], language=VIDEO_TO_TEXT_LANGUAGE,
                                         max_new_tokens=POSE_NEW_TOKENS, min_new_tokens=POSE_NEW_TOKENS, num_beams=1)
                for b in batches]  # fmt: skip


def _real_frames_difference(reference: list, other: list, batches: list[dict]) -> float:
    return max(float((a - b).abs()[m.bool()].max()) for a, b, m in
               zip(reference, other, (b["attention_mask"] for b in batches)))  # fmt: skip


def _token_difference(reference: list, other: list, batches: list[dict]) -> float:
    """The share of generated tokens that differ (0 = the same text for every clip)."""
    return float(sum((a != b).sum() for a, b in zip(reference, other)) / sum(a.numel() for a in reference))


def _word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Percent, after Whisper's English normalisation (digits and number words compare equal)."""
    return error_rates(references, hypotheses, english_normalizer())["wer"]


def bench_short_clip_training(moe_folder: str, manifest: Path, batch: int, repeats: int) -> list[dict]:
    """One full training step on a batch of FSDD clips: 30 s padding vs variable-length packed encoding."""
    dataset = read_manifest(manifest, split="train").select(range(batch))
    processor = WhisperMoEProcessor.from_pretrained(moe_folder)
    features = [log_mel_30s(load_audio(path, SAMPLING_RATE), processor.feature_extractor) for path in dataset["audio"]]
    input_features, attention_mask = torch.cat([f for f, _ in features]), torch.cat([m for _, m in features])
    labels = processor.tokenizer(list(dataset["text"]), padding=True, return_tensors="pt").input_ids
    rows = []
    for name, variable_length in (("30 s padding", False), ("packed", True)):
        model = WhisperMoEForConditionalGeneration.from_pretrained(moe_folder, variable_length_audio=variable_length)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        step = partial(_train_step, model, optimizer, input_features, labels, attention_mask=attention_mask)
        seconds = median_seconds(step, repeats)
        rows.append({"benchmark": f"train step, {batch} FSDD clips, full", "system": name, "seconds": seconds,
                     "clips_per_s": batch / seconds})  # fmt: skip
    return _with_ratio(rows, "30 s padding")


def variant_options(name: str) -> dict:
    """Upcycling options of a variant named ExK[-segM][-sharedS]: E experts top-K (coarse, the dense block's width),
    each split into M fine-grained ones, plus S shared experts; e.g. 8x2, 8x2-seg4, 8x1-seg4-shared1."""
    match = VARIANT_PATTERN.fullmatch(name)
    if match is None:
        raise ValueError(f"variant {name!r} is not ExK[-segM][-sharedS], e.g. 8x2, 8x2-seg4 or 8x1-shared1")
    experts, top_k, segments, shared = match.groups()
    return {"num_experts": int(experts), "num_experts_per_tok": int(top_k),
            "expert_segments": int(segments or 1), "num_shared_experts": int(shared or 0)}  # fmt: skip


def _size_row(system: str, model: torch.nn.Module) -> dict:
    total, active = count_parameters(model)
    config = model.config
    experts = getattr(config, "num_experts", None)
    width = config.expert_ffn_dim(config.encoder_ffn_dim) if experts else config.encoder_ffn_dim
    return {"system": system, "experts": experts, "top_k": getattr(config, "num_experts_per_tok", None),
            "shared": getattr(config, "num_shared_experts", None), "expert_width": width,
            "total_m": total / 1e6, "active_m": active / 1e6}  # fmt: skip


def _variant_train_row(model: torch.nn.Module, system: str, batch: int, repeats: int) -> dict:
    """One frozen-encoder training step (the ASR fine-tune recipe's mode) on a synthetic batch of 30 s windows."""
    config = model.config
    generator = torch.Generator().manual_seed(0)  # every system trains on the same batch
    features = torch.randn(batch, config.num_mel_bins, MEL_FRAMES, generator=generator)
    labels = torch.randint(0, config.vocab_size, (batch, TRAIN_LABEL_TOKENS), generator=generator)
    model = apply_training_mode(model.train(), "freeze_encoder")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    seconds = median_seconds(partial(_train_step, model, optimizer, features, labels), repeats)
    return {"benchmark": f"train step, batch {batch}, freeze_encoder", "system": system, "seconds": seconds}


def bench_variants(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(sizes, speed rows) of the dense source and each MoE variant, upcycled in memory from --dense one at a time;
    every system transcribes the same clips through the same pipeline class at each batch size, then trains."""
    dataset = read_manifest(args.manifest).select(range(args.limit))
    audio, references = [load_audio(path, SAMPLING_RATE) for path in dataset["audio"]], list(dataset["text"])
    audio_seconds = sum(len(clip) for clip in audio) / SAMPLING_RATE
    processor = WhisperMoEProcessor.from_pretrained(args.dense)
    implementation = {"experts_implementation": args.experts_implementation} if args.experts_implementation else {}
    builders = {"dense": partial(WhisperForConditionalGeneration.from_pretrained, args.dense)}
    for name in args.variants:  # from the folder each time: training steps must not touch the next one's weights
        options = {**variant_options(name), **implementation}
        builders[name] = partial(WhisperMoEForConditionalGeneration.from_dense, args.dense, **options)
    sizes, transcription, training = [], {batch: [] for batch in args.variant_batches}, []
    for system, build in builders.items():
        model = build().eval()
        sizes.append(_size_row(system, model))
        asr = WhisperMoEASRPipeline(model=model, tokenizer=processor.tokenizer,
                                    feature_extractor=processor.feature_extractor)  # fmt: skip
        for batch, rows in transcription.items():
            benchmark = f"transcribe {args.limit} clips ({audio_seconds:.0f} s), batch {batch}"
            rows.append(_transcription_row(asr, benchmark, system, audio, references, batch))
        training.append(_variant_train_row(model, system, args.train_batch, args.repeats))
        del asr, model
    baseline = args.variants[0]
    speed = [row for rows in transcription.values() for row in _with_ratio(rows, baseline)]
    return sizes, speed + _with_ratio(training, baseline)


def sizes_markdown(sizes: list[dict]) -> str:
    lines = ["| system | experts | top-k | shared | expert width | parameters M | active M |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in sizes:
        cells = [row["system"], *(str(row[key]) if row[key] is not None else "" for key in ("experts", "top_k",
                 "shared", "expert_width")), f"{row['total_m']:.1f}", f"{row['active_m']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_growth(moe_folder: str, args: argparse.Namespace) -> list[dict]:
    """The MoE, + `--growth-experts` experts per decoder layer, + a PEER block per decoder layer: transcription of the
    same clips at the same batch size, then one lifelong training step on them (only the new parameters train)."""
    dataset = read_manifest(args.manifest).select(range(args.limit))
    processor = WhisperMoEProcessor.from_pretrained(moe_folder)
    audio = [load_audio(path, SAMPLING_RATE) for path in dataset["audio"]]
    features = processor(audio, return_tensors="pt").input_features  # (clips, mels, 3000)
    audio_seconds = sum(len(clip) for clip in audio) / SAMPLING_RATE
    labels = processor.tokenizer(list(dataset["text"])[: args.batch_size], padding=True, return_tensors="pt")
    label_ids = labels.input_ids.masked_fill(labels.attention_mask == 0, -100)
    peer = dict(num_keys=args.peer_keys, num_heads=args.peer_heads, num_experts_per_head=args.peer_experts_per_head,
                key_dim=args.peer_key_dim)  # fmt: skip
    experts_name = f"+{args.growth_experts} experts / decoder layer"
    peer_name = f"+PEER {args.peer_keys}^2 x {args.peer_heads} heads x top-{args.peer_experts_per_head}"
    variants = {
        "source": lambda model: model,
        experts_name: lambda model: grow_experts(model, args.growth_experts, encoder_layers=[]),
        peer_name: lambda model: grow_peer(model, **peer, encoder_layers=[]),
    }
    transcription, training = [], []
    for name, grow in variants.items():
        model = grow(WhisperMoEForConditionalGeneration.from_pretrained(moe_folder).eval())
        counts = parameter_counts(model)
        transcribe = partial(_generate, model, features, args.batch_size)
        seconds = median_seconds(transcribe, args.repeats)
        texts = processor.batch_decode(transcribe(), skip_special_tokens=True)
        tokens = sum(len(processor.tokenizer(text).input_ids) for text in texts)
        transcription.append({"benchmark": f"transcribe {args.limit} clips ({audio_seconds:.0f} s), batch "
                              f"{args.batch_size}", "system": name, "seconds": seconds, "rtf": seconds / audio_seconds,
                              "tokens_per_s": tokens / seconds, "wer": _word_error_rate(dataset["text"], texts),
                              **counts})  # fmt: skip
        if name == "source":
            continue
        apply_lifelong_mode(model)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        step = partial(_train_step, model, optimizer, features[: args.batch_size], label_ids)
        training.append({"benchmark": f"lifelong train step, batch {args.batch_size}", "system": name,
                         "seconds": median_seconds(step, args.repeats), **counts})  # fmt: skip
    return _with_ratio(transcription, "source") + _with_ratio(training, experts_name)


def _generate(model: torch.nn.Module, features: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Greedy transcription of `features` in batches of `batch` (the pipeline's settings: no timestamps)."""
    with torch.inference_mode():
        ids = [model.generate(chunk, num_beams=1) for chunk in features.split(batch)]
    return [row for chunk in ids for row in chunk]


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters and those one token uses (`model_card.count_parameters`)."""
    total, active = count_parameters(model)
    return {"params": total, "active_params": active}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dense", help="dense Whisper folder, the upcycling source (transcription, training, variants)"
    )
    parser.add_argument("--moe", help="WhisperMoE folder upcycled from --dense (needed unless --variants)")
    parser.add_argument(
        "--variants",
        nargs="*",
        help=f"compare MoE variants ExK[-segM][-sharedS] upcycled from --dense instead (none named: "
        f"{' '.join(DEFAULT_VARIANTS)}); ratios are to the first",
    )
    parser.add_argument("--variant-batches", type=int, nargs="+", default=[1, 8], help="batch sizes (--variants)")
    parser.add_argument(
        "--experts-implementation",
        choices=EXPERTS_IMPLEMENTATIONS,
        help="of the variants; the one MoE of transcription (default: each)",
    )
    parser.add_argument("--faster-whisper", metavar="CT2_DIR", help="also time faster-whisper on this checkpoint")
    parser.add_argument("--int8", metavar="INT8_DIR", help="also time this folder (`whisper-moe quantize` of --moe)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    parser.add_argument("--limit", type=int, default=16, help="clips to transcribe")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--transcription-batches", type=int, nargs="+", default=[1, 8],
                        help="transcription: the batch sizes every system is timed at")  # fmt: skip
    parser.add_argument("--dispatch-tokens", type=int, default=3000)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short-clips", type=Path, default=DEFAULT_SHORT_CLIPS, help="manifest of short clips")
    parser.add_argument("--short-limit", type=int, default=64, help="short clips to encode and transcribe")
    parser.add_argument("--packed-moe", help="a WhisperMoE fine-tuned with variable_length_audio (short clips)")
    parser.add_argument("--long-form", type=Path, default=DEFAULT_LONG_FORM, help="manifest of recordings > 30 s")
    parser.add_argument("--long-form-limit", type=int, help="recordings to transcribe (default: all)")
    parser.add_argument("--long-form-batches", type=int, nargs="+", default=[1, 8],
                        help="long-form: 1 = sequential, above: 30 s chunks decoded this many at a time")  # fmt: skip
    parser.add_argument("--long-form-beams", type=int, default=1,
                        help="long-form: beams, every system (above 1: also WhisperMoE, LoopStop off)")  # fmt: skip
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS), help="what to time")
    parser.add_argument("--growth-experts", type=int, default=2, help="growth: experts added per decoder layer")
    peer = PEER_DEFAULTS
    parser.add_argument(
        "--peer-keys", type=int, default=peer["num_keys"], help="growth: PEER sub-keys (keys^2 experts)"
    )
    parser.add_argument("--peer-heads", type=int, default=peer["num_heads"], help="growth: PEER retrieval heads")
    parser.add_argument(
        "--peer-experts-per-head", type=int, default=peer["num_experts_per_head"], help="growth: top-k"
    )
    parser.add_argument("--peer-key-dim", type=int, default=peer["key_dim"], help="growth: PEER query width")
    parser.add_argument("--ttt-tokens", type=int, nargs="+", default=[1500, 6000, 24000], help="ttt: lengths")
    parser.add_argument("--pose-clips", type=int, default=64, help="pose_packing: fingerspelled words to encode")
    parser.add_argument("--pose-batches", type=int, nargs="+", default=[64, 16], help="pose_packing: batch sizes")
    parser.add_argument("--assistant", help="speculative: a student folder of --moe (make-student, distillation)")
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args(argv)
    if args.variants is None and args.moe is None:
        parser.error("give --moe (the full benchmark) or --variants (the MoE variants comparison)")
    if args.variants is not None:
        if args.dense is None:
            parser.error("--variants upcycles from --dense; give it")
        args.variants = args.variants or list(DEFAULT_VARIANTS)
        for name in args.variants:
            variant_options(name)  # a typo fails before the slow part
    elif "speculative" in args.sections and args.assistant is None:
        parser.error("--sections speculative times --moe with a student as its assistant: give --assistant")
    elif args.dense is None and set(args.sections) & set(DENSE_SECTIONS):
        parser.error(f"--dense is needed by the sections {list(DENSE_SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variants is not None:
        sizes, rows = bench_variants(args)
        print(sizes_markdown(sizes) + "\n\n" + markdown(rows))
        _write_json(args, rows, sizes=sizes)
        return 0
    moe_config = WhisperMoEConfig.from_pretrained(args.moe)
    rows = []
    if "dispatch" in args.sections:
        rows += bench_dispatch(args.dispatch_tokens, moe_config.d_model, moe_config.encoder_ffn_dim, args.repeats)
    if "transcription" in args.sections:
        models = {"dense": (args.dense, None)}
        implementations = [args.experts_implementation] if args.experts_implementation else EXPERTS_IMPLEMENTATIONS
        models.update({f"moe {name}": (args.moe, name) for name in implementations if name != "batched_mm"})
        if args.int8:
            models["moe int8"] = (args.int8, None)
        batches = args.transcription_batches
        rows += bench_transcription(models, args.faster_whisper, args.manifest, args.limit, batches, args.repeats)
    if "training" in args.sections:
        rows += bench_training(args.dense, args.moe, args.train_batch, args.repeats)
    if "short_clips" in args.sections:
        rows += bench_short_clips(args.moe, args.packed_moe, args.short_clips, args.short_limit, args.batch_size)
        rows += bench_short_clip_training(args.moe, args.short_clips, args.train_batch * 2, args.repeats)
    if "growth" in args.sections:
        rows += bench_growth(args.moe, args)
    if "long_form" in args.sections:
        models = {"dense": args.dense, "moe": args.moe} if args.dense else {"moe": args.moe}
        rows += bench_long_form(
            models,
            args.faster_whisper,
            args.long_form,
            args.long_form_limit,
            args.long_form_batches,
            args.long_form_beams,
        )
    if "ttt" in args.sections:
        rows += bench_ttt(moe_config.d_model, moe_config.encoder_attention_heads, args.ttt_tokens, args.repeats)
    if "pose_packing" in args.sections:
        clips = fingerspelled_clips(args.pose_clips, seed=0)
        rows += bench_pose_packing(args.moe, clips, args.pose_batches, args.repeats)
    if "profile" in args.sections:
        models = {"dense": (args.dense, None)} if args.dense else {}
        models["moe"] = (args.moe, args.experts_implementation)
        if args.int8:
            models["moe int8"] = (args.int8, None)
        rows += bench_profile(models, args.manifest, args.limit)
    if "speculative" in args.sections:
        rows += bench_speculative(args.moe, args.assistant, args.manifest, args.limit)
    print(markdown(rows))
    _write_json(args, rows)
    return 0


def _write_json(args: argparse.Namespace, rows: list[dict], **extra) -> None:
    if args.output_json:
        partial = args.output_json.with_name(args.output_json.name + ".tmp")
        partial.write_text(json.dumps({"args": vars(args), "rows": rows, **extra}, indent=2, default=str) + "\n")
        partial.replace(args.output_json)


if __name__ == "__main__":
    sys.exit(main())
