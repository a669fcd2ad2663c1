"""The patch front-end: RGB video cut into tubelets, as encoder inputs of WhisperMoE.

A clip of (frames, height, width, 3) pixels is cut into tubelets of `video_tubelet_frames` x `video_patch_size` x
`video_patch_size` (ViViT's tubelet embedding); each is flattened and projected to `d_model`. Positions are
factorised: a patch's row and column enter as *fractional* places (index / patches along that axis, in [0, 1), as
NaViT does), each looked up in a learned table over `video_position_buckets` buckets, so the top-left quarter of a
64 x 64 clip and of a 128 x 128 one get the same embedding and any resolution maps into one position space; the
tubelet's time enters as its index through Whisper's sinusoids, so a longer clip only reaches further (a sign's
speed is part of what it says, which a fractional time would hide).

Clips of different sizes share a batch as a list (or as one zero-padded tensor with an `attention_mask` of real
frames): each clip becomes its own tokens, padded to the batch's longest with a mask of real tokens, and gets exactly
the tokens it would get alone. While training, `video_token_dropout` of each clip's tokens are dropped at random
(NaViT's token dropping), the kept ones in their order; evaluation and generation keep every token.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn
from transformers.models.whisper.modeling_whisper import sinusoids

from .configuration_whisper_moe import WhisperMoEConfig

RGB = 3  # channels of a frame
PIXEL_RANGE = 255.0  # uint8 pixels are scaled to [0, 1]

Video = torch.Tensor | list[torch.Tensor]  # (batch, frames, height, width, 3), or clips of (frames, height, width, 3)


def kept_tokens(tokens: int, dropout: float) -> int:
    """How many of a clip's `tokens` token dropping keeps: at least one, the same count for every draw."""
    return max(1, math.ceil(tokens * (1.0 - dropout)))


