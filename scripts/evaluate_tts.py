#!/usr/bin/env python
"""Intelligibility of a WhisperMoE text-to-speech folder: Whisper base transcribes its speech of held-out digits.

    python scripts/evaluate_tts.py --model outputs/tts-digits [--num_sequences 50] [--output results/tts-digits.json]

1. Synthesis runs from the saved folder alone: a fresh interpreter that cannot import this package calls
   `pipeline("text-to-audio", model=FOLDER, trust_remote_code=True)` on held-out 4-digit sequences (never in
   training, not even inside longer sequences) and writes .wav files.
2. Whisper base (converted from the bundled checkpoint, run through transformers) transcribes them; both the
   reference and the transcript are reduced to digit strings ("3, 1, 4, 1" and "three one four one" both give
   "3 1 4 1") and scored by word error rate over digits (jiwer).
3. Ceilings on the same sequences: espeak-ng's own speech of them, and that speech passed through log-mel and the
   Griffin-Lim vocoder (what a perfect mel prediction would score).
"""

import argparse
import json
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from modeling_whisper_moe.pipeline_text_to_audio import write_audio  # noqa: E402
from modeling_whisper_moe.vocoder import SAMPLING_RATE, log_mel_spectrogram, mel_to_waveform  # noqa: E402
from processing.tts_data import digits_to_words, espeak, held_out_sequences, is_held_out  # noqa: E402
from scripts.isolation import run_isolated  # noqa: E402

CACHE_DIR = Path.home() / ".cache" / "whisper-moe"
MAX_TRANSCRIPT_TOKENS = 40  # a 4-digit answer needs under 20; the cap stops hallucination loops on bad audio
# Whisper's own decoding recipe (openai-whisper's transcribe defaults, with transformers' token-level compression
# threshold): a greedy transcript that repeats itself or is improbable is redone at rising temperatures. Every
# system, the espeak-ng ceilings included, is transcribed the same way.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 1.35
LOGPROB_THRESHOLD = -1.0
CEILING_VOICE, CEILING_SPEED, CEILING_PITCH = "en-us", 170, 50  # espeak-ng's defaults, a voice the model trained on
DIGIT_PATTERN = re.compile(r"\d|\b(?:zero|oh|one|two|three|four|five|six|seven|eight|nine)\b")
WORD_DIGITS = {"oh": "0", **{w: str(i) for i, w in enumerate(digits_to_words("0123456789").split())}}

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


def to_digits(text: str) -> str:
    """'Three, 1 4... one!' -> '3 1 4 1': every digit and digit word, in order, as space-separated digits."""
    found = DIGIT_PATTERN.findall(text.lower())
    return " ".join(WORD_DIGITS.get(token, token) for token in found)


def digit_wer(references: list[str], hypotheses: list[str]) -> float:
    """Word error rate over digits; an empty transcript counts every reference digit as deleted."""
    import jiwer

    output = jiwer.process_words(references, [h if h else "<empty>" for h in hypotheses])
    errors = output.substitutions + output.deletions + output.insertions
    return errors / sum(len(reference.split()) for reference in references)


def whisper_folder(name_or_path: str) -> str:
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
    outputs = asr([str(p) for p in paths], batch_size=8, generate_kwargs=options)
    return [output["text"].strip() for output in outputs]


def synthesise_with_model(model: str, texts: list[str], out_dir: Path, speaker: str) -> tuple[list[Path], dict]:
    record = run_isolated(SYNTHESIS_SCRIPT, Path(model).resolve(), out_dir, speaker, *texts, cwd=out_dir)
    if record["leaked"]:
        raise RuntimeError(f"the saved folder imported the package: {record['leaked']}")
    return [out_dir / f"{i:03d}.wav" for i in range(len(texts))], record


def synthesise_ceilings(texts: list[str], out_dir: Path) -> tuple[list[Path], list[Path]]:
    """espeak-ng's speech of each text, and the same speech after log-mel -> Griffin-Lim."""
    direct, vocoded = [], []
    for index, text in enumerate(texts):
        audio = espeak(text, CEILING_VOICE, CEILING_SPEED, CEILING_PITCH)
        resynthesised = mel_to_waveform(log_mel_spectrogram(torch.from_numpy(audio))).numpy()
        direct.append(write_audio(out_dir / f"espeak-{index:03d}.wav", audio, SAMPLING_RATE))
        vocoded.append(write_audio(out_dir / f"vocoded-{index:03d}.wav", resynthesised, SAMPLING_RATE))
    return direct, vocoded


def score(name: str, references: list[str], transcripts: list[str]) -> dict:
    hypotheses = [to_digits(t) for t in transcripts]
    wer = digit_wer(references, hypotheses)
    print(f"{name}: digit WER {100 * wer:.1f}%")
    return {"wer": round(wer, 4), "exact_match": float(np.mean([r == h for r, h in zip(references, hypotheses)]))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved WhisperMoE text-to-speech folder")
    parser.add_argument("--whisper", default="bundled:base", help="dense Whisper folder, or bundled:<size>")
    parser.add_argument("--num_sequences", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speaker", default="none", help="voice index for a one-hot speaker embedding, or none")
    parser.add_argument("--output", default=str(REPO_ROOT / "results" / "tts-digits.json"))
    parser.add_argument("--audio_dir", default=None, help="keep the synthesised audio here (default: temporary)")
    parser.add_argument("--no_fallback", action="store_true", help="transcribe greedily only, no temperature fallback")
    parser.add_argument("--no_ceilings", action="store_true", help="score the model only, not espeak-ng's own audio")
    args = parser.parse_args(argv)

    sequences = held_out_sequences(args.num_sequences, args.seed)
    assert all(is_held_out(s) for s in sequences)
    texts = [digits_to_words(s) for s in sequences]
    references = [" ".join(s) for s in sequences]
    whisper = whisper_folder(args.whisper)
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = Path(args.audio_dir or scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        model_paths, synthesis = synthesise_with_model(args.model, texts, out_dir, args.speaker)
        systems = {"model": model_paths}
        if not args.no_ceilings:
            systems["espeak"], systems["espeak_vocoded"] = synthesise_ceilings(texts, out_dir)
        started = time.perf_counter()
        # one process per system: three single-threaded workers finish sooner than one on a shared machine
        with ProcessPoolExecutor(max_workers=len(systems)) as pool:
            fallback = [not args.no_fallback] * len(systems)
            outputs = pool.map(transcribe, systems.values(), [whisper] * len(systems), fallback)
            transcripts = dict(zip(systems, outputs))
        transcribe_seconds = time.perf_counter() - started
    results = {
        "model": str(args.model),
        "whisper": args.whisper,
        "speaker": args.speaker,
        "whisper_decoding": "greedy" if args.no_fallback else f"temperature fallback {list(FALLBACK_TEMPERATURES)}",
        "num_sequences": len(sequences),
        "held_out_rule": "sha1(sequence) % 10 == 0; training sequences contain no held-out 4-digit window",
        "scores": {name: score(name, references, transcripts[name]) for name in transcripts},
        "synthesis": {k: v for k, v in synthesis.items() if k != "leaked"},
        "transcribe_seconds": round(transcribe_seconds, 1),
        "examples": [
            {"text": text, "reference": ref, **{name: transcripts[name][i] for name in transcripts}}
            for i, (text, ref) in enumerate(zip(texts, references))
        ],
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    temporary.replace(output)
    print(f"wrote {output}")
    return results


if __name__ == "__main__":
    main()
