"""Sign language to text through the encoder's pose front-end: fingerspelled words, or isolated signs (or, with
`sign_frontend=patches`, fingerspelled words drawn as RGB video (processing/sign_video.py) through its patch
front-end).

Fingerspelling (`sign_corpus` fingerspelling, the default): training words are spelled from a lexicon's real letter
clips (processing/sign_data.py) and drawn on the fly; the evaluation spells held-out words (a hash of the word,
`sign_data.is_held_out`) with other draws of the augmentation. The model writes the word letter by letter
(`pose.spell`: one token per letter clip) after the prompt `<|en|><|transcribe|><|notimestamps|>`; the pipeline joins
the letters back (`pose.read_spelling`). The metrics are the character and word error rates over letters.

Isolated signs (`sign_corpus` include or wlasl, processing/sign_corpora.py): classification as text, the decoder
writing the gloss ("Bird") of one recorded sign after the same prompt, from the keypoints of the corpus's pose release
(`sign_root`). Training draws the train split's clips varied as the fingerspelling clips are (trim, pace, camera,
tracker); the Trainer's evaluation reads the held-out split (INCLUDE test, WLASL val) as recorded. The metric's word
error is the top-1 error (a gloss counts as one word: case, spaces and punctuation dropped, `gloss_key`). Raw videos
are refused: their keypoints are extracted once (MediaPipe Holistic) into the tree, not on every draw.
"""

from __future__ import annotations

import re

from modeling_whisper_moe.generation_whisper_moe import text_decoder_prompt
from processing.metrics import make_compute_metrics
from processing.sign_corpora import SIGN_CORPORA, IsolatedSignDataset, SignCorpus, read_include, read_wlasl
from processing.sign_data import (
    Augmentation,
    FingerspellingDataset,
    PoseCollator,
    read_lexicon,
    split_words,
    words_from_sentences,
)
from processing.sign_video import RenderedFingerspellingDataset, check_sign_frontend, rendering_of
from processing.tasks.base import Task, TaskContext, TaskData, register_task
from processing.tasks.translation import add_text_languages

OUTPUT_LANGUAGE = "en"  # the spelled words are English
EVAL_EXAMPLES = 200  # held-out words scored during training unless max_eval_samples says otherwise
EVAL_SEED_OFFSET = 1  # the evaluation's draws differ from training's


def letters_only(text: str) -> str:
    """What a fingerspelled word is scored on: its letters, lower case."""
    return re.sub(r"[^a-z]", "", text.lower())


EVAL_SPLITS = {"include": "test", "wlasl": "val"}  # what each corpus holds out for the Trainer's evaluation


def gloss_key(text: str) -> str:
    """What an isolated sign is scored on: its gloss's letters and digits, lower case ("Good Morning" ->
    "goodmorning"; the pipeline joins a multi-word reading back this way)."""
    return "".join(character for character in text.casefold() if character.isalnum())


def read_corpus(args, split: str) -> SignCorpus:
    """The keypoint files of `split` of the run's isolated-sign corpus (`args`: DataArguments or a record of them)."""
    if not args.sign_root:
        raise ValueError(f"sign_corpus {args.sign_corpus}: give --sign_root, the folder of its keypoint files")
    if args.sign_corpus == "include":
        return read_include(args.sign_root, args.include_subset, split, media="pose")
    if not args.wlasl_json:
        raise ValueError("sign_corpus wlasl: give --wlasl_json (WLASL_v0.3.json)")
    return read_wlasl(args.wlasl_json, args.sign_root, split, args.wlasl_subset_json, media="pose")


def build_data(context: TaskContext) -> TaskData:
    args, model = context.data, context.model
    if args.sign_corpus not in SIGN_CORPORA:
        raise ValueError(f"Unknown sign_corpus {args.sign_corpus!r}; one of {', '.join(SIGN_CORPORA)}")
    add_text_languages(model.generation_config, context.tokenizer, (OUTPUT_LANGUAGE,))
    patches = check_sign_frontend(args.sign_frontend) == "patches"
    if args.sign_corpus != "fingerspelling" and patches:
        raise ValueError(f"sign_frontend patches draws fingerspelled words only; sign_corpus {args.sign_corpus} is "
                         "read as keypoints (sign_frontend pose)")  # fmt: skip
    if args.sign_corpus != "fingerspelling":
        return isolated_sign_data(context)
    if not args.sign_words_csv:
        raise ValueError("The video_to_text task needs --sign_words_csv (sentence CSVs whose words are spelled)")
    lexicon = read_lexicon(args.signed_language)
    train_words, held_out = split_words(words_from_sentences(args.sign_words_csv), set(lexicon))
    prompt = text_decoder_prompt(model.generation_config, OUTPUT_LANGUAGE)[1:]  # the model prepends <|sot|>
    common = dict(lexicon=lexicon, prompt=prompt, tokenizer=context.tokenizer,
                  eos_id=model.generation_config.eos_token_id)  # fmt: skip
    if patches:  # the words drawn as RGB video
        dataset, common["rendering"] = RenderedFingerspellingDataset, rendering_of(args)
    else:
        dataset = FingerspellingDataset
    size = args.max_train_samples or args.sign_examples
    train = dataset(train_words, size=size, seed=context.seed, **common)
    evaluation = dataset(held_out, size=args.max_eval_samples or EVAL_EXAMPLES,
                         seed=context.seed + EVAL_SEED_OFFSET, **common)  # fmt: skip
    return TaskData(train, evaluation)


def isolated_sign_data(context: TaskContext) -> TaskData:
    args, model = context.data, context.model
    prompt = text_decoder_prompt(model.generation_config, OUTPUT_LANGUAGE)[1:]
    common = dict(prompt=prompt, tokenizer=context.tokenizer, eos_id=model.generation_config.eos_token_id,
                  max_frames=model.config.max_source_positions)  # fmt: skip
    train = IsolatedSignDataset(read_corpus(args, "train").samples, size=args.max_train_samples or args.sign_examples,
                                seed=context.seed, augment=Augmentation(), **common)  # fmt: skip
    held_out = read_corpus(args, EVAL_SPLITS[args.sign_corpus]).samples[: args.max_eval_samples]
    return TaskData(train, IsolatedSignDataset(held_out, **common))


def build_collator(context: TaskContext) -> PoseCollator:
    patches = check_sign_frontend(context.data.sign_frontend) == "patches"
    return PoseCollator(key="pixel_values" if patches else "pose_values")


def build_metrics(context: TaskContext):
    isolated = context.data.sign_corpus != "fingerspelling"
    return make_compute_metrics(context.tokenizer, gloss_key if isolated else letters_only)


def generation_kwargs(context: TaskContext) -> dict:
    return {"language": OUTPUT_LANGUAGE}


VIDEO_TO_TEXT = register_task(
    Task(
        "video_to_text",
        build_data,
        build_collator,
        build_metrics=build_metrics,
        generation_kwargs=generation_kwargs,
        evaluator_name="video_to_text",
    )
)
