#!/usr/bin/env python
"""Speech translation (any language -> English), language identification and multilingual transcription of a
WhisperMoE folder, next to faster-whisper running the same weights.

Speech is synthesised with espeak-ng from a seeded sample of Tatoeba sentences (German and French by default, several
espeak voices in turn), decoded once to 16 kHz and written as FLAC, so both systems read identical samples. Then:

  (a) the WhisperMoE folder runs through `pipeline("automatic-speech-recognition", trust_remote_code=True)` in a
      fresh interpreter that cannot import this package (only the folder's own code answers), language left to
      detection, greedy decoding, `generate_kwargs={"task": ...}`;
  (b) faster-whisper runs a CTranslate2 checkpoint (default: the bundled OpenAI base) with the same task, one beam,
      temperature 0, no timestamps, no VAD.

Reported per system: chrF and BLEU (sacrebleu, corpus level) of the translations against Tatoeba's English, chrF of
the transcriptions against the source sentences, and language-identification accuracy; and how closely the two
systems agree: the difference of their chrF scores, chrF of one against the other, and the share of identical
outputs. The upcycled model computes exactly what its dense source does, so the two should agree up to floating
point: synthetic speech that Whisper finds hard makes near-ties, and near-ties are where they can part.

    python scripts/evaluate_speech_translation.py --model /work/cache/whisper-moe-base-8x2 \\
        --output-json results/speech-translation-base.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from modeling_whisper_moe.audio import SAMPLING_RATE, load_audio, save_audio  # noqa: E402
from scripts.isolation import run_isolated  # noqa: E402

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "translation"
DEFAULT_LANGUAGES = ("de", "fr")
DEFAULT_PER_LANGUAGE = 40
DEFAULT_SEED = 0
TASKS = ("translate", "transcribe")
# espeak-ng voices in turn (language + variant: male m3, female f2, the klatt formant synthesiser), so the sample is
# not one synthetic speaker.
VOICES = {
    "de": ("de", "de+m3", "de+f2", "de+klatt"),
    "fr": ("fr", "fr+m3", "fr+f2", "fr+klatt"),
}
SPEECH_RATE_WPM = 150  # espeak-ng's default of 175 words per minute is hurried
# Sentences of 4-20 words: long enough to carry content, short enough for one 30 s window.
MIN_WORDS, MAX_WORDS = 4, 20
ESPEAK = "espeak-ng"
# A 20-word sentence is under 60 tokens; the cap stops a looping hallucination (both systems get the same cap).
MAX_NEW_TOKENS = 128
WINDOW_SAMPLES = 30 * SAMPLING_RATE  # Whisper's 30 s input window

MOE_SCRIPT = """
from transformers import pipeline

folder, manifest, tasks, max_new_tokens = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
paths = json.loads(open(manifest, encoding="utf-8").read())
asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
result = {"pipeline": type(asr).__name__, "model_module": type(asr.model).__module__, "outputs": {}}
for task in tasks:
    rows = []
    generate_kwargs = {"task": task, "num_beams": 1, "max_new_tokens": max_new_tokens}
    for path in paths:
        out = asr(path, return_language=True, generate_kwargs=generate_kwargs)
        rows.append({"text": out["text"], "language": out["chunks"][0]["language"] if out.get("chunks") else None})
    result["outputs"][task] = rows
