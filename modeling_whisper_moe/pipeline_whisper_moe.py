"""Speech recognition pipeline for WhisperMoE folders, shipped inside them as a custom pipeline.

transformers' ASR pipeline decodes the Whisper way (timestamps, chunked long-form, language and task) only when
`model_type == "whisper"` and treats every other model type as CTC. This subclass always takes the Whisper path and
decodes inputs with this package's audio loader (any format PyAV or libsndfile read, any sample rate, any channel
count), so it needs no ffmpeg binary and no torchaudio.

Audio longer than one 30 s window needs no option: the model's generate decodes it long-form (window after window,
silence skipped, see `generation_whisper_moe.LONG_FORM_DEFAULTS`), and the text and timestamps come from the
segments it returns, whose times are absolute. (Rebuilding them from the token stream, as the parent does, loses a
skipped window's 30 s.)
"""

from pathlib import Path

import numpy as np
from transformers import AutomaticSpeechRecognitionPipeline

from .audio import load_audio
from .features import log_mel_30s


class WhisperMoEASRPipeline(AutomaticSpeechRecognitionPipeline):
    @property
    def type(self) -> str:
        return "seq2seq_whisper"

    @type.setter
    def type(self, value: str) -> None:
        # The parent picks "ctc" for an unknown model_type; this model always decodes like Whisper.
        pass

    def preprocess(self, inputs, chunk_length_s: float = 0, stride_length_s: float | None = None):
        """Decode `inputs` (path, bytes, array or dict) to mono audio at the feature extractor's rate, then chunk.

        A clip of up to 30 s gets its log-mel from `log_mel_30s`: the extractor's exact values at a fraction of its
        cost, since the STFT runs over the clip rather than the whole 30 s window.
        """
        waveform = self._to_waveform(inputs)
        one_window = isinstance(waveform, np.ndarray) and len(waveform) <= self.feature_extractor.n_samples
        if one_window and not chunk_length_s:
            input_features, attention_mask = log_mel_30s(waveform, self.feature_extractor)
            if self.dtype is not None:
                input_features = input_features.to(self.dtype)
            yield {"is_last": True, "input_features": input_features, "attention_mask": attention_mask}
            return
        yield from super().preprocess(waveform, chunk_length_s, stride_length_s)

    def _forward(self, model_inputs, return_timestamps=False, return_language=None, **generate_kwargs):
        features = model_inputs.get("input_features")
        long_form = (
            features is not None
            and features.shape[-1] > self.feature_extractor.nb_max_frames
            and "stride" not in model_inputs  # chunked long-form: windows of at most 30 s
            and return_timestamps != "word"
            and not return_language
        )
        if not long_form:
            return super()._forward(model_inputs, return_timestamps, return_language, **generate_kwargs)
        is_last = model_inputs.pop("is_last")
        outputs = self.model.generate(
            input_features=model_inputs.pop("input_features"),
            attention_mask=model_inputs.pop("attention_mask", None),
            return_segments=True,
            **self._prepare_generate_kwargs(generate_kwargs),
        )
        segments = [  # per clip of the batch: [(start s, end s, tokens)]
            [(float(segment["start"]), float(segment["end"]), segment["tokens"]) for segment in clip]
            for clip in outputs["segments"]
        ]
        return {"is_last": is_last, "segments": segments, **model_inputs}

    def postprocess(self, model_outputs, decoder_kwargs=None, return_timestamps=None, return_language=None):
        if "segments" not in model_outputs[0]:
            return super().postprocess(model_outputs, decoder_kwargs, return_timestamps, return_language)
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
