"""Sign language to text, in the mode the folder was trained for (its training record's `sign_corpus`).

Fingerspelling: character and word error rates on fingerspelled words no training run spelled, with the per-letter
confusion matrix. The words are the held-out ones (`sign_data.is_held_out`) of the folder's training record's word
lists, each composed once from the lexicon with this evaluation's own seed (other trims, speeds, transitions and camera
than any training draw), and read through the folder's `video-to-text` pipeline, as a user's keypoints would be. A
folder trained on rendered video (`sign_frontend=patches`) gets each word drawn as RGB frames the way its training run
drew them (processing/sign_video.py): rendered skeletons, not camera video.

Isolated signs (INCLUDE, WLASL): top-1 gloss accuracy per split of the corpus (every split, or `--sign_splits`), each
recorded clip read once through the pipeline as it is (no augmentation), a reading correct when it is the gloss after
`gloss_key` (case, spaces, punctuation dropped). `--sign_root` points at the corpus when it moved since training;
`--limit` keeps the first N clips of each split.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from processing.evaluation.common import Evaluator, ModelRef, add_flag, markdown_table
from processing.sign_corpora import fit_frames, sample_clip
from processing.sign_data import Augmentation, compose, read_lexicon, split_words, words_from_sentences
from processing.sign_video import Rendering, render_pose, rendering_of
from processing.tasks.video_to_text import gloss_key, letters_only, read_corpus

REPO_ROOT = Path(__file__).resolve().parents[2]
DELETED, INSERTED = "<del>", "<ins>"
EXAMPLES = 20  # hypotheses kept per system in the report
MAX_GLOSS_TOKENS = 12  # a gloss is a word or three ("small little"); a looping model stops here
CORPUS_SPLITS = {"include": ("train", "test"), "wlasl": ("train", "val", "test")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("video_to_text")
    add_flag(group, "--sign_words", type=int, default=300, help="held-out words to spell (video_to_text)")
    add_flag(group, "--sign_seed", type=int, default=1234, help="seed of their composition (video_to_text)")
    add_flag(group, "--sign_splits", help="isolated signs: comma-separated splits to score (default: every split)")
    add_flag(group, "--sign_root", help="isolated signs: the corpus's keypoint folder, if not the training one")


def check_args(args: argparse.Namespace) -> None:
    if args.sign_words < 1:
        raise SystemExit(f"--sign_words must be at least 1, got {args.sign_words}")


def alignment(reference: str, hypothesis: str) -> list[tuple[str, str]]:
    """Levenshtein alignment as (reference letter or INSERTED, hypothesis letter or DELETED) pairs."""
    rows, cols = len(reference) + 1, len(hypothesis) + 1
    cost = np.zeros((rows, cols), dtype=int)
    cost[:, 0], cost[0, :] = range(rows), range(cols)
    for i in range(1, rows):
        for j in range(1, cols):
            cost[i, j] = min(cost[i - 1, j] + 1, cost[i, j - 1] + 1,
                             cost[i - 1, j - 1] + (reference[i - 1] != hypothesis[j - 1]))  # fmt: skip
    pairs, i, j = [], rows - 1, cols - 1
    while i or j:
        if i and j and cost[i, j] == cost[i - 1, j - 1] + (reference[i - 1] != hypothesis[j - 1]):
            pairs.append((reference[i - 1], hypothesis[j - 1]))
            i, j = i - 1, j - 1
        elif i and cost[i, j] == cost[i - 1, j] + 1:
            pairs.append((reference[i - 1], DELETED))
            i -= 1
        else:
            pairs.append((INSERTED, hypothesis[j - 1]))
            j -= 1
    return pairs[::-1]


def score(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """CER / WER in percent over letters, and the confusion counts {reference letter: {what was read: count}}."""
    confusion: dict[str, Counter] = defaultdict(Counter)
    errors = letters = 0
    for reference, hypothesis in zip(references, hypotheses):
        for truth, read in alignment(reference, letters_only(hypothesis)):
            confusion[truth][read] += 1
            errors += truth != read
        letters += len(reference)
    wrong_words = sum(reference != letters_only(hypothesis) for reference, hypothesis in zip(references, hypotheses))
    return {"cer": 100 * errors / max(letters, 1), "wer": 100 * wrong_words / max(len(references), 1),
            "confusion": {truth: dict(counts) for truth, counts in sorted(confusion.items())}}  # fmt: skip


def held_out_words(model: ModelRef, args: argparse.Namespace) -> tuple[list[str], dict]:
    record = model.training_record() or {}
    data = record.get("data") or {}
    if not data.get("sign_words_csv"):
        raise SystemExit(f"{model.path}: its training record names no sign_words_csv (not a video_to_text folder)")
    lexicon = read_lexicon(data.get("signed_language", "ase"))
    csvs = [path if Path(path).is_absolute() else REPO_ROOT / path for path in data["sign_words_csv"]]
    _, held_out = split_words(words_from_sentences(csvs), set(lexicon))
    rng = np.random.default_rng(args.sign_seed)
    return [
        held_out[i] for i in rng.choice(len(held_out), min(args.sign_words, len(held_out)), replace=False)
    ], lexicon


def rendered_video(model: ModelRef) -> Rendering | None:
    """The rendering a folder trained with `sign_frontend=patches` learnt from (its training record's), else None."""
    data = (model.training_record() or {}).get("data") or {}
    return rendering_of(data) if data.get("sign_frontend") == "patches" else None


def isolated_corpus(model: ModelRef, args: argparse.Namespace) -> argparse.Namespace | None:
    """The isolated-sign corpus settings of the folder's training record (None: a fingerspelling folder)."""
    data = (model.training_record() or {}).get("data") or {}
    if data.get("sign_corpus", "fingerspelling") == "fingerspelling":
        return None
    settings = argparse.Namespace(**data)
    for name in ("sign_root", "wlasl_json", "wlasl_subset_json"):
        path = getattr(settings, name)
        if path and not Path(path).is_absolute() and not Path(path).exists():
            setattr(settings, name, str(REPO_ROOT / path))  # recipes name paths from the repository's root
    settings.sign_root = args.sign_root or settings.sign_root
    return settings


def evaluate_isolated(model: ModelRef, corpus: argparse.Namespace, args: argparse.Namespace) -> dict:
    """Top-1 gloss accuracy of `model` on each split of its isolated-sign corpus."""
    from transformers import pipeline

    signer = pipeline("video-to-text", model=model.path, trust_remote_code=True)
    max_frames = signer.model.config.max_source_positions
    splits = args.sign_splits.split(",") if args.sign_splits else CORPUS_SPLITS[corpus.sign_corpus]
    system, start = (
        {"name": model.name, "corpus": corpus.sign_corpus, "splits": {}, "examples": []},
        time.perf_counter(),
    )
    for split in splits:
        samples = read_corpus(corpus, split).samples[: args.limit]
        correct = 0
        for sample in samples:
            keypoints, visible = fit_frames(*sample_clip(sample), max_frames)
            read = signer({"keypoints": keypoints, "visible": visible}, max_new_tokens=MAX_GLOSS_TOKENS)["text"]
            correct += gloss_key(read) == gloss_key(sample.gloss)
            if len(system["examples"]) < EXAMPLES:
                system["examples"].append({"split": split, "gloss": sample.gloss, "read": read})
        system["splits"][split] = {"accuracy": 100 * correct / len(samples), "correct": correct, "clips": len(samples)}
    return {**system, "seconds": round(time.perf_counter() - start, 1)}


def evaluate(models: Sequence[ModelRef], args: argparse.Namespace) -> dict:
    from transformers import pipeline

    corpora = {model.name: isolated_corpus(model, args) for model in models}
    if any(corpora.values()):
        if not all(corpora.values()):
            raise SystemExit("video_to_text: score fingerspelling folders and isolated-sign folders in separate runs")
        return {"mode": "isolated", "systems": [evaluate_isolated(m, corpora[m.name], args) for m in models]}
    report = {"words": args.sign_words, "seed": args.sign_seed, "systems": []}
    for model in models:
        words, lexicon = held_out_words(model, args)
        signer = pipeline("video-to-text", model=model.path, trust_remote_code=True)
        start, hypotheses = time.perf_counter(), []
        rendering = rendered_video(model)
        for index, word in enumerate(words):
            keypoints, visible = compose(word, lexicon, np.random.default_rng([args.sign_seed, index]), Augmentation())
            if rendering is None:
                hypotheses.append(signer({"keypoints": keypoints, "visible": visible})["text"])
            else:  # the folder reads RGB video: the word drawn as its training run drew words
                hypotheses.append(signer(render_pose(keypoints, visible, rendering))["text"])
        seconds = time.perf_counter() - start
        examples = [{"word": w, "read": h} for w, h in zip(words[:EXAMPLES], hypotheses[:EXAMPLES])]
        report["systems"].append({"name": model.name, **score(words, hypotheses), "seconds": round(seconds, 1),
                                  "held_out_words": len(words), "examples": examples})  # fmt: skip
    return report


def markdown(report: dict) -> str:
    if report.get("mode") == "isolated":
        rows = [[s["name"], s["corpus"], split, f"{scores['accuracy']:.2f}", scores["clips"]]
                for s in report["systems"] for split, scores in s["splits"].items()]  # fmt: skip
        return markdown_table(["system", "corpus", "split", "top-1 %", "clips"], rows)
    header = ["system", "CER %", "word error %", "words", "seconds"]
    rows = [[s["name"], f"{s['cer']:.2f}", f"{s['wer']:.2f}", s["held_out_words"], s["seconds"]]
            for s in report["systems"]]  # fmt: skip
    lines = [markdown_table(header, rows)]
    for system in report["systems"]:
        confused = sorted(((count, truth, read) for truth, reads in system["confusion"].items()
                           for read, count in reads.items() if truth != read), reverse=True)[:10]  # fmt: skip
        pairs = ", ".join(f"{truth}->{read} {count}" for count, truth, read in confused) or "none"
        lines.append(f"\n{system['name']}: most frequent confusions (letter -> read as): {pairs}")
    return "\n".join(lines)


EVALUATOR = Evaluator.of_module(
    __name__,
    "video_to_text",
    "CER / word error and the letter confusions on held-out fingerspelled words; top-1 gloss accuracy "
    "per split for isolated signs (INCLUDE, WLASL)",
)