"""


@dataclass
class Clip:
    id: str
    language: str  # ISO 639-1 code of the spoken sentence
    voice: str
    source: str  # the sentence spoken
    english: str  # Tatoeba's English translation, the reference
    path: str = ""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved WhisperMoE folder (multilingual, e.g. upcycled base)")
    parser.add_argument("--faster-whisper", help="CTranslate2 checkpoint folder (default: the bundled base)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of tatoeba_en_<lang>.csv")
    parser.add_argument("--languages", nargs="+", default=list(DEFAULT_LANGUAGES), choices=sorted(VOICES))
    parser.add_argument("--per-language", type=int, default=DEFAULT_PER_LANGUAGE, help="sentences per language")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the sentence sample")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--audio-dir", type=Path, help="keep the synthesised FLAC files here (default: temporary)")
    parser.add_argument("--output-json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if args.per_language < 1:
        parser.error(f"--per-language must be at least 1, got {args.per_language}")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json; expected a saved WhisperMoE folder")
    if shutil.which(ESPEAK) is None:
        parser.error(f"{ESPEAK} not found: apt-get install -y espeak-ng")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def sample_sentences(data_dir: Path, language: str, count: int, seed: int) -> list[Clip]:
    """A seeded sample of `count` Tatoeba pairs of `language` with MIN_WORDS..MAX_WORDS words; voices in turn."""
    path = data_dir / f"tatoeba_en_{language}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"No Tatoeba file for {language!r} at {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if MIN_WORDS <= len(row[language].split()) <= MAX_WORDS]
    if len(rows) < count:
        raise ValueError(f"{path} has {len(rows)} usable sentences, fewer than the {count} asked for")
    chosen = random.Random(f"{seed}-{language}").sample(rows, count)
    voices = VOICES[language]
    return [
        Clip(row["id"], language, voices[index % len(voices)], row[language], row["en"])
        for index, row in enumerate(chosen)
    ]


def synthesise(clips: list[Clip], audio_dir: Path) -> None:
    """Speak each clip with espeak-ng and store it as 16 kHz FLAC (sets `clip.path`)."""
    audio_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for clip in clips:
            wav = Path(scratch) / f"{clip.id}.wav"
            command = [ESPEAK, "-v", clip.voice, "-s", str(SPEECH_RATE_WPM), "-w", str(wav), clip.source]
            subprocess.run(command, check=True, capture_output=True)
            # resampled once here, so neither system's own resampler makes a difference
            clip.path = str(save_audio(audio_dir / f"{clip.id}.flac", load_audio(wav, SAMPLING_RATE), SAMPLING_RATE))


# ---------------------------------------------------------------------------------------------------------------
# Systems
# ---------------------------------------------------------------------------------------------------------------


def run_moe(model: str, clips: list[Clip], tasks: Sequence[str], workdir: Path) -> dict:
    """Outputs of the folder's ASR pipeline, run where this package cannot be imported."""
    manifest = workdir / "paths.json"
    manifest.write_text(json.dumps([clip.path for clip in clips]), encoding="utf-8")
    folder = Path(model).resolve()
    result = run_isolated(MOE_SCRIPT, folder, manifest, ",".join(tasks), MAX_NEW_TOKENS, cwd=workdir, timeout=None)
    if result["leaked"]:
        raise RuntimeError(f"the folder's code imported the package: {result['leaked']}")
    names = {name: code for code, name in _language_names().items()}
    for rows in result["outputs"].values():
        for row in rows:
            row["language"] = names.get(row["language"], row["language"])  # "german" -> "de"
    return result


def run_faster_whisper(ct2_dir: str, clips: list[Clip], tasks: Sequence[str], pad_to_window: bool) -> dict:
    """faster-whisper's outputs. It pads the log-mel of a short clip with zeros up to 30 s, where OpenAI's Whisper
    and transformers pad the audio with silence; `pad_to_window` pads the audio first, so that the encoder sees
    exactly what the transformers pipeline gives it and only the implementations differ."""
    from faster_whisper import WhisperModel

    model = WhisperModel(ct2_dir, device="cpu", compute_type="float32", cpu_threads=os.cpu_count() or 0)
    options = dict(beam_size=1, best_of=1, temperature=0.0, without_timestamps=True, vad_filter=False)
    options["max_new_tokens"] = MAX_NEW_TOKENS
    outputs = {}
    for task in tasks:
        rows = []
        for clip in clips:
            audio = load_audio(clip.path, SAMPLING_RATE)
            if pad_to_window:
                audio = np.pad(audio, (0, max(0, WINDOW_SAMPLES - len(audio))))
            segments, info = model.transcribe(audio, task=task, **options)
            rows.append({"text": "".join(segment.text for segment in segments), "language": info.language})
        outputs[task] = rows
    return {"outputs": outputs}


def _language_names() -> dict[str, str]:
    """Whisper's language codes -> the names its tokenizer reports ("de" -> "german")."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return dict(LANGUAGES)


# ---------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------


def text_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu

    return {
        "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2),
    }


def system_scores(clips: list[Clip], outputs: dict[str, list[dict]]) -> dict:
    """Scores of one system, overall and per language."""
    scores = {}
    for language in ["all", *sorted({clip.language for clip in clips})]:
        keep = [i for i, clip in enumerate(clips) if language in ("all", clip.language)]
        entry = {"clips": len(keep)}
        for task, rows in outputs.items():
            references = [clips[i].english if task == "translate" else clips[i].source for i in keep]
            entry[task] = text_scores([rows[i]["text"].strip() for i in keep], references)
        first = next(iter(outputs.values()))  # the language is detected the same way for every task
        entry["language_accuracy"] = round(sum(first[i]["language"] == clips[i].language for i in keep) / len(keep), 4)
        scores[language] = entry
    return scores


def agreement(moe: dict[str, list[dict]], reference: dict[str, list[dict]], ours: dict, theirs: dict) -> dict:
    """How closely the WhisperMoE outputs (`moe`, scored `ours`) follow a reference system's, per task."""
    import sacrebleu

    result = {}
    for task in moe:
        hypotheses = [row["text"].strip() for row in moe[task]]
        references = [row["text"].strip() for row in reference[task]]
        result[task] = {
            "chrf_difference": round(ours["all"][task]["chrf"] - theirs["all"][task]["chrf"], 2),
            "chrf_against_it": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
            "identical_outputs": round(sum(a == b for a, b in zip(hypotheses, references)) / len(hypotheses), 4),
            "same_language": round(
                sum(a["language"] == b["language"] for a, b in zip(moe[task], reference[task])) / len(hypotheses), 4
            ),
        }
    return result


