"""Text-to-speech pipeline for WhisperMoE folders, shipped inside them as a custom "text-to-audio" pipeline.

    tts = pipeline("text-to-audio", model=folder, trust_remote_code=True)
    tts("three one four one")  # {"audio": float32 (samples,), "sampling_rate": 16000}

Text is normalised the way training data is (digits spelled out as words, lower case, single spaces), the model
predicts Whisper log-mel frames, and a vocoder makes audio: Griffin-Lim by default, or any vocoder passed as
`vocoder=` (a callable or a transformers model such as `SpeechT5HifiGan` mapping (batch, frames, mel) to audio).
"""

import os
import re

import numpy as np
import torch
from transformers import Pipeline

from .audio import save_audio
from .features import SAMPLING_RATE
from .vocoder import MelVocoder, mel_to_waveform

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
write_audio = save_audio  # the older name; `audio.save_audio` writes .wav / .flac atomically


def normalize_tts_text(text: str) -> str:
    """The text form the model is trained on: '3141, Go!' -> 'three one four one, go!'."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text to speak must be a non-empty string, got {text!r}.")
    text = re.sub(r"\d", lambda digit: f" {DIGIT_WORDS[int(digit.group())]} ", text)
    return " ".join(text.lower().split())


class WhisperMoETextToAudioPipeline(Pipeline):
    """Text -> {"audio": float32 (samples,), "sampling_rate": 16000} with a [`WhisperMoEForTextToSpeech`].

    Call options: `speaker_embeddings` ((tts_speaker_embedding_dim,) or (1, dim) array/tensor; none means "any
    voice"), `speed` (> 1 speaks faster), `output_path` (also write a .wav / .flac file there).
    """

    _load_tokenizer = True
    _load_feature_extractor = False
    _load_image_processor = False
    _load_processor = False

    def __init__(self, *args, vocoder: MelVocoder | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.vocoder = vocoder
        self.sampling_rate = SAMPLING_RATE

    def _sanitize_parameters(self, speaker_embeddings=None, speed: float | None = None, output_path=None, **kwargs):
        forward_params = {}
        if speaker_embeddings is not None:
            forward_params["speaker_embeddings"] = speaker_embeddings
        if speed is not None:
            forward_params["speed"] = speed
        postprocess_params = {"output_path": output_path} if output_path is not None else {}
        return {}, forward_params, postprocess_params

    def preprocess(self, text: str) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(" " + normalize_tts_text(text), add_special_tokens=False, return_tensors="pt")
        return {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}

    def _forward(self, model_inputs: dict[str, torch.Tensor], speaker_embeddings=None, speed: float = 1.0) -> dict:
        if speaker_embeddings is not None:
            speaker_embeddings = torch.as_tensor(np.asarray(speaker_embeddings), dtype=torch.float32).reshape(1, -1)
            speaker_embeddings = speaker_embeddings.to(self.model.device)
        (mel,) = self.model.generate_speech(
            model_inputs["input_ids"],
            model_inputs["attention_mask"],
            speaker_embeddings=speaker_embeddings,
            speed=speed,
        )
        return {"waveform": mel_to_waveform(mel.float().cpu(), self.vocoder)}

    def postprocess(self, model_outputs: dict, output_path: str | os.PathLike | None = None) -> dict:
        audio = model_outputs["waveform"].cpu().numpy().astype(np.float32)
        if output_path is not None:
            save_audio(output_path, audio, self.sampling_rate)
        return {"audio": audio, "sampling_rate": self.sampling_rate}
