"""The `tts` task: intelligibility of WhisperMoE text-to-speech folders, as Whisper base hears held-out digits.

1. Synthesis runs from each saved folder alone: a fresh interpreter that cannot import this package calls
   `pipeline("text-to-audio", model=FOLDER, trust_remote_code=True)` on held-out 4-digit sequences (never in
   training, not even inside longer sequences) and writes .wav files.
2. Whisper base (converted from the bundled checkpoint, run through transformers) transcribes them; both the
   reference and the transcript are reduced to digit strings ("3, 1, 4, 1" and "three one four one" both give
   "3 1 4 1") and scored by word error rate over digits (`processing.metrics.digit_wer`).
3. Ceilings on the same sequences (unless `--no_ceilings`): espeak-ng's own speech of them, and that speech passed
   through log-mel and the Griffin-Lim vocoder (what a perfect mel prediction would score).

    python scripts/evaluate.py --tasks tts --model outputs/tts-digits [--num_sequences 50] \\
        --output_json results/tts-digits.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from modeling_whisper_moe.audio import save_audio
from modeling_whisper_moe.features import SAMPLING_RATE, log_mel_spectrogram
from modeling_whisper_moe.vocoder import mel_to_waveform
from processing.espeak import speak
from processing.evaluation.common import Evaluator, ModelRef, add_flag, markdown_table, or_default
from processing.isolation import run_self_contained
from processing.metrics import digit_wer, to_digits
from processing.tts_data import digits_to_words, held_out_sequences, is_held_out

CACHE_DIR = Path.home() / ".cache" / "whisper-moe"
DEFAULT_NUM_SEQUENCES = 50
SYNTHESIS_TIMEOUT_S = 900
MAX_TRANSCRIPT_TOKENS = 40  # a 4-digit answer needs under 20; the cap stops hallucination loops on bad audio
TRANSCRIBE_BATCH_SIZE = 8
# Whisper's own decoding recipe (openai-whisper's transcribe defaults, with transformers' token-level compression
# threshold): a greedy transcript that repeats itself or is improbable is redone at rising temperatures. Every
# system, the espeak-ng ceilings included, is transcribed the same way.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 1.35
LOGPROB_THRESHOLD = -1.0
CEILING_VOICE, CEILING_SPEED, CEILING_PITCH = "en-us", 170, 50  # espeak-ng's defaults, a voice the model trained on
CEILINGS = ("espeak", "espeak_vocoded")
NO_SPEAKER = "none"

# Runs without this package: only the saved folder's code can answer.
SYNTHESIS_SCRIPT = """
import sys, time
import numpy as np, soundfile
from transformers import pipeline

folder, out_dir, speaker = sys.argv[1], sys.argv[2], sys.argv[3]
texts = sys.argv[4:]
tts = pipeline("text-to-audio", model=folder, trust_remote_code=True)
kwargs = {}
if speaker != "none":
    dim = tts.model.config.tts_speaker_embedding_dim
    kwargs["speaker_embeddings"] = np.eye(dim, dtype=np.float32)[int(speaker)]
started = time.perf_counter()
durations = []
for index, text in enumerate(texts):
    speech = tts(text, **kwargs)
    soundfile.write(f"{out_dir}/{index:03d}.wav", speech["audio"], speech["sampling_rate"])
    durations.append(len(speech["audio"]) / speech["sampling_rate"])
result = {"seconds": time.perf_counter() - started, "audio_seconds": sum(durations),
          "sampling_rate": speech["sampling_rate"], "model_class": type(tts.model).__name__,
          "pipeline_class": type(tts).__name__}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tts")
    add_flag(group, "--whisper", default="bundled:base", help="dense Whisper folder that listens, or bundled:<size>")
    add_flag(group, "--speaker", default=NO_SPEAKER, help="voice index for a one-hot speaker embedding, or none")
    add_flag(group, "--no_fallback", action="store_true", help="transcribe greedily only, no temperature fallback")
    add_flag(group, "--no_ceilings", action="store_true", help="score the models only, not espeak-ng's own audio")


def check_args(args: argparse.Namespace) -> None:
    if args.speaker != NO_SPEAKER and not args.speaker.isdigit():
        raise SystemExit(f"--speaker {args.speaker}: expected a voice index (0, 1, ...) or {NO_SPEAKER}")


def whisper_folder(name_or_path: str) -> str:
    """A dense Whisper folder: the path given, or `bundled:<size>` converted once into the cache."""
    if not name_or_path.startswith("bundled:"):
        return name_or_path
    from processing.convert_ct2 import bundled_checkpoint, convert_ct2

    size = name_or_path.split(":", 1)[1]
    folder = CACHE_DIR / f"whisper-{size}"
    if not (folder / "config.json").is_file():
        convert_ct2(bundled_checkpoint(size), folder)
    return str(folder)


