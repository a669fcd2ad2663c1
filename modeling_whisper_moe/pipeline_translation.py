"""Text translation pipeline for WhisperMoE folders with a text front-end, shipped inside them as a custom pipeline.

transformers 5.x dropped its "translation" task, so `pipeline("translation", model=folder, trust_remote_code=True)`
resolves to this class through the folder's `custom_pipelines`. The source text goes to the encoder's text front-end
behind its language token; the decoder is prompted with the target language's token and writes the translation:

    translator = pipeline("translation", model="you/whisper-moe-base-en-de", trust_remote_code=True)
    translator(["Hello", "How are you?"], src_lang="en", tgt_lang="de", num_beams=4)
    # [{"translation_text": "Hallo"}, {"translation_text": "Wie geht es dir?"}]
"""

import torch
from transformers import GenerationConfig, Pipeline

from .generation_whisper_moe import language_token_id

# Whisper's text follows its prefix tokens with a leading space; the source side is written the same way, so the
# decoder's embeddings the text front-end starts from see the tokens they know.
TEXT_PREFIX = " "
# Default cap on new tokens: a translation rarely takes more than twice the source's tokens, and an untrained or
# looping model would otherwise run to the decoder's 448 positions.
OUTPUT_TOKENS_PER_SOURCE_TOKEN = 2
OUTPUT_TOKENS_SLACK = 10


def encode_source(tokenizer, generation_config: GenerationConfig, text: str, src_lang: str) -> list[int]:
    """Encoder input ids for `text` in `src_lang`: <|src_lang|> followed by the text's tokens."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"Text to translate must be a non-empty string, got {text!r}.")
    tokens = tokenizer(TEXT_PREFIX + text.strip(), add_special_tokens=False).input_ids
    return [language_token_id(generation_config, src_lang), *tokens]


def encode_target(tokenizer, text: str) -> list[int]:
    """Decoder text tokens of `text` (no prompt, no <|endoftext|>)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"Target text must be a non-empty string, got {text!r}.")
    return tokenizer(TEXT_PREFIX + text.strip(), add_special_tokens=False).input_ids


class FrontendPipeline(Pipeline):
    """A text-output pipeline over one of the encoder's non-audio front-ends: it loads only the tokenizer, and a
    model without that front-end (`frontend_field` false in its config) is refused, saying what to do."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    frontend_field = "text_frontend"
    refusal = "has no text front-end, so it cannot translate text; train one with text-translation-en-de.json"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not getattr(self.model.config, self.frontend_field, False):
            name = self.model.config.name_or_path or "This model"
            raise ValueError(f"{name} {self.refusal} (config.{self.frontend_field}=False).")


class WhisperMoETranslationPipeline(FrontendPipeline):
    """Translate strings with a WhisperMoE whose config has `text_frontend=True`.

    Call with a string or a list of strings and `src_lang` / `tgt_lang` (codes such as "en", "de", or names such as
    "german"; any language the checkpoint's tokenizer has a token for, though it translates well only the pairs it
    was trained on). Generation options: `max_new_tokens`, `num_beams`, or `generate_kwargs`. Returns
    `[{"translation_text": ...}]` per string, like transformers' former translation pipeline.
    """

    refusal = (
        "has no text front-end, so it cannot translate text; train one with "
        "configuration/recipes/text-translation-en-de.json"
    )

    def __call__(self, inputs: str | list[str], **kwargs):
        results = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list):
            return [result[0] for result in results]
        return results

    def _sanitize_parameters(
        self,
        src_lang: str | None = None,
        tgt_lang: str | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        generate_kwargs: dict | None = None,
    ):
        preprocess_params, forward_params = {}, {}
        if src_lang is not None:
            language_token_id(self.model.generation_config, src_lang)  # unknown languages fail before any work
            preprocess_params["src_lang"] = src_lang
        if tgt_lang is not None:
            language_token_id(self.model.generation_config, tgt_lang)
            forward_params["tgt_lang"] = tgt_lang
        generate_kwargs = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            generate_kwargs["max_new_tokens"] = max_new_tokens
        if num_beams is not None:
            generate_kwargs["num_beams"] = num_beams
        forward_params["generate_kwargs"] = generate_kwargs
        return preprocess_params, forward_params, {}

    def preprocess(self, text: str, src_lang: str | None = None) -> dict[str, torch.Tensor]:
        """One string -> input_ids and attention_mask, (1, text_len)."""
        if src_lang is None:
            raise ValueError("Say which language the text is in: src_lang='en' (a code or a language name).")
        ids = encode_source(self.tokenizer, self.model.generation_config, text, src_lang)
        limit = self.model.config.max_text_positions
        if len(ids) > limit:
            raise ValueError(f"The text is {len(ids)} tokens long; this model reads at most {limit}: split it.")
        input_ids = torch.tensor([ids])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def _forward(self, model_inputs: dict, tgt_lang: str | None = None, generate_kwargs: dict | None = None) -> dict:
        if tgt_lang is None:
            raise ValueError("Say which language to translate into: tgt_lang='de' (a code or a language name).")
        source_length = int(model_inputs["attention_mask"].sum(-1).max())
        default_cap = OUTPUT_TOKENS_PER_SOURCE_TOKEN * source_length + OUTPUT_TOKENS_SLACK
        generate_kwargs = {"max_new_tokens": default_cap, **(generate_kwargs or {})}
        output_ids = self.model.generate(
            input_ids=model_inputs["input_ids"],
            attention_mask=model_inputs["attention_mask"],
            language=tgt_lang,
            **generate_kwargs,
        )
        return {"output_ids": output_ids}

    def postprocess(self, model_outputs: dict) -> list[dict[str, str]]:
        texts = self.tokenizer.batch_decode(model_outputs["output_ids"], skip_special_tokens=True)
        return [{"translation_text": text.strip()} for text in texts]
