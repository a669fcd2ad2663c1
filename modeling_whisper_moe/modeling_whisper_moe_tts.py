"""WhisperMoE text-to-speech: text in through the encoder's text front-end, Whisper log-mel frames out.

A parallel (non-autoregressive) model in the FastSpeech mould, built from the family's own parts:

    token ids -> WhisperMoEEncoder (text front-end + MoE layers) -> + speaker embedding
              -> duration predictor: frames per token
              -> length regulator: each token's encoding repeated over its frames, plus where in the token and in
                 the utterance each frame sits
              -> MoE decoder layers (self-attention over all frames, cross-attention to the text) -> mel head
              -> optional residual post-net -> (batch, frames, num_mel_bins) in Whisper's log-mel scaling

Each decoder position predicts `tts_reduction_factor` consecutive frames (Tacotron's reduction factor), which
divides the decoder's work by that factor; token durations are then whole multiples of it.

Training uses known durations (frames per token); generation predicts them, so the output length is decided up
front and every frame is computed in one pass. [`vocoder.py`](vocoder.py) turns the frames into audio.

Two models share this speech output ([`SpeechOutput`]): [`WhisperMoEForTextToSpeech`], a text-to-speech model
with its own encoder and mel-decoder layers, and [`WhisperMoEForSpeechAndText`], the generalist: Whisper's
encoder-decoder (speech or text in, text out) whose same encoder and decoder layers, with the same experts, also
speak. Which task runs is decided by the inputs: audio features or token ids into the encoder, and either the
decoder's prompt (language and task tokens, text out) or durations (mel frames out).
"""

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .configuration_whisper_moe import WhisperMoEConfig
from .hub import AUTO_MAP, atomic_directory, copy_hub_code, merged_custom_pipelines
from .modeling_whisper_moe import (
    WhisperMoEDecoderLayer,
    WhisperMoEEncoder,
    WhisperMoEForConditionalGeneration,
    WhisperMoEOutput,
    WhisperMoEPreTrainedModel,
    WhisperMoERouter,
    router_losses,
)

MAX_FRAMES_PER_TOKEN = 150  # 1.5 s: no single text token is spoken longer; caps runaway duration predictions
POSTNET_KERNEL = 5  # frames each post-net convolution sees (Tacotron 2)
DURATION_KERNEL = 3  # tokens each duration-predictor convolution sees
MAX_TIMESCALE = 10_000.0  # longest period of the sinusoidal position features, as in Whisper and the Transformer
# folders saved before the speech-only parts moved under `speech.` name them at the top level
LEGACY_SPEECH_KEYS = {
    r"^(speaker_projection|duration_predictor|progress_projection|mel_head|postnet)\.": r"speech.\1."
}
TTS_CLASS = "modeling_whisper_moe_tts.WhisperMoEForTextToSpeech"
GENERALIST_CLASS = "modeling_whisper_moe_tts.WhisperMoEForSpeechAndText"


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) positions: (...,) -> (..., dim), sines then cosines."""
    half = dim // 2
    inv_timescales = torch.exp(-math.log(MAX_TIMESCALE) * torch.arange(half, device=positions.device) / (half - 1))
    scaled = positions.float()[..., None] * inv_timescales  # (..., half)
    return torch.cat([scaled.sin(), scaled.cos()], dim=-1)


def padding_bias(key_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask that hides padded keys: (batch, key_len) 1/0 -> (batch, 1, query_len, key_len).

    Always a tensor, never None: with no mask the attention code would fall back to the decoder layer's causal
    default, and the mel decoder must see every frame.
    """
    hidden = (key_mask == 0)[:, None, None, :].expand(-1, 1, query_len, -1)
    return torch.zeros(hidden.shape, dtype=dtype, device=key_mask.device).masked_fill(hidden, torch.finfo(dtype).min)


