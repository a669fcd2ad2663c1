"""Speech recognition pipeline for WhisperMoE folders, shipped inside them as a custom pipeline.

transformers' ASR pipeline decodes the Whisper way (timestamps, chunked long-form, language and task) only when
`model_type == "whisper"` and treats every other model type as CTC. This subclass always takes the Whisper path and
decodes inputs with this package's audio loader (any format PyAV or libsndfile read, any sample rate, any channel
count), so it needs no ffmpeg binary and no torchaudio.

Audio longer than one 30 s window needs no option: the model's generate decodes it long-form (window after window,
silence skipped, see `generation_whisper_moe.LONG_FORM_DEFAULTS`), and the text and timestamps come from the
segments it returns, whose times are absolute. (Rebuilding them from the token stream, as the parent does, loses a
skipped window's 30 s.)

With `chunk_length_s` (the batched chunked algorithm) the chunks are always decoded with timestamps and stitched by
them, returned or not: without them transformers stitches chunks by matching overlapping token runs, which drops
words (40 % WER instead of 6.8 on a LibriSpeech chapter with tiny.en 8x2).

With `batch_size > 1` files of any lengths share a batch: each model input travels frame-major (see
`FRAME_MAJOR_FEATURES`) so that transformers' collate pads the frames, and each batch is split into its clips of up
to 30 s (decoded together as one window each) and its long files (decoded long-form together, each to its own
length), so every file gets the decoding it gets at batch 1.
"""

from pathlib import Path

import numpy as np
import torch
from transformers import AutomaticSpeechRecognitionPipeline

from .audio import load_audio
from .features import log_mel_30s

# transformers' pad collate pads axis 1 of a 3-D tensor, which for Whisper's (1, mel bins, frames) features is the
# mel axis: files of different lengths fail to batch. Features travel as (1, frames, mel bins) under this key, so the
# collate pads frames (with 0, as generate pads a last window; the attention mask with 0) and `_forward` turns them
# back.
FRAME_MAJOR_FEATURES = "input_features_frame_major"


