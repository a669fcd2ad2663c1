"""Distillation: speech -> text, a student learning its teacher's transcripts (Distil-Whisper; see distillation.py).

A task rather than a training mode. A training mode (processing/training.py) chooses which parameters of the loaded
model train on the task's data as it is; distillation changes the data itself (the labels are the teacher's
transcripts, clips whose transcript strays from the reference are dropped, unlabeled audio becomes usable, the items
can be cached encoder outputs instead of log-mel) and trains another model than the one loaded: the loaded model is
the teacher, and the student made from it trains. Data, batches and metric are a task's, so they are registered
here; `scripts/train.py` makes the student (`processing.distillation.build_student`), hands this task the teacher
through `TaskContext.shared`, and trains with `DistillationTrainer`. What trains of the student is still the
training mode's choice (`freeze_encoder`, the recipes': only the decoder).

The training audio is the clips of `distill_manifest` (never an evaluation split or an `exclude_speakers` speaker)
and, with `spoken_sentences`, sentences of `spoken_sentences_csv` spoken by espeak-ng in the run's `voices` and
`speeds`. Under OUT/distillation/ each step's output is kept and reused by a resumed run: the spoken WAVs
(`spoken/`), the encoder's output of every clip (`encoder_states/`), the teacher's pseudo-labels with their WER
(`pseudo_labels.csv`); the WER filter (`wer_threshold`) then picks the training rows.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pandas as pd
import soundfile

from modeling_whisper_moe.audio import SAMPLING_RATE
from modeling_whisper_moe.hub import atomic_write
from processing.collator import SpeechSeq2SeqCollator
from processing.data import prepare_dataset, read_manifest
from processing.distillation import (
    CachedStatesCollator,
    CachedStatesDataset,
    DistillationArguments,
    EncoderStateCache,
    filter_by_wer,
)
from processing.espeak import speak
from processing.metrics import english_normalizer
from processing.pseudo_labels import PROMPT_AND_END_TOKENS, Clip, pseudo_label_clips, training_clips
from processing.tasks.asr import build_metrics, set_decoder_prompt
from processing.tasks.base import Task, TaskContext, TaskData, register_task

TEACHER = "distillation_teacher"  # TaskContext.shared: the teacher model
ARGUMENTS = "distillation_arguments"  # TaskContext.shared: the run's DistillationArguments
WORK_FOLDER = "distillation"  # under output_dir: what the run computes once and a resumed run reuses
PROGRESS_EVERY = 100  # sentences spoken between two progress lines
logger = logging.getLogger(__name__)


def spoken_sentences(args: DistillationArguments, voices: list[str], speeds: list[int], folder: Path,
                     seed: int) -> list[Clip]:  # fmt: skip
    """`args.spoken_sentences` distinct sentences of the CSV's column (a seeded sample), each spoken by espeak-ng
    with the next voice and speed in turn, as WAV files under `folder` named by a hash of (sentence, voice, speed),
    so that a rerun speaks nothing twice."""
    frame = pd.read_csv(args.spoken_sentences_csv, dtype=str, keep_default_na=False)
    column = args.spoken_sentences_column
    if column not in frame.columns:
        raise ValueError(f"{args.spoken_sentences_csv} has no column {column!r}; it has {list(frame.columns)}.")
    sentences = frame[column].str.strip()
    sentences = sentences[sentences != ""].drop_duplicates()
    if args.spoken_sentences > len(sentences):
        raise ValueError(f"spoken_sentences={args.spoken_sentences}, but {args.spoken_sentences_csv} has "
                         f"{len(sentences)} distinct sentences in {column!r}.")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for index, sentence in enumerate(sentences.sample(n=args.spoken_sentences, random_state=seed)):
        voice, speed = voices[index % len(voices)], speeds[index // len(voices) % len(speeds)]
        path = folder / f"{hashlib.sha1(f'{voice}|{speed}|{sentence}'.encode()).hexdigest()}.wav"
        if not path.is_file():
            with atomic_write(path) as staging:
                soundfile.write(staging, speak(sentence, voice, speed), SAMPLING_RATE)
        clips.append(Clip(str(path), sentence))
        if (index + 1) % PROGRESS_EVERY == 0:
            logger.info("spoken sentences: %d / %d", index + 1, args.spoken_sentences)
    return clips


def training_audio(context: TaskContext, args: DistillationArguments) -> list[Clip]:
    """The clips the teacher labels: the manifests' rows and the spoken sentences."""
    data = context.data
    clips = training_clips(args.distill_manifest, data.exclude_speakers or (), args.distill_max_per_manifest,
                           context.seed)  # fmt: skip
    if args.spoken_sentences:
        folder = Path(context.output_dir) / WORK_FOLDER / "spoken"
        clips += spoken_sentences(args, data.voices, data.speeds, folder, context.seed)
    if not clips:
        raise ValueError("distillation needs training audio: give distill_manifest and/or spoken_sentences.")
    return clips


def build_data(context: TaskContext) -> TaskData:
    teacher, args = context.shared[TEACHER], context.shared[ARGUMENTS]
    set_decoder_prompt(context, "transcribe")
    if teacher.generation_config.is_multilingual and context.model_args.language:
        # the pseudo-labels are transcripts in the labels' language, not whatever language the teacher detects
        teacher.generation_config.language = context.model_args.language
        teacher.generation_config.task = "transcribe"
    folder = Path(context.output_dir) / WORK_FOLDER
    clips = training_audio(context, args)
    cache = None
    if args.cache_encoder_states:
        cache = EncoderStateCache(folder / "encoder_states", teacher.name_or_path, teacher.config.d_model)
        cache.fill(teacher, context.processor, [clip.path for clip in clips], args.pseudo_label_batch_size)
    longest = context.data.max_label_length
    manifest = pseudo_label_clips(teacher, context.processor, clips, folder / "pseudo_labels.csv",
                                  english_normalizer(context.model_args.model_name_or_path),
                                  max_new_tokens=longest - PROMPT_AND_END_TOKENS,
                                  batch_size=args.pseudo_label_batch_size,
                                  encoder_states=cache.load if cache else None)  # fmt: skip
    rows = filter_by_wer(read_manifest(manifest), args.wer_threshold)
    if cache is not None:
        return TaskData(CachedStatesDataset(rows, context.tokenizer, cache, longest))
    return TaskData(prepare_dataset(rows, context.processor, max_label_length=longest))


def build_collator(context: TaskContext):
    args = context.shared[ARGUMENTS]
    collator = CachedStatesCollator if args.cache_encoder_states else SpeechSeq2SeqCollator
    return collator(context.processor, context.model.config.decoder_start_token_id)


DISTILLATION = register_task(
    Task("distillation", build_data, build_collator, build_metrics=build_metrics, evaluator_name="asr")
)
