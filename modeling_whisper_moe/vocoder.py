"""A Griffin-Lim vocoder that turns Whisper log-mel frames back into a waveform.

The text-to-speech model predicts the log-mel frames Whisper's feature extractor computes ([`features.py`](features.py)
has the one definition), so training targets, the vocoder and Whisper-based checks of the output agree.

Griffin-Lim needs no weights, so speech comes out offline. Any other vocoder (a `SpeechT5HifiGan`, or any callable
mapping (batch, frames, num_mel_bins) to (batch, samples)) can be passed to [`mel_to_waveform`] instead.
"""

from collections.abc import Callable

import torch

# the log-mel itself lives in features.py; its names stay importable from here for the TTS code that uses them
from .features import (
    DYNAMIC_RANGE,
    HOP_LENGTH,
    LOG_FLOOR,
    LOG_OFFSET,
    LOG_SCALE,
    N_FFT,
    SAMPLING_RATE,
    log_mel_spectrogram,
    mel_filters,
    stft,
)

NNLS_ITERATIONS = 30  # multiplicative updates refining the mel -> linear-power inversion
GRIFFIN_LIM_ITERATIONS = 48
GRIFFIN_LIM_MOMENTUM = 0.99  # "fast Griffin-Lim" (Perraudin et al., 2013): converges in far fewer iterations
EPSILON = 1e-8

MelVocoder = Callable[[torch.Tensor], torch.Tensor]


def mel_to_linear_power(log_mel: torch.Tensor) -> torch.Tensor:
    """Invert the mel filterbank: (batch, frames, num_mel_bins) log-mel -> (batch, N_FFT // 2 + 1, frames) power.

    The filterbank is wide (80 bins for 201 frequencies), so the inverse is a non-negative least-squares problem:
    start from the pseudo-inverse clipped at zero and refine with multiplicative updates, which keep every power
    non-negative.
    """
    filters = mel_filters(log_mel.shape[-1], log_mel.device)  # (mel, freq)
    mel_power = 10.0 ** (log_mel.float() * LOG_SCALE - LOG_OFFSET)  # undo Whisper's scaling
    mel_power = mel_power.transpose(1, 2)  # (batch, mel, frames)
    power = (torch.linalg.pinv(filters) @ mel_power).clamp(min=LOG_FLOOR)  # (batch, freq, frames)
    gram, target = filters.T @ filters, filters.T @ mel_power
    for _ in range(NNLS_ITERATIONS):
        power = power * target / (gram @ power + LOG_FLOOR)
    return power


def griffin_lim(magnitude: torch.Tensor, iterations: int = GRIFFIN_LIM_ITERATIONS, seed: int = 0) -> torch.Tensor:
    """Estimate a phase for an STFT magnitude: (batch, N_FFT // 2 + 1, frames) -> (batch, frames * HOP_LENGTH).

    Fast Griffin-Lim: alternate between the signal a magnitude-plus-phase spectrogram implies and the phase of that
    signal's STFT, extrapolating each phase update with momentum.
    """
    # Whisper drops the STFT's last frame; repeating the final one restores the count istft expects
    magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)
    length = (magnitude.shape[-1] - 1) * HOP_LENGTH
    window = torch.hann_window(N_FFT, device=magnitude.device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    phase = torch.rand(magnitude.shape, generator=generator).to(magnitude.device) * 2 * torch.pi
    angles = torch.polar(torch.ones_like(magnitude), phase)
    previous = torch.zeros_like(angles)
    for _ in range(iterations):
        waveform = torch.istft(magnitude * angles, N_FFT, HOP_LENGTH, window=window, center=True, length=length)
        rebuilt = stft(waveform)
        angles = rebuilt - previous * (GRIFFIN_LIM_MOMENTUM / (1 + GRIFFIN_LIM_MOMENTUM))
        angles = angles / angles.abs().clamp(min=EPSILON)
        previous = rebuilt
    return torch.istft(magnitude * angles, N_FFT, HOP_LENGTH, window=window, center=True, length=length)


class GriffinLimVocoder:
    """The built-in vocoder: Whisper log-mel (batch, frames, num_mel_bins) -> 16 kHz waveform (batch, samples)."""

    sampling_rate = SAMPLING_RATE

    def __init__(self, iterations: int = GRIFFIN_LIM_ITERATIONS, seed: int = 0):
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}.")
        self.iterations = iterations
        self.seed = seed

    @torch.no_grad()
    def __call__(self, log_mel: torch.Tensor) -> torch.Tensor:
        magnitude = mel_to_linear_power(log_mel).sqrt()
        waveform = griffin_lim(magnitude, self.iterations, self.seed)
        # Griffin-Lim's level is arbitrary: peak-normalise with headroom so files never clip
        peak = waveform.abs().amax(dim=-1, keepdim=True).clamp(min=EPSILON)
        return 0.9 * waveform / peak


def mel_to_waveform(log_mel: torch.Tensor, vocoder: MelVocoder | None = None) -> torch.Tensor:
    """Turn log-mel frames into audio with `vocoder` (Griffin-Lim when None).

    log_mel: (frames, num_mel_bins) or (batch, frames, num_mel_bins) in Whisper's scaling. A passed vocoder gets
    (batch, frames, num_mel_bins) and returns (batch, samples) or (samples,) audio; a transformers vocoder such as
    `SpeechT5HifiGan` fits this call, but expects its own mel scaling, so train it (or convert the frames) to match.
    Returns float32 (samples,) or (batch, samples).
    """
    if log_mel.dim() not in (2, 3):
        raise ValueError(
            f"log_mel must be (frames, num_mel_bins) or (batch, frames, num_mel_bins), got {tuple(log_mel.shape)}."
        )
    batched = log_mel.dim() == 3
    log_mel = log_mel if batched else log_mel[None]
    vocoder = vocoder if vocoder is not None else GriffinLimVocoder()
    if not callable(vocoder):
        raise TypeError(f"vocoder must be callable (frames -> audio), got {type(vocoder).__name__}.")
    parameter = next(vocoder.parameters(), None) if isinstance(vocoder, torch.nn.Module) else None
    if parameter is not None:
        log_mel = log_mel.to(device=parameter.device, dtype=parameter.dtype)
    with torch.no_grad():
        waveform = vocoder(log_mel)
    waveform = waveform.float().reshape(log_mel.shape[0], -1)
    return waveform if batched else waveform[0]


__all__ = [
    "GriffinLimVocoder",
    "mel_to_waveform",
    # re-exported from features.py for older imports; import them from there
    "DYNAMIC_RANGE",
    "HOP_LENGTH",
    "LOG_SCALE",
    "N_FFT",
    "SAMPLING_RATE",
    "log_mel_spectrogram",
]
