"""Text-to-speech: text -> Whisper log-mel frames with predicted per-token durations.

Corpora (`--corpus`): `digits`, digit words spoken by espeak-ng in each voice, speed and pitch, joined with random
pauses so each token's frames are exact; held-out 4-digit sequences never occur in training (see tts_data.py).
`sentences`: LJSpeech text spoken word by word by espeak-ng plus the LJSpeech recordings timed by Whisper's word
timestamps (speaker index len(voices)), the alignment cached in OUT/alignments.json.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from torch.utils.data import ConcatDataset, Dataset

from processing.convert_ct2 import bundled_folder
from processing.tasks.base import Task, TaskContext, TaskData, register_task
from processing.tts_data import (
    AlignedRecordingsDataset,
    DigitClipBank,
    EspeakSentenceDataset,
    SpokenDigitsDataset,
    TextToSpeechCollator,
    align_with_whisper,
)

CORPORA = ("digits", "sentences")
DIGIT_BANK = "digit_bank"  # TaskContext.shared key: the espeak-ng digit clips, spoken once for asr and tts
ALIGNMENTS_FILE = "alignments.json"
logger = logging.getLogger(__name__)


def num_speakers(data) -> int:
    """The espeak-ng voices, plus the recorded speaker of the sentences corpus."""
    return len(data.voices) + (1 if data.corpus == "sentences" else 0)


def pause_frames(data) -> tuple[int, int]:
    return data.pause_frames_min, data.pause_frames_max


def digit_bank(context: TaskContext) -> DigitClipBank:
    """Every digit word spoken by espeak-ng in each style of the run, once per run."""
    if DIGIT_BANK not in context.shared:
        args, started = context.data, time.perf_counter()
        context.shared[DIGIT_BANK] = DigitClipBank.from_espeak(args.voices, args.speeds, args.pitches)
        logger.info("spoke %d digit clips in %.1f s", len(context.shared[DIGIT_BANK].clips),
                    time.perf_counter() - started)  # fmt: skip
    return context.shared[DIGIT_BANK]


def build_data(context: TaskContext) -> TaskData:
    args = context.data
    if args.corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {args.corpus!r}.")
    if args.corpus == "sentences":
        return TaskData(sentences(context))
    return TaskData(
        SpokenDigitsDataset(
            digit_bank(context),
            context.tokenizer,
            args.num_examples,
            args.min_digits,
            args.max_digits,
            pause_frames(args),
            frames_multiple=context.model.config.tts_reduction_factor,
            seed=context.seed,
        )  # fmt: skip
    )


def sentences(context: TaskContext) -> Dataset:
    """LJSpeech text spoken word by word by the espeak-ng voices, plus the LJSpeech recordings."""
    args, tokenizer, reduction = context.data, context.tokenizer, context.model.config.tts_reduction_factor
    if args.ljspeech_dir is None:
        raise ValueError("corpus 'sentences' needs --ljspeech_dir (a folder with metadata.csv and wavs/).")
    folder = Path(args.ljspeech_dir)
    with open(folder / "metadata.csv", encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("|") for line in handle if line.strip()][: args.max_sentences]
    speakers = num_speakers(args)
    synthetic = EspeakSentenceDataset([row[-1] for row in rows], args.voices, args.speeds, args.pitches, tokenizer,
                                      args.num_examples, pause_frames(args), speakers, reduction,
                                      seed=context.seed)  # fmt: skip
    cache = Path(context.output_dir) / ALIGNMENTS_FILE
    if cache.is_file():
        alignments = json.loads(cache.read_text(encoding="utf-8"))
    else:
        paths = [str(folder / "wavs" / f"{row[0]}.wav") for row in rows]
        alignments = align_with_whisper(paths, bundled_folder(args.aligner))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(alignments), encoding="utf-8")
    recorded = AlignedRecordingsDataset(alignments, len(args.voices), speakers, tokenizer, reduction)
    logger.info("%d synthetic sentences, %d aligned recordings of %d", len(synthetic), len(recorded), len(rows))
    return ConcatDataset([synthetic, recorded])


def build_collator(context: TaskContext) -> TextToSpeechCollator:
    return TextToSpeechCollator(context.model.config.pad_token_id, context.data.speaker_dropout, context.seed)


TTS = register_task(
    Task(name="tts", build_data=build_data, build_collator=build_collator, speech_output=True, evaluator_name="tts")
)