def transcribe(paths: list[Path], whisper: str, fallback: bool = True) -> list[str]:
    """English transcripts of the clips with a dense Whisper folder through transformers' ASR pipeline: greedy, with
    Whisper's temperature fallback unless `fallback` is False."""
    from transformers import pipeline

    torch.manual_seed(0)  # the fallback samples
    asr = pipeline("automatic-speech-recognition", model=whisper, device="cpu")
    options = {"language": "en", "task": "transcribe", "max_new_tokens": MAX_TRANSCRIPT_TOKENS}
    if fallback:
        options |= {"temperature": FALLBACK_TEMPERATURES, "compression_ratio_threshold": COMPRESSION_RATIO_THRESHOLD,
                    "logprob_threshold": LOGPROB_THRESHOLD}  # fmt: skip
    outputs = asr([str(p) for p in paths], batch_size=TRANSCRIBE_BATCH_SIZE, generate_kwargs=options)
    return [output["text"].strip() for output in outputs]


def synthesise_with_model(model: str, texts: list[str], out_dir: Path, speaker: str) -> tuple[list[Path], dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(model).resolve()
    record = run_self_contained(SYNTHESIS_SCRIPT, folder, out_dir, speaker, *texts, cwd=out_dir,
                                timeout=SYNTHESIS_TIMEOUT_S)  # fmt: skip
    return [out_dir / f"{i:03d}.wav" for i in range(len(texts))], record


def synthesise_ceilings(texts: list[str], out_dir: Path) -> tuple[list[Path], list[Path]]:
    """espeak-ng's speech of each text, and the same speech after log-mel -> Griffin-Lim."""
    direct, vocoded = [], []
    for index, text in enumerate(texts):
        audio = speak(text, CEILING_VOICE, CEILING_SPEED, CEILING_PITCH)
        resynthesised = mel_to_waveform(log_mel_spectrogram(torch.from_numpy(audio))).numpy()
        direct.append(save_audio(out_dir / f"espeak-{index:03d}.wav", audio, SAMPLING_RATE))
        vocoded.append(save_audio(out_dir / f"vocoded-{index:03d}.wav", resynthesised, SAMPLING_RATE))
    return direct, vocoded


def score(name: str, references: list[str], transcripts: list[str]) -> dict:
    hypotheses = [to_digits(t) for t in transcripts]
    wer = digit_wer(references, hypotheses)
    print(f"{name}: digit WER {100 * wer:.1f}%")
    return {"wer": round(wer, 4), "exact_match": float(np.mean([r == h for r, h in zip(references, hypotheses)]))}


def transcribe_all(systems: dict[str, list[Path]], whisper: str, fallback: bool) -> dict[str, list[str]]:
    """Every system's transcripts, one process per system: single-threaded workers finish sooner on a shared
    machine than one process doing all in turn."""
    with ProcessPoolExecutor(max_workers=len(systems)) as pool:
        outputs = pool.map(transcribe, systems.values(), [whisper] * len(systems), [fallback] * len(systems))
        return dict(zip(systems, outputs))


def evaluate(models: Sequence[ModelRef], args: argparse.Namespace) -> dict:
    """Digit WER and exact match of every model's speech (and the ceilings'), as `--whisper` transcribes it."""
    sequences = held_out_sequences(or_default(args.num_sequences, DEFAULT_NUM_SEQUENCES), args.seed)
    if not all(is_held_out(s) for s in sequences):
        raise RuntimeError("held_out_sequences returned a sequence that training may contain")
    texts = [digits_to_words(s) for s in sequences]
    references = [" ".join(s) for s in sequences]
    whisper = whisper_folder(args.whisper)
    systems, synthesis = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = Path(args.audio_dir or scratch) / "tts"
        for index, model in enumerate(models):
            paths, synthesis[model.name] = synthesise_with_model(model.path, texts, out_dir / f"model-{index}",
                                                                 args.speaker)  # fmt: skip
            systems[model.name] = paths
        if not args.no_ceilings:
            systems.update(zip(CEILINGS, synthesise_ceilings(texts, out_dir)))
        started = time.perf_counter()
        transcripts = transcribe_all(systems, whisper, not args.no_fallback)
        transcribe_seconds = time.perf_counter() - started
    return {
        "models": {model.name: model.path for model in models},
        "whisper": args.whisper,
        "speaker": args.speaker,
        "whisper_decoding": "greedy" if args.no_fallback else f"temperature fallback {list(FALLBACK_TEMPERATURES)}",
        "num_sequences": len(sequences),
        "held_out_rule": "sha1(sequence) % 10 == 0; training sequences contain no held-out 4-digit window",
        "scores": {name: score(name, references, transcripts[name]) for name in transcripts},
        "synthesis": synthesis,
        "transcribe_seconds": round(transcribe_seconds, 1),
        "examples": [
            {"text": text, "reference": ref, **{name: transcripts[name][i] for name in transcripts}}
            for i, (text, ref) in enumerate(zip(texts, references))
        ],
    }


def markdown(report: dict) -> str:
    header = ["system", "Whisper digit WER %", "exact match %", "sequences"]
    rows = [[name, f"{100 * s['wer']:.1f}", f"{100 * s['exact_match']:.1f}", report["num_sequences"]]
            for name, s in report["scores"].items()]  # fmt: skip
    return markdown_table(header, rows)


EVALUATOR = Evaluator.of_module(
    __name__, "tts", "Whisper base's digit WER on held-out digit sequences each folder speaks (and espeak-ng ceilings)"
)
