"""Generation for WhisperMoE: Whisper's own for 30 s audio windows, plus text input and variable-length audio.

[`WhisperMoEGenerationMixin`] sits in front of transformers' `WhisperForConditionalGeneration` in the head's bases:
audio in 30 s windows goes to Whisper's generate (languages, tasks, timestamps, long-form), text (`input_ids`,
through the encoder's text front-end) and variable-length audio are encoded once and decoded by transformers'
generic `GenerationMixin.generate` after a Whisper decoder prompt.
"""

import copy

import torch
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.generation.logits_process import LogitsProcessor, WhisperNoSpeechDetection
from transformers.modeling_outputs import BaseModelOutput

from .echo import reorder_conv_inputs
from .ttt import reorder_ttt_states

# Decoder task token for text output. Whisper's "translate" means "into English"; "transcribe" after a language token
# means "write in that language", so <|de|><|transcribe|> asks for German whatever the input's language.
TEXT_TASK = "transcribe"


def language_token_id(generation_config: GenerationConfig, language: str) -> int:
    """The id of `language`'s token: a code ("de"), a name ("german") or the token itself ("<|de|>")."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    # English-only checkpoints keep their language tokens out of lang_to_id (its presence makes Whisper's audio
    # generate() detect languages); text output reads the ones a text task taught it from text_lang_to_id.
    lang_to_id = getattr(generation_config, "lang_to_id", None) or getattr(generation_config, "text_lang_to_id", {})
    code = language.strip("<|>").lower()
    code = TO_LANGUAGE_CODE.get(code, code)
    if f"<|{code}|>" not in lang_to_id:
        known = ", ".join(sorted(token.strip("<|>") for token in lang_to_id)) or "none (an English-only checkpoint)"
        raise ValueError(f"Unknown language {language!r}; this model's languages: {known}.")
    return lang_to_id[f"<|{code}|>"]


def text_decoder_prompt(generation_config: GenerationConfig, language: str) -> list[int]:
    """Decoder prompt for text output in `language`:
    <|startoftranscript|><|language|><|transcribe|><|notimestamps|>."""
    return [
        generation_config.decoder_start_token_id,
        language_token_id(generation_config, language),
        generation_config.task_to_id[TEXT_TASK],
        generation_config.no_timestamps_token_id,
    ]


# Whisper's long-form decoding (audio longer than one 30 s window, decoded window after window, each resuming at its
# last timestamp) as OpenAI's and faster-whisper's defaults set it up: a window whose text repeats itself (token
# compression ratio) or is unlikely (mean log-probability) is decoded again at a higher temperature, and one the model
# calls silence (no-speech probability, when also unlikely) is skipped. Options the caller sets win; timestamps are
# always on (long-form resumes at them: Whisper's generate refuses long audio without them).
LONG_FORM_DEFAULTS = {
    "temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    "compression_ratio_threshold": 1.35,  # over token ids, the scale transformers uses (2.4 over text bytes)
    "logprob_threshold": -1.0,
    "no_speech_threshold": 0.6,
}


# A long-form window whose no-speech probability reaches this is skipped however likely its text looks: Whisper
# writes silence as a confident "you" or ". . .", which the rule above (no-speech *and* unlikely text) keeps, window
# after window (faster-whisper's defaults too). Speech windows score far lower (under 0.1 on LibriSpeech).
CONFIDENT_NO_SPEECH = 0.9


def confidently_silent(detector: WhisperNoSpeechDetection) -> torch.Tensor:
    """(rows,) bool: the rows whose last no-speech probability reaches CONFIDENT_NO_SPEECH."""
    return torch.as_tensor(detector.no_speech_prob).reshape(-1) >= CONFIDENT_NO_SPEECH


def end_rows(scores: torch.FloatTensor, rows: torch.Tensor, eos_token_id: int) -> torch.FloatTensor:
    """`scores` (rows, vocab) with every row where `rows` (rows,) is True able to decode only `eos_token_id`."""
    ended = torch.full_like(scores, float("-inf"))
    ended[:, eos_token_id] = 0.0
    return torch.where(rows[:, None].to(scores.device), ended, scores)


class ConfidentSilenceStop(LogitsProcessor):
    """Ends, at the first decoded position, every row whose no-speech probability reaches CONFIDENT_NO_SPEECH: the
    window is skipped anyway (`_need_fallback`), so decoding it (up to 448 tokens of "you you ...") is wasted.

    Reads Whisper's `WhisperNoSpeechDetection`, which comes first in the processor list and has just set the
    probability for this step's rows (batch * beams,).
    """

    def __init__(self, detector: WhisperNoSpeechDetection, eos_token_id: int):
        self.detector = detector
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self.detector.begin_index:
            return scores
        silent = confidently_silent(self.detector).to(scores.device)
        if not bool(silent.any()) or silent.shape[0] != scores.shape[0]:
            return scores
        return end_rows(scores, silent, self.eos_token_id)


# A row whose last LOOP_WINDOW tokens hold at most LOOP_MAX_DISTINCT distinct ones is in Whisper's degenerate loop (a
# window cut mid-word decodes as "f**k f**k ..." to its 448-token limit, at every beam; beam search varies the loop,
# "f**k f**king f**king ...", so an exact period would miss it): it ends there. 48 tokens of real transcripts hold
# 33 or more distinct ones in English and Dutch, 17 in Russian (Cyrillic as byte tokens of tiny.en's BPE). A loop
# cannot run across timestamped segments (each has its own timestamps), so only a loop within a segment stops; its
# 48 tokens stay in the text. `generation_config.loop_stop = False` switches it off.
LOOP_WINDOW = 48
LOOP_MAX_DISTINCT = 8


def looping_rows(tokens: torch.LongTensor) -> torch.Tensor:
    """(rows,) bool: the rows of `tokens` (rows, length) whose last LOOP_WINDOW tokens are a loop."""
    if tokens.shape[1] < LOOP_WINDOW:
        return torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    tail = tokens[:, -LOOP_WINDOW:].sort(dim=1).values
    distinct = (tail[:, 1:] != tail[:, :-1]).sum(dim=1) + 1
    return distinct <= LOOP_MAX_DISTINCT


class LoopStop(LogitsProcessor):
    """Ends every row (batch * beams) whose generated tokens, from `begin_index` on, end in a loop (`looping_rows`):
    what it would decode up to the length limit is the same few tokens again."""

    def __init__(self, begin_index: int, eos_token_id: int):
        self.begin_index = begin_index
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        looping = looping_rows(input_ids[:, self.begin_index :])
        return end_rows(scores, looping, self.eos_token_id) if bool(looping.any()) else scores


def long_form_options(generation_config: GenerationConfig, kwargs: dict) -> dict:
    """`kwargs` for a long-form generate: timestamps on, and each of `LONG_FORM_DEFAULTS` added unless the call
    sets it (or, for the thresholds, the generation config does)."""
    options = {**kwargs, "return_timestamps": True}
    for name, value in LONG_FORM_DEFAULTS.items():  # temperature: GenerationConfig always has one (1.0)
        configured = name != "temperature" and getattr(generation_config, name, None) is not None
        if options.get(name) is None and not configured:
            options[name] = value
    return options


class WhisperMoEGenerationMixin:
    """The generate paths of [`WhisperMoEForConditionalGeneration`]; the host is a WhisperMoE encoder-decoder with
    Whisper's generation mixin after this one in its bases."""

    def generate(
        self, input_features: torch.Tensor | None = None, *args, input_ids=None, pose_values=None, pixel_values=None,
        **kwargs,
    ):  # fmt: skip
        """Whisper's generate for audio (`input_features`, every Whisper option). For text (`input_ids` (batch,
        text_len) with `attention_mask`, `config.text_frontend`) see `generate_from_text`, for sign-language poses
        (`pose_values`, `config.pose_frontend`) `generate_from_pose`, for video (`pixel_values`,
        `config.patch_frontend`) `generate_from_video`."""
        if pixel_values is not None:
            if input_features is not None or input_ids is not None or pose_values is not None or args:
                raise ValueError("generate takes one input: input_features, input_ids, pose_values or pixel_values.")
            return self.generate_from_video(pixel_values, **kwargs)
        if pose_values is not None:
            if input_features is not None or input_ids is not None or args:
                raise ValueError("generate takes one input: input_features, input_ids or pose_values.")
            return self.generate_from_pose(pose_values, **kwargs)
        if input_ids is None and self.config.variable_length_audio:
            return self.generate_variable_length(input_features, *args, **kwargs)
        if input_ids is None:
            if kwargs.get("assistant_model") is not None:
                # assisted decoding takes `attention_mask` for the decoder's and grows it a token a step: the mel
                # frames' mask (which 30 s windows do not need) would give the draft positions past 448
                kwargs.pop("attention_mask", None)
            if input_features is not None and input_features.shape[-1] > self.config.max_source_positions * 2:
                kwargs = long_form_options(kwargs.get("generation_config") or self.generation_config, kwargs)
            return super().generate(input_features, *args, **kwargs)
        if input_features is not None or args:
            raise ValueError("generate takes either input_features (audio) or input_ids (text), not both.")
        return self.generate_from_text(input_ids, **kwargs)

    def _reorder_cache(self, cache, beam_idx: torch.LongTensor):
        """Beam search: the self-attention key/value caches, the decoder TTT layers' inner weights and the
        convolution modules' inputs follow the kept beams. Not the cross-attention caches: every beam of an input
        attends to the same encoder output, and a kept beam always comes from the same input, so reordering them
        would copy each input's rows onto themselves (at 5 beams x batch 8 on tiny.en, 0.7 GB a step)."""
        self_attention = getattr(cache, "self_attention_cache", cache)
        self_attention.reorder_cache(beam_idx)
        reorder_ttt_states(cache, beam_idx)
        reorder_conv_inputs(cache, beam_idx)
        return cache

    def _retrieve_logit_processors(self, generation_config, logits_processor, begin_index, num_beams, device):
        """Whisper's processors; with no-speech detection on, `ConfidentSilenceStop` after them; `LoopStop` last
        unless the generation config sets `loop_stop = False`."""
        processors = super()._retrieve_logit_processors(
            generation_config, logits_processor, begin_index, num_beams, device
        )
        processors = list(processors or ())
        detector = next((p for p in processors if isinstance(p, WhisperNoSpeechDetection)), None)
        if detector is not None:
            processors.append(ConfidentSilenceStop(detector, generation_config.eos_token_id))
        if getattr(generation_config, "loop_stop", True):
            processors.append(LoopStop(begin_index, generation_config.eos_token_id))
        return processors

    def _need_fallback(self, seek_sequence, seek_outputs, index, logits_processor, generation_config, *args):
        """Whisper's per-window decision (decode again at a higher temperature? skip as silence?), plus: a window
        at or above CONFIDENT_NO_SPEECH is skipped. Applies when `no_speech_threshold` is set (long-form default)."""
        needs_fallback, should_skip = super()._need_fallback(
            seek_sequence, seek_outputs, index, logits_processor, generation_config, *args
        )
        if generation_config.no_speech_threshold is None or should_skip:
            return needs_fallback, should_skip
        detector = next(p for p in logits_processor if isinstance(p, WhisperNoSpeechDetection))
        if bool(confidently_silent(detector)[index]):
            return False, True
        return needs_fallback, should_skip

    @torch.no_grad()
    def generate_from_text(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        language: str | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """Text in, text out: the decoder is prompted <|startoftranscript|><|language|><|transcribe|><|notimestamps|>
        and decodes with transformers' generic `generate` (greedy or beam search; `kwargs` are its options).

        input_ids, attention_mask: (batch, text_len), 1 = real token. language: the output's ("de", "german").
        Returns (batch, prompt + new tokens) ids, prompt included.
        """
        if language is None:
            raise ValueError("Text generation needs the output's language, e.g. language='de'.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        encoder_outputs = self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        return self._generate_from_encoding(encoder_outputs, attention_mask, language, generation_config, **kwargs)

    def generate_from_pose(
        self,
        pose_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        language: str = "en",
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """Sign-language keypoints in (`config.pose_frontend`), text out, prompted and decoded as `generate_from_text`.

        pose_values: (batch, frames, 27, 4) (pose.pose_values); attention_mask: (batch, frames), 1 = real frame.
        """
        if attention_mask is None:
            attention_mask = torch.ones(pose_values.shape[:2], dtype=torch.long, device=pose_values.device)
        encoder_outputs = self.get_encoder()(pose_values=pose_values, attention_mask=attention_mask)
        return self._generate_from_encoding(encoder_outputs, attention_mask, language, generation_config, **kwargs)

    @torch.no_grad()
    def generate_from_video(
        self,
        pixel_values,
        attention_mask: torch.Tensor | None = None,
        language: str = "en",
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """RGB video in (`config.patch_frontend`), text out, prompted and decoded as `generate_from_text`.

        pixel_values: (batch, frames, height, width, 3) pixels with attention_mask (batch, frames), 1 = real frame,
        or a list of (frames, height, width, 3) clips of any sizes (patches.py). The decoder cross-attends to the
        real tubelets only.
        """
        encoder_outputs = self.get_encoder()(pixel_values=pixel_values, attention_mask=attention_mask)
        tubelet_mask = encoder_outputs["attention_mask"]  # (batch, tubelets)
        return self._generate_from_encoding(encoder_outputs, tubelet_mask, language, generation_config, **kwargs)

    def _generate_from_encoding(self, encoder_outputs, attention_mask, language, generation_config, **kwargs):
        """Decode from a text, pose or video encoding: the <|sot|><|language|><|transcribe|><|notimestamps|> prompt,
        then transformers' generic `generate`."""
        prompt = text_decoder_prompt(generation_config or self.generation_config, language)
        generation_config, model_kwargs = self._prompted_generation_config(generation_config, len(prompt), **kwargs)
        rows = attention_mask.shape[0]
        decoder_input_ids = torch.tensor([prompt], device=attention_mask.device).expand(rows, -1)
        return GenerationMixin.generate(
            self,
            encoder_outputs=encoder_outputs,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            generation_config=generation_config,
            **model_kwargs,
        )

    @torch.no_grad()
    def generate_variable_length(
        self,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        language: str | None = None,
        task: str | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """Transcribe or translate with `config.variable_length_audio`: only real frames are encoded (packed), then
        the decoder is prompted <|startoftranscript|>[<|language|><|task|>]<|notimestamps|> and decodes greedily or
        with beam search (`kwargs` are transformers' generate options).

        input_features (batch, num_mel_bins, frames), attention_mask (batch, frames), 1 = real frame. A multilingual
        model detects each clip's language unless `language` is given. Returns (batch, new tokens) ids.
        """
        for option in ("return_timestamps", "return_token_timestamps", "return_segments", "prompt_ids"):
            if kwargs.pop(option, None):
                raise ValueError(f"{option} is not available with variable_length_audio (no 30 s windows).")
        generation_config = generation_config or self.generation_config
        encoder_outputs = self.get_encoder()(input_features, attention_mask=attention_mask)
        prompt = self._audio_prompt(encoder_outputs, generation_config, language, task)  # (batch, prompt_len)
        config, model_kwargs = self._prompted_generation_config(generation_config, prompt.shape[1], **kwargs)
        sequences = GenerationMixin.generate(
            self,
            encoder_outputs=encoder_outputs,
            decoder_input_ids=prompt,
            generation_config=config,
            **model_kwargs,
        )
        return sequences[:, prompt.shape[1] :]

    def _audio_prompt(
        self,
        encoder_outputs: BaseModelOutput,
        generation_config: GenerationConfig,
        language: str | None,
        task: str | None,
    ) -> torch.LongTensor:
        """(batch, prompt_len) decoder prompt; the language token per clip, detected when not given."""
        batch_size = encoder_outputs.last_hidden_state.shape[0]
        device = encoder_outputs.last_hidden_state.device
        start = torch.full((batch_size, 1), generation_config.decoder_start_token_id, device=device)
        no_timestamps = torch.full((batch_size, 1), generation_config.no_timestamps_token_id, device=device)
        if not getattr(generation_config, "is_multilingual", False):
            if language not in (None, "en", "english") or task not in (None, "transcribe"):
                raise ValueError("This English-only model transcribes English; it takes no language or task.")
            return torch.cat([start, no_timestamps], dim=1)
        language = language or getattr(generation_config, "language", None)
        if language is None:
            languages = self.detect_language(encoder_outputs=encoder_outputs, generation_config=generation_config)
        else:
            languages = torch.full((batch_size,), language_token_id(generation_config, language), device=device)
        task = task or getattr(generation_config, "task", None) or "transcribe"
        if task not in generation_config.task_to_id:
            raise ValueError(f"Unknown task {task!r}; choose one of {sorted(generation_config.task_to_id)}.")
        task_ids = torch.full((batch_size, 1), generation_config.task_to_id[task], device=device)
        return torch.cat([start, languages[:, None].to(start.dtype), task_ids, no_timestamps], dim=1)

    def _prompted_generation_config(
        self, generation_config: GenerationConfig | None, prompt_length: int, **kwargs
    ) -> tuple[GenerationConfig, dict]:
        """A copy of the generation config set up for text output and updated with `kwargs`; returns it and the
        kwargs that are no generation option (model inputs)."""
        config = copy.deepcopy(generation_config or self.generation_config)
        model_kwargs = config.update(**kwargs)
        # Whisper's audio-only settings that the generic generate would misapply; timestamps never belong in text
        config.forced_decoder_ids = None
        config.begin_suppress_tokens = None
        timestamps = range(config.no_timestamps_token_id + 1, self.config.vocab_size)
        config.suppress_tokens = [*(config.suppress_tokens or []), *timestamps]
        # the decoder has max_target_positions positions, the prompt's included
        room = self.config.max_target_positions - prompt_length
        if config.max_new_tokens is not None:
            config.max_new_tokens, config.max_length = min(config.max_new_tokens, room), None
        else:
            config.max_length = min(config.max_length or room, self.config.max_target_positions)
        return config, model_kwargs


__all__ = [
    "CONFIDENT_NO_SPEECH",
    "ConfidentSilenceStop",
    "LONG_FORM_DEFAULTS",
    "LoopStop",
    "TEXT_TASK",
    "WhisperMoEGenerationMixin",
    "confidently_silent",
    "end_rows",
    "language_token_id",
    "long_form_options",
    "looping_rows",
    "text_decoder_prompt",
]
