"""Pseudo-labels: a model's own greedy transcripts of audio, written once to a manifest on disk.

Two kinds of training use them: lifelong replay (the previous model labels general audio, processing/lifelong.py)
and distillation (the teacher labels its student's training audio, processing/distillation.py). The manifest is a
CSV `path,text,reference,wer`: the clip (absolute path), the model's transcript, the clip's own transcript when it
has one (empty for unlabeled audio) and the model's WER against it in percent after Whisper's English normalisation
(empty without a reference).

Labelling is resumable: each finished batch is appended to a progress file beside the manifest (one JSON line per
clip, flushed and synced), a rerun labels only the clips not listed there, and the manifest is rewritten atomically
(a staging file, then a rename) once every clip has its label.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jiwer
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from modeling_whisper_moe.audio import load_audio
from modeling_whisper_moe.hub import atomic_write
from processing.data import SPEAKER_COLUMN, SPLIT_COLUMN, read_manifest
from processing.metrics import PERCENT, Normalizer

PSEUDO_LABEL_BATCH = 8  # clips a model transcribes at once when labelling
PROMPT_AND_END_TOKENS = 5  # <|startoftranscript|>[<|lang|><|task|>]<|notimestamps|> and <|endoftext|> of a label
EVALUATION_SPLITS = ("test", "validation", "dev")  # rows of a manifest's split column no training label takes
MANIFEST_COLUMNS = ("path", "text", "reference", "wer")
PROGRESS_SUFFIX = ".progress.jsonl"
WER_DECIMALS = 2
logger = logging.getLogger(__name__)

# the encoder output (batch, positions, d_model) of the clips at these paths, e.g. read from a cache
EncoderStates = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class Clip:
    """Audio to label: an absolute path, and the clip's own transcript ("" when it has none)."""

    path: str
    reference: str = ""


def training_clips(
    manifests: Sequence[str], exclude_speakers: Sequence[str] = (), max_per_manifest: int = 0, seed: int = 0
) -> list[Clip]:
    """The rows of `manifests` a training label may come from, with their transcripts: never a row of an evaluation
    split (a `split` column of test / validation / dev) nor one of `exclude_speakers` (the held-out speakers a
    `speaker` column names); at most `max_per_manifest` of each (a seeded sample; 0: all)."""
    clips = []
    for manifest in manifests:
        rows = read_manifest(manifest)
        if SPLIT_COLUMN in rows.column_names:
            rows = rows.filter(lambda row: row[SPLIT_COLUMN] not in EVALUATION_SPLITS)
        if exclude_speakers and SPEAKER_COLUMN in rows.column_names:
            rows = rows.filter(lambda row: row[SPEAKER_COLUMN] not in set(exclude_speakers))
        if max_per_manifest and len(rows) > max_per_manifest:
            rows = rows.shuffle(seed=seed).select(range(max_per_manifest))
        clips += [Clip(path, text) for path, text in zip(rows["audio"], rows["text"])]
    return clips


def transcript_wer(reference: str, hypothesis: str, normalize: Normalizer) -> float | None:
    """WER in percent of `hypothesis` against `reference`, both normalised; None when the reference normalises to
    nothing (unlabeled audio: there is nothing to compare with)."""
    reference, hypothesis = normalize(reference).strip(), normalize(hypothesis).strip()
    if not reference:
        return None
    return PERCENT * jiwer.wer(reference, hypothesis)


def pseudo_label_clips(
    model: nn.Module,
    processor,
    clips: Sequence[Clip],
    output_csv: Path,
    normalize: Normalizer,
    max_new_tokens: int | None = None,
    batch_size: int = PSEUDO_LABEL_BATCH,
    encoder_states: EncoderStates | None = None,
) -> Path:
    """Transcribe every clip with `model` (greedy, 30 s windows, at most `max_new_tokens` each so that no label
    outgrows what training keeps) into the manifest `output_csv` (see the module docstring), resuming from its
    progress file. `encoder_states` gives the encoder's output of a batch's clips (a cache); without it the model
    encodes their log-mel itself."""
    if not clips:
        raise ValueError(f"No clips to pseudo-label into {output_csv}.")
    if batch_size < 1:
        raise ValueError(f"pseudo-label batch size must be positive, got {batch_size}.")
    progress = output_csv.with_name(output_csv.name + PROGRESS_SUFFIX)
    labels = _read_progress(progress)
    todo = list(dict.fromkeys(clip.path for clip in clips if clip.path not in labels))
    if todo:
        logger.info("pseudo-labels: %d of %d clips labelled already, %d to go", len(clips) - len(todo), len(clips),
                    len(todo))  # fmt: skip
    with open(progress, "a", encoding="utf-8") as log:
        for start in range(0, len(todo), batch_size):
            paths = todo[start : start + batch_size]
            states = encoder_states(paths) if encoder_states is not None else None
            texts = transcribe(model, processor, paths, max_new_tokens, states)
            log.writelines(json.dumps({"path": path, "text": text}) + "\n" for path, text in zip(paths, texts))
            log.flush()
            os.fsync(log.fileno())
            labels.update(zip(paths, texts))
            logger.info("pseudo-labels: %d / %d clips", start + len(paths), len(todo))
    _write_manifest(output_csv, clips, labels, normalize)
    return output_csv


def _read_progress(progress: Path) -> dict[str, str]:
    """{path: text} of the clips a previous run labelled. A last line cut short by a crash is dropped (that clip is
    labelled again) and the file rewritten without it, so that new lines start on a line of their own."""
    if not progress.is_file():
        return {}
    text = progress.read_text(encoding="utf-8")
    labels, damaged = {}, False
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            damaged = True
            continue
        labels[row["path"]] = row["text"]
    if damaged or (text and not text.endswith("\n")):
        with atomic_write(progress) as staging:
            staging.write_text("".join(json.dumps({"path": p, "text": t}) + "\n" for p, t in labels.items()))
    return labels


def _write_manifest(output_csv: Path, clips: Sequence[Clip], labels: dict[str, str], normalize: Normalizer) -> None:
    with atomic_write(output_csv) as staging, open(staging, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for clip in clips:
            wer = transcript_wer(clip.reference, labels[clip.path], normalize)
            wer_text = "" if wer is None else round(wer, WER_DECIMALS)
            writer.writerow([clip.path, labels[clip.path], clip.reference, wer_text])


@torch.no_grad()
def transcribe(
    model: nn.Module, processor, paths: list[str], max_new_tokens: int | None, states: torch.Tensor | None = None
) -> list[str]:
    """Greedy transcripts of the clips at `paths`, in one batch. `states`: their encoder output (batch, positions,
    d_model), which the model then decodes from without encoding the audio again."""
    was_training = model.training
    model.eval()
    limit = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    if states is not None:
        encoded = BaseModelOutput(last_hidden_state=states.to(model.device, model.dtype))
        ids = model.generate(encoder_outputs=encoded, **limit)
    else:
        ids = model.generate(log_mel(processor, paths).to(model.device, model.dtype), **limit)
    model.train(was_training)
    return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


def log_mel(processor, paths: Sequence[str]) -> torch.Tensor:
    """Whisper's 30 s log-mel windows of the clips at `paths`: (batch, num_mel_bins, 3000)."""
    sampling_rate = processor.feature_extractor.sampling_rate
    audio = [load_audio(path, sampling_rate) for path in paths]
    return processor.feature_extractor(audio, sampling_rate=sampling_rate, return_tensors="pt").input_features