class WhisperMoEASRPipeline(AutomaticSpeechRecognitionPipeline):
    @property
    def type(self) -> str:
        return "seq2seq_whisper"

    @type.setter
    def type(self, value: str) -> None:
        # The parent picks "ctc" for an unknown model_type; this model always decodes like Whisper.
        pass

    def _sanitize_parameters(self, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if preprocess_params.get("chunk_length_s") and not forward_params.get("return_timestamps"):
            forward_params["return_timestamps"] = postprocess_params["return_timestamps"] = True
            postprocess_params["timestamps_not_asked"] = True
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, inputs, chunk_length_s: float = 0, stride_length_s: float | None = None):
        """Decode `inputs` (path, bytes, array or dict) to mono audio at the feature extractor's rate, then chunk.

        A clip of up to 30 s gets its log-mel from `log_mel_30s`: the extractor's exact values at a fraction of its
        cost, since the STFT runs over the clip rather than the whole 30 s window. Every item's features are yielded
        frame-major (`FRAME_MAJOR_FEATURES`), with an attention mask (1, frames).
        """
        waveform = self._to_waveform(inputs)
        one_window = isinstance(waveform, np.ndarray) and len(waveform) <= self.feature_extractor.n_samples
        if one_window and not chunk_length_s:
            input_features, attention_mask = log_mel_30s(waveform, self.feature_extractor)
            if self.dtype is not None:
                input_features = input_features.to(self.dtype)
            items = [{"is_last": True, "input_features": input_features, "attention_mask": attention_mask}]
        else:
            items = super().preprocess(waveform, chunk_length_s, stride_length_s)
        for item in items:
            yield frame_major(item)

    def _forward(self, model_inputs, return_timestamps=False, return_language=None, **generate_kwargs):
        """Decode a batch: clips of up to one window together, long files together (long-form); one output per
        input row, in order."""
        options = {"return_timestamps": return_timestamps, "return_language": return_language, **generate_kwargs}
        long_rows = (model_inputs["attention_mask"].sum(-1) > self.feature_extractor.nb_max_frames).reshape(-1)
        if bool(long_rows.all()) or not bool(long_rows.any()):
            return self._forward_group(model_inputs, bool(long_rows.any()), options)
        rows = long_rows.shape[0]
        outputs = [None] * rows
        for is_long in (False, True):
            group = [row for row in range(rows) if bool(long_rows[row]) == is_long]
            output = self._forward_group(select_rows(model_inputs, group), is_long, options)
            for row, row_output in zip(group, split_rows(output, len(group))):
                outputs[row] = row_output
        return join_rows(outputs)

    def _forward_group(self, model_inputs: dict, long: bool, options: dict) -> dict:
        """Decode rows that are all clips of up to one window (`long` False) or all longer."""
        model_inputs = dict(model_inputs)
        attention_mask = model_inputs.pop("attention_mask")
        frames = int(attention_mask.sum(-1).max()) if long else self.feature_extractor.nb_max_frames
        features = model_inputs.pop(FRAME_MAJOR_FEATURES)[:, :frames].transpose(1, 2)  # (batch, mel bins, frames)
        model_inputs["input_features"] = features.contiguous()
        model_inputs["attention_mask"] = attention_mask[:, :frames]
        options = dict(options)
        return_timestamps, return_language = options.pop("return_timestamps"), options.pop("return_language")
        long_form = (
            long
            and "stride" not in model_inputs  # chunked long-form: windows of at most 30 s
            and return_timestamps != "word"
            and not return_language
        )
        if not long_form:
            return super()._forward(model_inputs, return_timestamps, return_language, **options)
        return self._forward_long_form(model_inputs, options)

    def _forward_long_form(self, model_inputs: dict, generate_kwargs: dict) -> dict:
        """Long-form generate over (batch, mel bins, frames) features, each row to its attention mask's length."""
        is_last = model_inputs.pop("is_last")
        outputs = self.model.generate(
            input_features=model_inputs.pop("input_features"),
            attention_mask=model_inputs.pop("attention_mask"),
            return_segments=True,
            **self._prepare_generate_kwargs(generate_kwargs),
        )
        segments = [  # per clip of the batch: [(start s, end s, tokens)]
            [(float(segment["start"]), float(segment["end"]), segment["tokens"]) for segment in clip]
            for clip in outputs["segments"]
        ]
        return {"is_last": is_last, "segments": segments, **model_inputs}

    def postprocess(
        self, model_outputs, decoder_kwargs=None, return_timestamps=None, return_language=None,
        timestamps_not_asked: bool = False,
    ) -> dict:  # fmt: skip
        """The parent's, plus long-form segments; `timestamps_not_asked`: chunked decoding used timestamps to stitch
        its chunks, and the caller gets the text alone."""
        # rows of a batch that mixed clips and long files hold None under the other kind's keys
        model_outputs = [{key: value for key, value in row.items() if value is not None} for row in model_outputs]
        if "segments" not in model_outputs[0]:
            result = super().postprocess(model_outputs, decoder_kwargs, return_timestamps, return_language)
            if timestamps_not_asked:
                result.pop("chunks", None)
            return result
        (output,) = model_outputs  # long-form audio is one model input, never chunked
        segments = output.pop("segments")
        if segments and isinstance(segments[0], list):  # a batch of one is not unbatched: [[segment, ...]]
            (segments,) = segments
        chunks = [
            {"text": self.tokenizer.decode(tokens, skip_special_tokens=True), "timestamp": (start, end)}
            for start, end, tokens in segments
        ]
        output.pop("is_last", None)
        result = {"text": "".join(chunk["text"] for chunk in chunks), **output}
        if return_timestamps:
            result["chunks"] = chunks
        return result

    def _to_waveform(self, inputs) -> np.ndarray | dict:
        sampling_rate = self.feature_extractor.sampling_rate
        if isinstance(inputs, (str, Path, bytes, bytearray)):
            return load_audio(inputs, sampling_rate)
        if isinstance(inputs, dict):
            waveform = load_audio(inputs, sampling_rate)
            decoded = {"raw": waveform, "sampling_rate": sampling_rate}
            if "stride" in inputs:
                # strides count samples at the input's rate
                ratio = sampling_rate / inputs.get("sampling_rate", sampling_rate)
                decoded["stride"] = tuple(round(side * ratio) for side in inputs["stride"])
            return decoded
        return inputs


def frame_major(item: dict) -> dict:
    """A preprocessed item with its (1, mel bins, frames) `input_features` moved to (1, frames, mel bins) under
    `FRAME_MAJOR_FEATURES`, and an attention mask (1, frames) of ones where it had none."""
    item = dict(item)
    features = item.pop("input_features")
    if item.get("attention_mask") is None:
        item["attention_mask"] = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long)
    item[FRAME_MAJOR_FEATURES] = features.transpose(1, 2).contiguous()
    return item


def select_rows(batch: dict, rows: list[int]) -> dict:
    """The `rows` of a collated batch: tensors indexed on their first axis, lists (non-tensor values) picked."""
    index = torch.tensor(rows)
    return {
        key: value[index] if isinstance(value, torch.Tensor) else [value[row] for row in rows]
        for key, value in batch.items()
    }


def split_rows(output: dict, rows: int) -> list[dict]:
    """A batched `_forward` output as one dict per row; a tensor row loses its batch axis (the pipeline's unbatching
    adds it back) and a list row is its element."""
    return [{key: value[row] for key, value in output.items()} for row in range(rows)]


def join_rows(rows: list[dict]) -> dict:
    """Per-row outputs as one batch output: each key a list over rows, None in rows without it."""
    keys = dict.fromkeys(key for row in rows for key in row)
    return {key: [row.get(key) for row in rows] for key in keys}
