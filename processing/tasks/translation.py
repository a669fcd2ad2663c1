"""Text translation: text -> text through the encoder's text front-end, on a CSV of sentence pairs.

The held-out pairs (hashed ids) are written to OUT/held_out_ids.json before training, so the evaluation of the
saved folder scores sentences never trained on. Decoder prompt `<|tgt|><|transcribe|><|notimestamps|>`.
"""

from __future__ import annotations

from datasets import concatenate_datasets
from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

from processing.tasks.base import Task, TaskContext, TaskData, register_task
from processing.text_data import (
    TextPairCollator,
    copy_pairs,
    prepare_text_pairs,
    read_text_pairs,
    split_held_out,
    write_held_out_ids,
)


def languages(context: TaskContext) -> tuple[str, str]:
    """(source, target) language tokens: the flags, else the CSV's column names."""
    args = context.data
    return args.src_lang or args.source_column, args.tgt_lang or args.target_column


def add_text_languages(generation_config, tokenizer, codes: tuple[str, ...]) -> None:
    """Let an English-only checkpoint write `codes`' languages as text: its vocabulary holds every language token
    (never trained), but its generation config lists none; they go to `text_lang_to_id`, which only text output
    reads, so its audio prompts stay <|startoftranscript|><|notimestamps|>. Multilingual configs are unchanged."""
    if getattr(generation_config, "lang_to_id", None):
        return
    known = dict(getattr(generation_config, "text_lang_to_id", None) or {})
    for code in codes:
        token = f"<|{TO_LANGUAGE_CODE.get(code.lower(), code.lower())}|>"
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {token} token, so this model cannot write {code!r}.")
        known[token] = int(token_id)
    generation_config.text_lang_to_id = known


def build_data(context: TaskContext) -> TaskData:
    """Tokenised (train, held-out) pairs; the held-out ids are written to the output folder first."""
    args, seed = context.data, context.seed
    if not args.text_pairs_csv:
        raise ValueError("The translation task needs --text_pairs_csv")
    src_lang, tgt_lang = languages(context)
    add_text_languages(context.model.generation_config, context.tokenizer, (src_lang, tgt_lang))
    pairs = read_text_pairs(args.text_pairs_csv, args.source_column, args.target_column)
    train, held_out = split_held_out(pairs, args.held_out_size, seed)
    record = {"csv": args.text_pairs_csv, "source_column": args.source_column, "target_column": args.target_column,
              "src_lang": src_lang, "tgt_lang": tgt_lang, "seed": seed}  # fmt: skip
    write_held_out_ids(held_out["id"], context.output_dir, record)
    if args.max_train_samples:
        train = train.shuffle(seed=seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        held_out = held_out.select(range(min(args.max_eval_samples, len(held_out))))
    lengths = dict(max_source_length=args.max_source_length, max_label_length=args.max_label_length)
    encode = dict(tokenizer=context.tokenizer, generation_config=context.model.generation_config, src_lang=src_lang,
                  **lengths)  # fmt: skip
    prepared = prepare_text_pairs(train, tgt_lang=tgt_lang, **encode)
    if args.copy_fraction:
        copies = copy_pairs(train, args.copy_fraction, seed)
        prepared = concatenate_datasets([prepared, prepare_text_pairs(copies, tgt_lang=src_lang, **encode)])
    return TaskData(prepared, prepare_text_pairs(held_out, tgt_lang=tgt_lang, **encode))


def build_collator(context: TaskContext) -> TextPairCollator:
    return TextPairCollator(context.model.config.pad_token_id)


def generation_kwargs(context: TaskContext) -> dict:
    return {"language": languages(context)[1]}


TRANSLATION = register_task(
    Task("translation", build_data, build_collator, generation_kwargs=generation_kwargs, evaluator_name="translation")
)