def expand_to_frames(durations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The length regulator's bookkeeping for (batch, text_len) frames per token (0 on padding).

    Returns, each (batch, frames) with frames = the longest total: the token index of every frame, the frames since
    its token began, the frames left in its token after it, and the mask of real frames.
    """
    ends = durations.cumsum(dim=-1)  # (batch, text_len)
    total = ends[:, -1]  # (batch,)
    frames = torch.arange(int(total.max()), device=durations.device)  # (frames,)
    token_index = torch.searchsorted(ends, frames.expand(len(durations), -1).contiguous(), right=True)
    token_index = token_index.clamp(max=durations.shape[1] - 1)  # padding frames point at the last token
    starts = (ends - durations).gather(1, token_index)
    offset = frames[None] - starts
    remaining = durations.gather(1, token_index) - offset - 1
    frame_mask = (frames[None] < total[:, None]).long()
    return token_index, offset.clamp(min=0), remaining.clamp(min=0), frame_mask


@contextlib.contextmanager
def recording_router_logits(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the (tokens, num_experts) logits of every router inside `module` while the block runs."""
    logits: list[torch.Tensor] = []
    handles = [
        router.register_forward_hook(lambda _module, _inputs, output: logits.append(output[0]))
        for router in module.modules()
        if isinstance(router, WhisperMoERouter)
    ]
    try:
        yield logits
    finally:
        for handle in handles:
            handle.remove()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` (broadcastable to values' leading dims) is 1."""
    while mask.dim() < values.dim():
        mask = mask[..., None]
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------------------


class DurationPredictor(nn.Module):
    """FastSpeech's duration predictor: (batch, text_len, d_model) -> log(1 + frames) per token, (batch, text_len)."""

    def __init__(self, config: WhisperMoEConfig):
        super().__init__()
        width = config.d_model
        self.convs = nn.ModuleList(
            [nn.Conv1d(width, width, DURATION_KERNEL, padding=DURATION_KERNEL // 2) for _ in range(2)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(2)])
        self.dropout = config.dropout
        self.proj = nn.Linear(width, 1)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask[..., None].to(hidden_states.dtype)
        for conv, norm in zip(self.convs, self.norms):
            # zero padding first, so real tokens next to it do not read another sequence's filler
            hidden_states = F.relu(conv((hidden_states * mask).transpose(1, 2))).transpose(1, 2)
            hidden_states = F.dropout(norm(hidden_states), p=self.dropout, training=self.training)
        return self.proj(hidden_states).squeeze(-1) * mask.squeeze(-1)


class PostNet(nn.Module):
    """Tacotron 2's residual post-net: convolutions over time that add detail to the coarse mel prediction."""

    def __init__(self, config: WhisperMoEConfig):
        super().__init__()
        channels = [config.num_mel_bins] + [config.d_model] * (config.tts_postnet_layers - 1) + [config.num_mel_bins]
        self.convs = nn.ModuleList(
            [
                nn.Conv1d(c_in, c_out, POSTNET_KERNEL, padding=POSTNET_KERNEL // 2)
                for c_in, c_out in zip(channels, channels[1:])
            ]
        )
        self.dropout = config.dropout

    def forward(self, mel: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """(batch, frames, num_mel_bins) and its (batch, frames) mask -> the same, refined."""
        # padding frames are zeroed before every convolution, or they would leak into real frames at the edges
        mask = frame_mask[:, None, :].to(mel.dtype)
        hidden_states = mel.transpose(1, 2) * mask
        for index, conv in enumerate(self.convs):
            hidden_states = conv(hidden_states)
            if index < len(self.convs) - 1:
                hidden_states = F.dropout(torch.tanh(hidden_states), p=self.dropout, training=self.training) * mask
        return mel + hidden_states.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class WhisperMoETextToSpeechOutput(ModelOutput):
    """Output of [`WhisperMoEForTextToSpeech`].

    loss: mel_loss + tts_duration_loss_coef * duration_loss + aux_loss (given labels and durations).
    spectrogram: (batch, frames, num_mel_bins) predicted log-mel (after the post-net when there is one).
    log_durations: (batch, text_len) predicted log(1 + frames) per token.
    frames_mask: (batch, frames), 1 on real frames.
    aux_loss and its unweighted parts: the router losses, as in [`WhisperMoEOutput`].
    """

    loss: torch.Tensor | None = None
    spectrogram: torch.Tensor | None = None
    log_durations: torch.Tensor | None = None
    frames_mask: torch.Tensor | None = None
    mel_loss: torch.Tensor | None = None
    duration_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    encoder_aux_loss: torch.Tensor | None = None
    decoder_aux_loss: torch.Tensor | None = None
    encoder_z_loss: torch.Tensor | None = None
    decoder_z_loss: torch.Tensor | None = None


class SpeechOutput(nn.Module):
    """Log-mel output for a WhisperMoE model with a text front-end (see the module docstring).

    Holds every speech-only part (speaker projection, duration predictor, frame-progress projection, mel head,
    post-net); the host passes the text encoder, the decoder layers the frames run through and their final norm
    into each call, so those stay registered once, in the host.
    """

    def __init__(self, config: WhisperMoEConfig):
        super().__init__()
        if not config.text_frontend:
            raise ValueError(
                "Speech output reads text: it needs config.text_frontend=True (the encoder's text front-end), "
                "got False."
            )
        self.config = config
        speaker_dim = config.tts_speaker_embedding_dim
        self.speaker_projection = nn.Linear(speaker_dim, config.d_model) if speaker_dim > 0 else None
        self.duration_predictor = DurationPredictor(config)
        # where a frame sits inside its token (frames since its start, frames to its end) -> d_model
        self.progress_projection = nn.Linear(2 * config.d_model, config.d_model)
        self.mel_head = nn.Linear(config.d_model, config.tts_reduction_factor * config.num_mel_bins)
        self.postnet = PostNet(config) if config.tts_postnet_layers > 0 else None

    def encode_text(
        self,
        encoder: WhisperMoEEncoder,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        speaker_embeddings: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(batch, text_len) ids -> (batch, text_len, d_model) encoding with the speaker added, and router logits."""
        encoded = encoder(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
        hidden_states = encoded.last_hidden_state
        if self.speaker_projection is not None:
            if speaker_embeddings is None:
                # no speaker: the zero vector, which training shows the model as "any voice"
                speaker_embeddings = hidden_states.new_zeros(len(hidden_states), self.config.tts_speaker_embedding_dim)
            if speaker_embeddings.shape != (len(hidden_states), self.config.tts_speaker_embedding_dim):
                raise ValueError(
                    f"speaker_embeddings must be (batch, {self.config.tts_speaker_embedding_dim}) = "
                    f"({len(hidden_states)}, {self.config.tts_speaker_embedding_dim}), "
                    f"got {tuple(speaker_embeddings.shape)}."
                )
            speaker = self.speaker_projection(speaker_embeddings.to(hidden_states.dtype))
            hidden_states = hidden_states + speaker[:, None]
        elif speaker_embeddings is not None:
            raise ValueError("This model takes no speaker embedding (config.tts_speaker_embedding_dim=0).")
        return hidden_states, tuple(encoded.get("router_logits") or ())

    def decode_frames(
        self,
        decoder_layers: nn.ModuleList,
        decoder_norm: nn.LayerNorm,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        durations: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Text encoding (batch, text_len, d_model) and frames per token (batch, text_len) -> log-mel
        (batch, frames, num_mel_bins), frames mask (batch, frames), decoder-step mask (batch, frames / reduction)
        and the decoder's router logits."""
        reduction = self.config.tts_reduction_factor
        durations = durations * attention_mask
        if int(durations.sum(dim=-1).min()) < 1:
            raise ValueError(
                f"every sequence needs at least one frame; frame totals are {durations.sum(-1).tolist()}."
            )
        if bool((durations % reduction).any()):
            raise ValueError(
                f"durations must be multiples of tts_reduction_factor={reduction}, got {durations.tolist()}."
            )
        token_index, offset, remaining, step_mask = expand_to_frames(durations // reduction)  # per decoder step
        width = self.config.d_model
        hidden_states = text_states.gather(1, token_index[..., None].expand(-1, -1, width))
        progress = torch.cat([sinusoids(offset, width), sinusoids(remaining, width)], dim=-1)
        positions = torch.arange(step_mask.shape[1], device=step_mask.device)
        hidden_states = hidden_states + self.progress_projection(progress) + sinusoids(positions, width)
        hidden_states = F.dropout(hidden_states, p=self.config.dropout, training=self.training)
        num_steps, dtype = hidden_states.shape[1], hidden_states.dtype
        self_mask = padding_bias(step_mask, num_steps, dtype)
        cross_mask = padding_bias(attention_mask, num_steps, dtype)
        with recording_router_logits(decoder_layers) as router_logits:
            for layer in decoder_layers:
                hidden_states = layer(
                    hidden_states,
                    attention_mask=self_mask,
                    encoder_hidden_states=text_states,
                    encoder_attention_mask=cross_mask,
                    cache=None,
                    use_cache=False,
                )
        mel = self.mel_head(decoder_norm(hidden_states))  # (batch, steps, reduction * num_mel_bins)
        mel = mel.reshape(len(mel), num_steps * reduction, self.config.num_mel_bins)
        frame_mask = step_mask.repeat_interleave(reduction, dim=1)
        if self.postnet is not None:
            mel = self.postnet(mel, frame_mask)
        return mel, frame_mask, step_mask, tuple(router_logits)

    def forward(
        self,
        encoder: WhisperMoEEncoder,
        decoder_layers: nn.ModuleList,
        decoder_norm: nn.LayerNorm,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        durations: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        labels_mask: torch.Tensor | None = None,
        speaker_embeddings: torch.Tensor | None = None,
    ) -> WhisperMoETextToSpeechOutput:
        """Teacher-forced text-to-speech pass.

        input_ids, attention_mask: (batch, text_len); durations: (batch, text_len) frames per token (predicted when
        None); labels: (batch, frames, num_mel_bins) target log-mel with labels_mask (batch, frames); speaker
        embeddings: (batch, tts_speaker_embedding_dim). With labels and durations the loss is the masked L1 mel loss
        plus the weighted duration and router losses.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_states, encoder_logits = self.encode_text(encoder, input_ids, attention_mask, speaker_embeddings)
        log_durations = self.duration_predictor(text_states, attention_mask)
        if durations is None:
            durations = self.durations_from_log(log_durations, attention_mask)
        mel, frame_mask, step_mask, decoder_logits = self.decode_frames(
            decoder_layers, decoder_norm, text_states, attention_mask, durations
        )
        losses = router_losses(encoder_logits, decoder_logits, attention_mask, step_mask, self.config)
        output = WhisperMoETextToSpeechOutput(
            spectrogram=mel, log_durations=log_durations, frames_mask=frame_mask, **losses
        )
        if labels is not None:
            if labels.shape[:2] != mel.shape[:2]:
                raise ValueError(
                    f"labels cover {labels.shape[1]} frames but the durations sum to {mel.shape[1]}; "
                    "durations must count each label frame exactly once."
                )
            labels_mask = frame_mask if labels_mask is None else labels_mask
            output.mel_loss = masked_mean((mel - labels).abs(), labels_mask)
            target = torch.log1p(durations.float())
            output.duration_loss = masked_mean((log_durations - target) ** 2, attention_mask)
            loss = output.mel_loss + self.config.tts_duration_loss_coef * output.duration_loss
            output.loss = loss + output.aux_loss if output.aux_loss is not None else loss
        return output

    def durations_from_log(
        self, log_durations: torch.Tensor, attention_mask: torch.Tensor, speed: float = 1.0
    ) -> torch.LongTensor:
        """Predicted log(1 + frames) -> frames per token, (batch, text_len): a whole number of decoder steps, at
        least one and at most MAX_FRAMES_PER_TOKEN."""
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}.")
        reduction = self.config.tts_reduction_factor
        steps = torch.round(torch.expm1(log_durations.float()) / speed / reduction)
        steps = steps.clamp(1, MAX_FRAMES_PER_TOKEN // reduction).long()
        return steps * reduction * attention_mask.long()

    @torch.no_grad()
    def generate(
        self,
        parts: tuple[WhisperMoEEncoder, nn.ModuleList, nn.LayerNorm],
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        speaker_embeddings: torch.Tensor | None = None,
        speed: float = 1.0,
    ) -> list[torch.Tensor]:
        """Predict durations, then every frame at once: one (frames_i, num_mel_bins) log-mel per sequence.

        speed > 1 speaks faster (durations divided by it). The length is fixed by the predicted durations, so
        generation always stops.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        output = self(*parts, input_ids, attention_mask, speaker_embeddings=speaker_embeddings)
        if speed != 1.0:
            durations = self.durations_from_log(output.log_durations, attention_mask, speed)
            output = self(*parts, input_ids, attention_mask, durations, speaker_embeddings=speaker_embeddings)
        lengths = output.frames_mask.sum(dim=-1).tolist()
        return [mel[:length] for mel, length in zip(output.spectrogram, lengths)]


class SpeechOutputHost:
    """What both speaking models share: a `speech` [`SpeechOutput`] fed with the host's encoder, decoder layers
    and decoder norm (`speech_parts`), and the loading of folders saved before the speech parts moved under
    `speech.`."""

    speech: SpeechOutput

    def speech_parts(self) -> tuple[WhisperMoEEncoder, nn.ModuleList, nn.LayerNorm]:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("key_mapping", LEGACY_SPEECH_KEYS)
        return super().from_pretrained(*args, **kwargs)

    def forward_speech(self, input_ids: torch.LongTensor, *args, **kwargs) -> WhisperMoETextToSpeechOutput:
        """See [`SpeechOutput.forward`]."""
        return self.speech(*self.speech_parts(), input_ids, *args, **kwargs)

    def durations_from_log(self, *args, **kwargs) -> torch.LongTensor:
        """See [`SpeechOutput.durations_from_log`]."""
        return self.speech.durations_from_log(*args, **kwargs)

    def generate_speech(self, input_ids: torch.LongTensor, *args, **kwargs) -> list[torch.Tensor]:
        """See [`SpeechOutput.generate`]."""
        return self.speech.generate(self.speech_parts(), input_ids, *args, **kwargs)


class WhisperMoEForTextToSpeech(SpeechOutputHost, WhisperMoEPreTrainedModel):
    """Text -> Whisper log-mel frames with the WhisperMoE encoder and MoE decoder layers (see the module docstring).

    Needs `config.text_frontend=True` (the encoder's text front-end). The encoder's audio front-end stays in place,
    unused here, so the same encoder weights can serve speech recognition.
    """

    main_input_name = "input_ids"
    _no_split_modules = ["WhisperMoEEncoderLayer", "WhisperMoEDecoderLayer"]

    def __init__(self, config: WhisperMoEConfig):
        super().__init__(config)
        self.speech = SpeechOutput(config)  # first: it checks that config has a text front-end
        self.encoder = WhisperMoEEncoder(config)
        self.decoder_layers = nn.ModuleList([WhisperMoEDecoderLayer(config, i) for i in range(config.decoder_layers)])
        self.decoder_layer_norm = nn.LayerNorm(config.d_model)
        self.post_init()

    def speech_parts(self) -> tuple[WhisperMoEEncoder, nn.ModuleList, nn.LayerNorm]:
        return self.encoder, self.decoder_layers, self.decoder_layer_norm

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        durations: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        labels_mask: torch.Tensor | None = None,
        speaker_embeddings: torch.Tensor | None = None,
    ) -> WhisperMoETextToSpeechOutput:
        """See [`SpeechOutput.forward`]."""
        return self.forward_speech(input_ids, attention_mask, durations, labels, labels_mask, speaker_embeddings)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Write a self-contained Hub folder (weights, config with auto_map and custom_pipelines, code) atomically;
        `AutoModel` and `AutoModelForTextToSpectrogram` load this class."""
        tts_map = {"AutoModel": TTS_CLASS, "AutoModelForTextToSpectrogram": TTS_CLASS}
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP, **tts_map}
        self.config.custom_pipelines = merged_custom_pipelines(self.config, save_directory)
        with atomic_directory(save_directory) as staging:
            super().save_pretrained(staging, *args, **kwargs)
            copy_hub_code(staging)
            if not (Path(save_directory) / "README.md").exists():
                (staging / "README.md").write_text(_model_card(self), encoding="utf-8")


class WhisperMoEForSpeechAndText(SpeechOutputHost, WhisperMoEForConditionalGeneration):
    """The generalist: one WhisperMoE encoder-decoder for speech recognition and translation (audio in), text
    translation (token ids in) and text-to-speech (token ids in, log-mel out).

    Everything of [`WhisperMoEForConditionalGeneration`] (Whisper's generation, the text front-end, packed audio),
    plus speech output through the same encoder and decoder layers: for speech the decoder layers read
    frame positions instead of token embeddings, attend to all frames rather than causally, and a mel head replaces
    the language-model head. The forward picks the task from its inputs: `durations` or `spectrogram_labels` mean
    speech out, anything else is Whisper's text output. Needs `config.text_frontend=True`.
    """

    # the folders it saves load this class for speech-to-text, translation and text-to-speech alike
    hub_auto_map = {"AutoModelForSpeechSeq2Seq": GENERALIST_CLASS, "AutoModelForTextToSpectrogram": GENERALIST_CLASS}

    def __init__(self, config: WhisperMoEConfig):
        super().__init__(config)
        self.speech = SpeechOutput(config)
        self.post_init()

    def speech_parts(self) -> tuple[WhisperMoEEncoder, nn.ModuleList, nn.LayerNorm]:
        return self.model.encoder, self.model.decoder.layers, self.model.decoder.layer_norm

    def forward(
        self,
        input_features: torch.Tensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: tuple | None = None,
        cache=None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        durations: torch.LongTensor | None = None,
        spectrogram_labels: torch.Tensor | None = None,
        spectrogram_mask: torch.Tensor | None = None,
        speaker_embeddings: torch.Tensor | None = None,
        **kwargs,
    ) -> WhisperMoEOutput | WhisperMoETextToSpeechOutput:
        """Text out: Whisper's forward (see [`WhisperMoEForConditionalGeneration.forward`]). Speech out, when
        `durations` (batch, text_len) or `spectrogram_labels` (batch, frames, num_mel_bins) are given: the
        text-to-speech pass of [`SpeechOutput.forward`] on `input_ids`, with `spectrogram_mask` and
        `speaker_embeddings`."""
        if durations is not None or spectrogram_labels is not None:
            text_only = {"input_features": input_features, "labels": labels, "decoder_input_ids": decoder_input_ids,
                         "encoder_outputs": encoder_outputs}  # fmt: skip
            mixed = [name for name, value in text_only.items() if value is not None]
            if input_ids is None or mixed:
                raise ValueError(
                    "Speech output (durations / spectrogram_labels given) reads text: pass input_ids and none of "
                    f"{', '.join(text_only)}; got input_ids={'set' if input_ids is not None else None}, also {mixed}."
                )
            return self.forward_speech(
                input_ids, attention_mask, durations, spectrogram_labels, spectrogram_mask, speaker_embeddings
            )
        if speaker_embeddings is not None or spectrogram_mask is not None:
            raise ValueError("speaker_embeddings and spectrogram_mask belong to speech output: pass durations too.")
        return super().forward(
            input_features,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            cache=cache,
            decoder_inputs_embeds=decoder_inputs_embeds,
            decoder_position_ids=decoder_position_ids,
            labels=labels,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            num_items_in_batch=num_items_in_batch,
            input_ids=input_ids,
            **kwargs,
        )


def _model_card(model: WhisperMoEForTextToSpeech) -> str:
    config = model.config
    return (
        "---\nlibrary_name: transformers\npipeline_tag: text-to-audio\ntags: [whisper-moe, text-to-speech]\n---\n\n"
        "# WhisperMoE text-to-speech\n\n"
        f"A parallel text-to-speech model from the WhisperMoE family: {config.encoder_layers} text-encoder and "
        f"{config.decoder_layers} mel-decoder layers of width {config.d_model}, {config.num_experts} experts "
        f"(top-{config.num_experts_per_tok}) per sparse feed-forward block. It predicts 16 kHz Whisper log-mel "
        "frames; the built-in Griffin-Lim vocoder turns them into audio.\n\n"
        "```python\nfrom transformers import pipeline\n\n"
        'tts = pipeline("text-to-audio", model="path/to/this/folder", trust_remote_code=True)\n'
        'speech = tts("three one four one")  # {"audio": float32 array, "sampling_rate": 16000}\n```\n'
    )


__all__ = [
    "SpeechOutput",
    "WhisperMoEForSpeechAndText",
    "WhisperMoEForTextToSpeech",
    "WhisperMoETextToSpeechOutput",
]