def clip_tokens(config: WhisperMoEConfig, frames: int, height: int, width: int) -> int:
    """Tubelets of a (frames, height, width, 3) clip: time rounded up (the last frame repeats), sides cropped."""
    tubelets = math.ceil(frames / config.video_tubelet_frames)
    return tubelets * (height // config.video_patch_size) * (width // config.video_patch_size)


def tubelet_mask(config: WhisperMoEConfig, pixel_values: Video, attention_mask: torch.Tensor | None = None,
                 training: bool = False) -> torch.Tensor:  # fmt: skip
    """(batch, tokens) bool of the real tokens the front-end gives `pixel_values` (as `PatchFrontend.forward` takes
    them), after token dropping when `training`: what the routers of the encoder see, without running it."""
    clips = split_clips(pixel_values, attention_mask)
    counts = [clip_tokens(config, *clip.shape[:3]) for clip in clips]
    if training and config.video_token_dropout > 0:
        counts = [kept_tokens(count, config.video_token_dropout) for count in counts]
    counts = torch.tensor(counts, device=clips[0].device)
    return torch.arange(int(counts.max()), device=counts.device)[None] < counts[:, None]


def fit_clip(config: WhisperMoEConfig, video: np.ndarray) -> np.ndarray:
    """(frames, height, width, 3) -> the same, with frames evenly dropped until the clip's tubelets fit
    `max_source_positions` (a long video read at `video_fps` and `video_size`)."""
    per_tubelet = clip_tokens(config, config.video_tubelet_frames, *video.shape[1:3])
    if per_tubelet == 0:
        raise ValueError(f"A video of {video.shape[1]}x{video.shape[2]} pixels is smaller than one patch of "
                         f"{config.video_patch_size}; read it at a larger size.")  # fmt: skip
    most_frames = (config.max_source_positions // per_tubelet) * config.video_tubelet_frames
    if len(video) <= most_frames:
        return video
    return video[np.linspace(0, len(video) - 1, most_frames).round().astype(int)]


class PatchFrontend(nn.Module):
    """RGB video -> (batch, tokens, d_model) tubelet embeddings with factorised positions, and (batch, tokens) mask."""

    def __init__(self, config: WhisperMoEConfig):
        super().__init__()
        self.config = config
        self.tubelet, self.patch = config.video_tubelet_frames, config.video_patch_size
        self.proj = nn.Linear(self.tubelet * self.patch * self.patch * RGB, config.d_model)
        self.norm = nn.LayerNorm(config.d_model)
        self.embed_rows = nn.Embedding(config.video_position_buckets, config.d_model)
        self.embed_columns = nn.Embedding(config.video_position_buckets, config.d_model)

    def forward(self, pixel_values: Video, attention_mask: torch.Tensor | None = None):
        """pixel_values: (batch, frames, height, width, 3) uint8 or float in [0, 255], or a list of such clips
        (frames, height, width, 3) of any sizes; attention_mask: (batch, frames), 1 = real frame (tensor input).
        Returns (embeddings (batch, tokens, d_model), mask (batch, tokens), 1 = real token)."""
        clips = [self.embed_clip(clip) for clip in split_clips(pixel_values, attention_mask)]
        if self.training and self.config.video_token_dropout > 0:
            clips = [self.drop_tokens(clip) for clip in clips]
        longest = max(len(clip) for clip in clips)
        embeddings = clips[0].new_zeros(len(clips), longest, clips[0].shape[-1])
        mask = torch.zeros(len(clips), longest, dtype=torch.long, device=embeddings.device)
        for row, clip in enumerate(clips):
            embeddings[row, : len(clip)] = clip
            mask[row, : len(clip)] = 1
        return embeddings, mask

    def embed_clip(self, clip: torch.Tensor) -> torch.Tensor:
        """(frames, height, width, 3) -> (tubelets, d_model): time-major, then rows, then columns."""
        tubelets = self.tubelets(clip)  # (time, rows, columns, t * p * p * 3)
        time, rows, columns = tubelets.shape[:3]
        if time * rows * columns > self.config.max_source_positions:
            raise ValueError(
                f"A clip of {tuple(clip.shape[:3])} (frames, height, width) gives {time * rows * columns} tubelets, "
                f"more than max_source_positions={self.config.max_source_positions}: read it at a lower fps or size "
                "(patches.fit_clip drops frames evenly until it fits)."
            )
        pixels = tubelets.to(self.proj.weight.dtype) / PIXEL_RANGE
        hidden = self.norm(self.proj(pixels))  # (time, rows, columns, d_model)
        device = hidden.device
        when = sinusoids(time, hidden.shape[-1]).to(device, hidden.dtype)[:, None, None]
        row = self.embed_rows(self.buckets(rows, device))[None, :, None]
        column = self.embed_columns(self.buckets(columns, device))[None, None, :]
        return (hidden + when + row + column).flatten(0, 2)

    def tubelets(self, clip: torch.Tensor) -> torch.Tensor:
        """(frames, height, width, 3) -> (time, rows, columns, t * p * p * 3): the last frame repeated to fill the
        last tubelet, the sides centre-cropped to whole patches."""
        frames, height, width = clip.shape[:3]
        rows, columns = height // self.patch, width // self.patch
        if rows == 0 or columns == 0:
            raise ValueError(f"A clip of {height}x{width} (height x width) pixels is smaller than one patch of "
                             f"{self.patch}; read it at a larger size.")  # fmt: skip
        top, left = (height - rows * self.patch) // 2, (width - columns * self.patch) // 2
        clip = clip[:, top : top + rows * self.patch, left : left + columns * self.patch]
        missing = -frames % self.tubelet
        if missing:
            clip = torch.cat([clip, clip[-1:].expand(missing, *clip.shape[1:])])
        t, p = self.tubelet, self.patch
        cut = clip.reshape(-1, t, rows, p, columns, p, RGB)  # (time, t, rows, p, columns, p, 3)
        return cut.permute(0, 2, 4, 1, 3, 5, 6).flatten(3)

    def buckets(self, patches: int, device: torch.device) -> torch.Tensor:
        """(patches,) bucket of each index's fractional place index / patches (NaViT)."""
        fraction = torch.arange(patches, device=device, dtype=torch.float64) / patches  # in [0, 1)
        return (fraction * self.config.video_position_buckets).floor().long()

    def drop_tokens(self, clip: torch.Tensor) -> torch.Tensor:
        """(tokens, d_model) -> (kept, d_model): a random subset, in order."""
        keep = kept_tokens(len(clip), self.config.video_token_dropout)
        chosen = torch.randperm(len(clip), device=clip.device)[:keep].sort().values
        return clip[chosen]


def split_clips(pixel_values: Video, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The batch's clips, each (frames, height, width, 3) with only its real frames; raises on ill-shaped input."""
    if isinstance(pixel_values, list | tuple):
        if attention_mask is not None:
            raise ValueError("A list of clips carries its own sizes; pass no attention_mask with it.")
        clips = list(pixel_values)
    elif torch.is_tensor(pixel_values) and pixel_values.ndim == 5:
        lengths = [pixel_values.shape[1]] * len(pixel_values)
        if attention_mask is not None:
            if attention_mask.shape != pixel_values.shape[:2]:
                raise ValueError(f"attention_mask must be (batch, frames) = {tuple(pixel_values.shape[:2])}, got "
                                 f"{tuple(attention_mask.shape)}.")  # fmt: skip
            lengths = attention_mask.sum(-1).tolist()
        clips = [clip[: int(length)] for clip, length in zip(pixel_values, lengths)]
    else:
        shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be (batch, frames, height, width, 3) or a list of (frames, height, "
                         f"width, 3) clips, got {shape}.")  # fmt: skip
    if not clips:
        raise ValueError("pixel_values holds no clip.")
    for index, clip in enumerate(clips):
        if not torch.is_tensor(clip) or clip.ndim != 4 or clip.shape[-1] != RGB or clip.shape[0] == 0:
            shape = tuple(clip.shape) if torch.is_tensor(clip) else type(clip).__name__
            raise ValueError(f"clip {index} must be (frames > 0, height, width, 3) RGB, got {shape}.")
    return clips


def add_patch_frontend(model: nn.Module) -> nn.Module:
    """Give a WhisperMoE's encoder a patch front-end (new weights) and set `config.patch_frontend`; in place. Audio,
    text and pose inputs are untouched."""
    encoder = model.get_encoder()
    if not model.config.patch_frontend:
        model.config.patch_frontend = True
        try:
            model.config.check_video()
        except ValueError:
            model.config.patch_frontend = False
            raise
        reference = encoder.layer_norm.weight
        frontend = PatchFrontend(model.config).to(reference.device, reference.dtype).train(encoder.training)
        encoder.embed_patches = frontend  # in the model's mode: an evaluated model drops no tokens
        for table in (frontend.embed_rows, frontend.embed_columns):
            nn.init.normal_(table.weight, std=model.config.init_std)
    return model


def read_clip(config: WhisperMoEConfig, source) -> np.ndarray:
    """What the video-to-text pipeline gives a patch front-end: a video file (path or bytes, read by `load_video` at
    `video_fps` and `video_size`) or a (frames, height, width, 3) array of RGB frames, with frames evenly dropped
    until it fits (`fit_clip`)."""
    from .video import load_video

    if isinstance(source, str | os.PathLike | bytes | bytearray):
        video = load_video(source, fps=config.video_fps, size=config.video_size)
    elif isinstance(source, np.ndarray | torch.Tensor):
        video = np.asarray(source)
    else:
        raise TypeError(f"a video is a file path, its bytes or a (frames, height, width, 3) array, got "
                        f"{type(source).__name__}")  # fmt: skip
    if video.ndim != 4 or video.shape[-1] != RGB or len(video) == 0:
        raise ValueError(f"a video must be (frames > 0, height, width, 3) RGB frames, got {video.shape}")
    return fit_clip(config, video)
