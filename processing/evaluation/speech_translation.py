"""The `speech_translation` task: speech translation (any language -> English), language identification and
multilingual transcription of WhisperMoE folders, next to faster-whisper running the same weights.

Speech is synthesised with espeak-ng from a seeded sample of Tatoeba sentences (German and French by default, several
espeak voices in turn), decoded once to 16 kHz and written as FLAC, so both systems read identical samples. Then:

  (a) each WhisperMoE folder runs through `pipeline("automatic-speech-recognition", trust_remote_code=True)` in a
      fresh interpreter that cannot import this package (only the folder's own code answers), language left to
      detection, greedy decoding, `generate_kwargs={"task": ...}` for each of `--whisper_tasks`;
  (b) faster-whisper runs a CTranslate2 checkpoint (`--faster_whisper`, default: the bundled OpenAI base) with the
      same task, one beam, temperature 0, no timestamps, no VAD.

Reported per system: chrF and BLEU (sacrebleu, corpus level) of the translations against Tatoeba's English, chrF of
the transcriptions against the source sentences, and language-identification accuracy; and how closely the two
systems agree: the difference of their chrF scores, chrF of one against the other, and the share of identical
outputs. The upcycled model computes exactly what its dense source does, so the two should agree up to floating
point: synthetic speech that Whisper finds hard makes near-ties, and near-ties are where they can part.

    python scripts/evaluate.py --tasks speech_translation --model /work/cache/whisper-moe-base-8x2 \\
        --output_json results/speech-translation-base.json --output_md results/speech-translation-base.md
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from modeling_whisper_moe.audio import load_audio, save_audio
from modeling_whisper_moe.features import N_SAMPLES, SAMPLING_RATE
from processing.espeak import ESPEAK_MISSING, espeak_installed, speak
from processing.evaluation.common import Evaluator, ModelRef, add_flag
from processing.isolation import run_self_contained
from processing.metrics import bleu_chrf

REPO_ROOT = Path(__file__).resolve().parents[2]

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
# A 20-word sentence is under 60 tokens; the cap stops a looping hallucination (both systems get the same cap).
MAX_NEW_TOKENS = 128
FASTER_WHISPER_RUNS = {"faster-whisper": False, "faster-whisper-padded-audio": True}  # name: audio padded to 30 s

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speech_translation")
    add_flag(group, "--tatoeba_dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of tatoeba_en_<lang>.csv")
    add_flag(group, "--languages", nargs="+", default=list(DEFAULT_LANGUAGES), choices=sorted(VOICES))
    add_flag(group, "--per_language", type=int, default=DEFAULT_PER_LANGUAGE, help="sentences per language")
    add_flag(group, "--whisper_tasks", nargs="+", default=list(TASKS), choices=TASKS, help="Whisper's task tokens")


def check_args(args: argparse.Namespace) -> None:
    if args.per_language < 1:
        raise SystemExit(f"--per_language must be at least 1, got {args.per_language}")
    for model in args.model:
        if not (Path(model.path) / "config.json").is_file():
            raise SystemExit(f"--model {model.path}: no config.json; expected a saved WhisperMoE folder")
    if not espeak_installed():
        raise SystemExit(ESPEAK_MISSING)


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
    for clip in clips:
        # resampled once here, so neither system's own resampler makes a difference
        audio = speak(clip.source, clip.voice, speed=SPEECH_RATE_WPM, sampling_rate=SAMPLING_RATE)
        clip.path = str(save_audio(audio_dir / f"{clip.id}.flac", audio, SAMPLING_RATE))


# ---------------------------------------------------------------------------------------------------------------
# Systems
# ---------------------------------------------------------------------------------------------------------------


def run_moe(model: str, clips: list[Clip], tasks: Sequence[str], workdir: Path) -> dict:
    """Outputs of the folder's ASR pipeline, run where this package cannot be imported."""
    manifest = workdir / "paths.json"
    manifest.write_text(json.dumps([clip.path for clip in clips]), encoding="utf-8")
    folder = Path(model).resolve()
    run = (manifest, ",".join(tasks), MAX_NEW_TOKENS)
    result = run_self_contained(MOE_SCRIPT, folder, *run, cwd=workdir, timeout=None)
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
                audio = np.pad(audio, (0, max(0, N_SAMPLES - len(audio))))
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
    scores = bleu_chrf(hypotheses, references)
    return {"chrf": scores["chrf"], "bleu": scores["bleu"]}


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
# Evaluator
# ---------------------------------------------------------------------------------------------------------------


