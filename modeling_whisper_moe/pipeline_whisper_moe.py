"""Speech recognition pipeline for WhisperMoE folders, shipped inside them as a custom pipeline.

transformers' ASR pipeline decodes the Whisper way (timestamps, chunked long-form, language and task) only when
`model_type == "whisper"` and treats every other model type as CTC. This subclass always takes the Whisper path and
decodes inputs with this package's audio loader (any format PyAV or libsndfile read, any sample rate, any channel
count), so it needs no ffmpeg binary and no torchaudio.
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
