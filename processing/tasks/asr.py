"""Speech recognition: speech -> text.

The switch between Whisper's 30 s windows and real frames only is the model's `config.variable_length_audio`:

- recordings of a manifest or a `datasets` source go through Whisper's feature extractor (`prepare_dataset`): 30 s
  log-mel windows with an `attention_mask` of the real frames, which a `variable_length_audio` model reads only
  up to; augmentation, streaming and the label-length filter apply;
- espeak-ng digit sequences (`asr_synthetic_examples`, made in memory) turn the recordings into items of the
  clip's own frames (`recognition_example`), padded per batch to the longest clip, or to 30 s windows of each
  clip's silence floor for a model that reads windows.
"""

from __future__ import annotations

import logging

from torch.utils.data import ConcatDataset

from processing.augment import WaveformAugmenter
from processing.collator import SpeechSeq2SeqCollator
from processing.data import load_asr_dataset, manifest_columns, prepare_dataset, read_manifest
from processing.metrics import english_normalizer, make_compute_metrics
from processing.multitask import RecognitionCollator, RecordingsRecognitionDataset, SpokenDigitsRecognitionDataset
from processing.tasks.base import Task, TaskContext, TaskData, register_task
from processing.tasks.tts import digit_bank, pause_frames

SHUFFLE_BUFFER = 1_000  # examples held for shuffling a streamed training set
logger = logging.getLogger(__name__)


def set_decoder_prompt(context: TaskContext, decoder_task: str) -> None:
    """Labels start with `<|startoftranscript|>[<|lang|><|task|>]<|notimestamps|>` (language and task on
    multilingual models)."""
    if context.model.generation_config.is_multilingual:
        context.tokenizer.set_prefix_tokens(language=context.model_args.language, task=decoder_task,
                                            predict_timestamps=False)  # fmt: skip


def uses_recognition_items(context: TaskContext) -> bool:
    return context.data.asr_synthetic_examples > 0


def _split_if_column(manifest: str, split: str) -> str | None:
    """Filter on the split column only when the manifest has one (a plain path,text CSV is used whole)."""
    return split if "split" in manifest_columns(manifest) else None


def raw_splits(context: TaskContext):
    """Raw (audio, text) train and eval sets from a manifest or a datasets source."""
    args, seed = context.data, context.seed
    if args.train_manifest:
        train = read_manifest(args.train_manifest, split=_split_if_column(args.train_manifest, args.train_split),
                              exclude_speakers=args.exclude_speakers or None)  # fmt: skip
        eval_manifest = args.eval_manifest or args.train_manifest
        evaluation = read_manifest(eval_manifest, split=_split_if_column(eval_manifest, args.eval_split))
    elif args.dataset_name:
        load = dict(config=args.dataset_config_name, audio_column=args.audio_column, text_column=args.text_column,
                    data_dir=args.data_dir)  # fmt: skip
        train = load_asr_dataset(args.dataset_name, split=args.train_split, streaming=args.streaming, **load)
        evaluation = load_asr_dataset(args.dataset_name, split=args.eval_split, **load)
    else:
        raise ValueError("The asr task needs --train_manifest or --dataset_name")
    if args.max_train_samples and not args.streaming:
        train = train.shuffle(seed=seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    return train, evaluation


def extractor_data(context: TaskContext) -> TaskData:
    """Whisper's feature extractor on the recordings: 30 s windows with their real-frame mask."""
    args, seed, processor = context.data, context.seed, context.processor
    train, evaluation = raw_splits(context)
    augment = WaveformAugmenter(seed=seed) if args.augment else None
    if args.streaming and hasattr(train, "to_iterable_dataset"):
        train = train.to_iterable_dataset()
    if not hasattr(train, "__len__"):
        train = train.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    workers, longest = args.preprocessing_num_workers, args.max_label_length
    train = prepare_dataset(train, processor, max_label_length=longest, augment=augment, num_proc=workers)
    evaluation = prepare_dataset(evaluation, processor, max_label_length=longest, num_proc=workers)
    return TaskData(train, evaluation)


def recognition_items(context: TaskContext) -> TaskData:
    """The manifest's training rows and espeak-ng digit sequences, as log-mel of each clip's own frames."""
    args = context.data
    if not args.train_manifest:
        raise ValueError("asr with asr_synthetic_examples needs --train_manifest (recordings to mix in)")
    rows = read_manifest(args.train_manifest, split=_split_if_column(args.train_manifest, args.train_split),
                         exclude_speakers=args.exclude_speakers or None)  # fmt: skip
    recorded = RecordingsRecognitionDataset(list(zip(rows["audio"], rows["text"])), context.tokenizer)
    synthetic = SpokenDigitsRecognitionDataset(digit_bank(context), context.tokenizer, args.asr_synthetic_examples,
                                               args.min_digits, args.max_digits, pause_frames(args),
                                               seed=context.seed)  # fmt: skip
    logger.info("asr: %d recordings, %d synthetic digit sequences", len(recorded), len(synthetic))
    return TaskData(ConcatDataset([recorded, synthetic]))


def build_data(context: TaskContext, decoder_task: str | None = None) -> TaskData:
    set_decoder_prompt(context, decoder_task or context.model_args.task)
    return recognition_items(context) if uses_recognition_items(context) else extractor_data(context)


def build_collator(context: TaskContext):
    config = context.model.config
    if not uses_recognition_items(context):
        return SpeechSeq2SeqCollator(context.processor, config.decoder_start_token_id)
    # a model that reads Whisper's 30 s windows gets them, padded with each clip's silence floor
    window = None if config.variable_length_audio else 2 * config.max_source_positions
    return RecognitionCollator(pad_to_frames=window)


def build_metrics(context: TaskContext):
    return make_compute_metrics(context.tokenizer, english_normalizer(context.model_args.model_name_or_path))


ASR = register_task(Task("asr", build_data, build_collator, build_metrics=build_metrics, evaluator_name="asr"))