def sample_clips(args: argparse.Namespace, workdir: Path) -> list[Clip]:
    """The seeded sentence sample of every `--languages`, spoken and stored as FLAC."""
    clips = [
        clip
        for language in args.languages
        for clip in sample_sentences(args.tatoeba_dir, language, args.per_language, args.seed)
    ]
    synthesise(clips, Path(args.audio_dir) / "speech_translation" if args.audio_dir else workdir / "audio")
    return clips


def faster_whisper_runs(ct2_dir: str, clips: list[Clip], tasks: Sequence[str]) -> tuple[dict, dict]:
    """faster-whisper's outputs on the clips as they are and padded to 30 s, and their wall times."""
    runs, timings = {}, {}
    for name, pad in FASTER_WHISPER_RUNS.items():
        start = time.perf_counter()
        runs[name] = run_faster_whisper(ct2_dir, clips, tasks, pad_to_window=pad)
        timings[name] = round(time.perf_counter() - start, 1)
    return runs, timings


def model_report(model: ModelRef, args, clips: list[Clip], reference: tuple[str, dict, dict], workdir: Path) -> dict:
    """One folder's scores, its agreement with each faster-whisper run, and every clip's outputs."""
    ct2_dir, reference_runs, timings = reference
    start = time.perf_counter()
    moe = run_moe(model.path, clips, args.whisper_tasks, workdir)
    timings = {"whisper-moe": round(time.perf_counter() - start, 1), **timings}
    runs = {"whisper-moe": moe, **reference_runs}
    systems = {name: system_scores(clips, run["outputs"]) for name, run in runs.items()}
    return {
        "setup": {
            "model": str(model.path),
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
            for name in FASTER_WHISPER_RUNS
        },
        "clips": [clip_outputs(clip, i, runs, args.whisper_tasks) for i, clip in enumerate(clips)],
    }


def clip_outputs(clip: Clip, index: int, runs: dict[str, dict], tasks: Sequence[str]) -> dict:
    """A clip's sentence, voice and language, and each system's output of each task."""
    entry = {key: value for key, value in asdict(clip).items() if key != "path"}
    for name, run in runs.items():
        prefix = name.replace("-", "_")
        entry.update({f"{prefix}_{task}": run["outputs"][task][index] for task in tasks})
    return entry


def evaluate(models: Sequence[ModelRef], args: argparse.Namespace) -> dict:
    """Every folder on the same synthesised clips, each next to faster-whisper (run once): {"models": {name: ...}}."""
    from processing.convert_ct2 import bundled_checkpoint

    with tempfile.TemporaryDirectory(prefix="speech-translation-") as tmp:
        workdir = Path(tmp)
        clips = sample_clips(args, workdir)
        ct2_dir = args.faster_whisper or str(bundled_checkpoint("base"))
        reference = (ct2_dir, *faster_whisper_runs(ct2_dir, clips, args.whisper_tasks))
        return {"models": {model.name: model_report(model, args, clips, reference, workdir) for model in models}}


def markdown_all(report: dict) -> str:
    """Each folder's tables; headed by the folder's name when there are several."""
    models = report["models"]
    if len(models) == 1:
        return markdown(next(iter(models.values()))).rstrip("\n")
    return "\n\n".join(f"**{name}**\n\n{markdown(entry)}".rstrip("\n") for name, entry in models.items())


EVALUATOR = Evaluator.of_module(
    __name__,
    "asr",
    "speech translation, language ID and transcription of espeak-ng Tatoeba speech vs faster-whisper",
    markdown=markdown_all,
)
