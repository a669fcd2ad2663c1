"""Sign language to text: fingerspelled words, as keypoints, through the encoder's pose front-end (or, with
`sign_frontend=patches`, drawn as RGB video (processing/sign_video.py) through its patch front-end).

Training words are spelled from a lexicon's real letter clips (processing/sign_data.py) and drawn on the fly; the
evaluation spells held-out words (a hash of the word, `sign_data.is_held_out`) with other draws of the augmentation.
The model writes the word letter by letter (`pose.spell`: one token per letter clip) after the prompt
`<|en|><|transcribe|><|notimestamps|>`; the pipeline joins the letters back (`pose.read_spelling`). The metrics are the
character and word error rates over letters.
"""

from __future__ import annotations

import re

from modeling_whisper_moe.generation_whisper_moe import text_decoder_prompt
from processing.metrics import make_compute_metrics
from processing.sign_data import FingerspellingDataset, PoseCollator, read_lexicon, split_words, words_from_sentences
from processing.sign_video import RenderedFingerspellingDataset, check_sign_frontend, rendering_of
from processing.tasks.base import Task, TaskContext, TaskData, register_task
from processing.tasks.translation import add_text_languages

OUTPUT_LANGUAGE = "en"  # the spelled words are English
EVAL_EXAMPLES = 200  # held-out words scored during training unless max_eval_samples says otherwise
EVAL_SEED_OFFSET = 1  # the evaluation's draws differ from training's


def letters_only(text: str) -> str:
    """What a fingerspelled word is scored on: its letters, lower case."""
    return re.sub(r"[^a-z]", "", text.lower())


def build_data(context: TaskContext) -> TaskData:
    args, model = context.data, context.model
    if not args.sign_words_csv:
        raise ValueError("The video_to_text task needs --sign_words_csv (sentence CSVs whose words are spelled)")
    lexicon = read_lexicon(args.signed_language)
    train_words, held_out = split_words(words_from_sentences(args.sign_words_csv), set(lexicon))
    add_text_languages(model.generation_config, context.tokenizer, (OUTPUT_LANGUAGE,))
    prompt = text_decoder_prompt(model.generation_config, OUTPUT_LANGUAGE)[1:]  # the model prepends <|sot|>
    common = dict(lexicon=lexicon, prompt=prompt, tokenizer=context.tokenizer,
                  eos_id=model.generation_config.eos_token_id)  # fmt: skip
    if check_sign_frontend(args.sign_frontend) == "patches":  # the words drawn as RGB video
        dataset, common["rendering"] = RenderedFingerspellingDataset, rendering_of(args)
    else:
        dataset = FingerspellingDataset
    size = args.max_train_samples or args.sign_examples
    train = dataset(train_words, size=size, seed=context.seed, **common)
    evaluation = dataset(held_out, size=args.max_eval_samples or EVAL_EXAMPLES,
                         seed=context.seed + EVAL_SEED_OFFSET, **common)  # fmt: skip
    return TaskData(train, evaluation)


def build_collator(context: TaskContext) -> PoseCollator:
    patches = check_sign_frontend(context.data.sign_frontend) == "patches"
    return PoseCollator(key="pixel_values" if patches else "pose_values")


def build_metrics(context: TaskContext):
    return make_compute_metrics(context.tokenizer, letters_only)


def generation_kwargs(context: TaskContext) -> dict:
    return {"language": OUTPUT_LANGUAGE}


VIDEO_TO_TEXT = register_task(
    Task(
        name="video_to_text",
        build_data=build_data,
        build_collator=build_collator,
        build_metrics=build_metrics,
        generation_kwargs=generation_kwargs,
        evaluator_name="video_to_text",
    )  # fmt: skip
)