def markdown(report: dict) -> str:
    """Scores per system and language, then the agreement of WhisperMoE with each faster-whisper run."""
    tasks = [task for task in TASKS if task in report["systems"]["whisper-moe"]["all"]]
    metrics = [f"{task} {metric}" for task in tasks for metric in ("chrF", "BLEU")]
    header = ["system", "language", *metrics, "language ID"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, scores in report["systems"].items():
        for language, entry in scores.items():
            cells = [name, f"{language} ({entry['clips']})"]
            cells += [entry[task][metric] for task in tasks for metric in ("chrf", "bleu")]
            lines.append("| " + " | ".join(map(str, [*cells, f"{100 * entry['language_accuracy']:.1f} %"])) + " |")
    lines += ["", "| WhisperMoE vs | task | chrF difference | chrF against it | identical outputs | same language |"]
    lines.append("|---|---|---|---|---|---|")
    for name, per_task in report["agreement"].items():
        for task, entry in per_task.items():
            cells = [name, task, entry["chrf_difference"], entry["chrf_against_it"]]
            cells += [f"{100 * entry['identical_outputs']:.1f} %", f"{100 * entry['same_language']:.1f} %"]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def write_text(path: Path, text: str) -> None:
    """Atomic: a temporary sibling renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def evaluate(args: argparse.Namespace, workdir: Path) -> dict:
    from processing.convert_ct2 import bundled_checkpoint

    clips = [
        clip
        for language in args.languages
        for clip in sample_sentences(args.data_dir, language, args.per_language, args.seed)
    ]
    synthesise(clips, args.audio_dir or workdir / "audio")
    ct2_dir = args.faster_whisper or str(bundled_checkpoint("base"))
    timings = {}
    start = time.perf_counter()
    moe = run_moe(args.model, clips, args.tasks, workdir)
    timings["whisper-moe"] = round(time.perf_counter() - start, 1)
    runs = {"whisper-moe": moe}
    for name, pad in (("faster-whisper", False), ("faster-whisper-padded-audio", True)):
        start = time.perf_counter()
        runs[name] = run_faster_whisper(ct2_dir, clips, args.tasks, pad_to_window=pad)
        timings[name] = round(time.perf_counter() - start, 1)
    systems = {name: system_scores(clips, run["outputs"]) for name, run in runs.items()}
    return {
        "setup": {
            "model": str(args.model),
            "faster_whisper": ct2_dir,
            "languages": args.languages,
            "per_language": args.per_language,
            "seed": args.seed,
            "voices": {language: VOICES[language] for language in args.languages},
            "speech_rate_wpm": SPEECH_RATE_WPM,
            "decoding": "greedy, no timestamps, language detected; faster-whisper temperature 0, no VAD",
            "max_new_tokens": MAX_NEW_TOKENS,
            "whisper_moe_pipeline": [moe["pipeline"], moe["model_module"]],
            "package_importable_in_whisper_moe_run": False,
            "wall_seconds": timings,
        },
        "systems": systems,
        "agreement": {
            name: agreement(moe["outputs"], runs[name]["outputs"], systems["whisper-moe"], systems[name])
            for name in ("faster-whisper", "faster-whisper-padded-audio")
        },
        "clips": [
            {
                **{key: value for key, value in asdict(clip).items() if key != "path"},
                **{f"whisper_moe_{task}": moe["outputs"][task][i] for task in args.tasks},
                **{
                    f"{name.replace('-', '_')}_{task}": runs[name]["outputs"][task][i]
                    for name in runs
                    if name != "whisper-moe"
                    for task in args.tasks
                },
            }
            for i, clip in enumerate(clips)
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="speech-translation-") as workdir:
        report = evaluate(args, Path(workdir))
    print(markdown(report))
    if args.output_json:
        write_text(args.output_json, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        write_text(args.output_json.with_suffix(".md"), markdown(report))
        print(f"Wrote {args.output_json} and its .md table", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
