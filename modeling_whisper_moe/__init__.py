"""WhisperMoE: Mixture-of-Experts Whisper, upcycled from any dense Whisper checkpoint.

Importing the package registers the classes with transformers' Auto classes, so `AutoModelForSpeechSeq2Seq`,
`AutoModelForTextToSpectrogram` (text-to-speech), `AutoModel`, `AutoConfig` and `AutoProcessor` resolve
`model_type="whisper_moe"` without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSpeechSeq2Seq,
    AutoModelForTextToSpectrogram,
    AutoProcessor,
)

from .audio import load_audio
from .configuration_whisper_moe import WhisperMoEConfig
from .modeling_whisper_moe import (
    WhisperMoEForConditionalGeneration,
    WhisperMoEModel,
    WhisperMoEPreTrainedModel,
    load_balancing_loss,
    router_z_loss,
)
from .modeling_whisper_moe_tts import WhisperMoEForSpeechAndText, WhisperMoEForTextToSpeech
from .pipeline_text_to_audio import WhisperMoETextToAudioPipeline
from .pipeline_whisper_moe import WhisperMoEASRPipeline
from .processing_whisper_moe import WhisperMoEProcessor
from .video import iter_video, load_video

__version__ = "0.1.0"

AutoConfig.register(WhisperMoEConfig.model_type, WhisperMoEConfig, exist_ok=True)
AutoModel.register(WhisperMoEConfig, WhisperMoEModel, exist_ok=True)
# Two classes answer for one config: transformers picks the one in the folder's config.architectures (the first
# when none matches), so a generalist folder loads as the generalist even when this package is importable.
AutoModelForSpeechSeq2Seq.register(
    WhisperMoEConfig, (WhisperMoEForConditionalGeneration, WhisperMoEForSpeechAndText), exist_ok=True
)
AutoProcessor.register(WhisperMoEConfig, WhisperMoEProcessor, exist_ok=True)
AutoModelForTextToSpectrogram.register(
    WhisperMoEConfig, (WhisperMoEForTextToSpeech, WhisperMoEForSpeechAndText), exist_ok=True
)
WhisperMoEProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "WhisperMoEASRPipeline",
    "WhisperMoEConfig",
    "WhisperMoEForConditionalGeneration",
    "WhisperMoEForSpeechAndText",
    "WhisperMoEForTextToSpeech",
    "WhisperMoEModel",
    "WhisperMoEPreTrainedModel",
    "WhisperMoEProcessor",
    "WhisperMoETextToAudioPipeline",
    "iter_video",
    "load_audio",
    "load_balancing_loss",
    "load_video",
    "router_z_loss",
]
