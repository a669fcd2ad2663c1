"""Seeded waveform augmentation for training: speed perturbation, random gain and additive Gaussian noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modeling_whisper_moe.audio import SAMPLING_RATE, resample

# Speed factors are rounded to 1 % steps so that the resampling ratio reduces to a small fraction (0.93 at 16 kHz
# is 14_880 -> 16_000 Hz = 93 / 100), which keeps the resampler on its fast polyphase path.
SPEED_RESOLUTION = 0.01

__all__ = ["AugmentConfig", "WaveformAugmenter"]


@dataclass
class AugmentConfig:
    """Probabilities and ranges of the augmentations; each is applied independently, in the order of the fields.

    Flat float fields, so that `HfArgumentParser` reads them from a JSON recipe.
    """

    speed_prob: float = 0.3  # chance of speed perturbation (tempo and pitch change together, like `sox speed`)
    speed_min: float = 0.9  # Kaldi's speed perturbation (Ko et al., 2015) uses 0.9, 1.0 and 1.1
    speed_max: float = 1.1
    gain_prob: float = 0.5  # chance of a random gain
    gain_db_min: float = -6.0  # a quieter or louder microphone; samples may exceed [-1, 1] (no clipping)
    gain_db_max: float = 6.0
    noise_prob: float = 0.3  # chance of additive white Gaussian noise
    snr_db_min: float = 10.0  # noisy but intelligible
    snr_db_max: float = 40.0  # barely audible hiss

    def __post_init__(self) -> None:
        for name in ("speed_prob", "gain_prob", "noise_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for low, high in (("speed_min", "speed_max"), ("gain_db_min", "gain_db_max"), ("snr_db_min", "snr_db_max")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low}={getattr(self, low)} is above {high}={getattr(self, high)}")
        if self.speed_min <= 0:
            raise ValueError(f"speed_min must be a positive factor, got {self.speed_min}")


class WaveformAugmenter:
    """Callable `(time,) float32 -> (time',) float32` drawing its random choices from a generator seeded once.

    Two augmenters with the same config and seed return identical outputs for the same sequence of inputs. Speed
    perturbation by factor `s` changes the length to about `time / s`; gain and noise keep it. Copies made for
    DataLoader workers or `num_proc` processes carry the same generator state.
    """

    def __init__(self, config: AugmentConfig | None = None, seed: int = 0, sampling_rate: int = SAMPLING_RATE):
        self.config = config if config is not None else AugmentConfig()
        self.seed = seed
        self.sampling_rate = sampling_rate
        self._rng = np.random.default_rng(seed)

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        waveform = np.asarray(waveform, dtype=np.float32)
        if waveform.ndim != 1:
            raise ValueError(f"WaveformAugmenter expects a mono (time,) waveform, got shape {waveform.shape}")
        if not np.isfinite(waveform).all():
            raise ValueError("WaveformAugmenter got a waveform with NaN or infinite samples")
        config, rng = self.config, self._rng
        # All decisions and parameters are drawn on every call, so the stream of draws never depends on the input.
        use_speed, use_gain, use_noise = rng.random(3) < (config.speed_prob, config.gain_prob, config.noise_prob)
        speed = rng.uniform(config.speed_min, config.speed_max)
        gain_db = rng.uniform(config.gain_db_min, config.gain_db_max)
        snr_db = rng.uniform(config.snr_db_min, config.snr_db_max)
        if use_speed and waveform.size:
            waveform = self._change_speed(waveform, speed)
        if use_gain:
            waveform = waveform * np.float32(10.0 ** (gain_db / 20.0))
        if use_noise:
            waveform = _add_noise(waveform, snr_db, rng)
        return waveform.astype(np.float32, copy=False)

    def _change_speed(self, waveform: np.ndarray, speed: float) -> np.ndarray:
        """Play `waveform` `speed` times faster: read it as if recorded at `speed * rate`, resample to `rate`."""
        source_rate = round(self.sampling_rate * round(speed / SPEED_RESOLUTION) * SPEED_RESOLUTION)
        if source_rate == self.sampling_rate:
            return waveform
        return resample(waveform, source_rate, self.sampling_rate)

    def __repr__(self) -> str:
        return f"WaveformAugmenter({self.config}, seed={self.seed}, sampling_rate={self.sampling_rate})"


def _add_noise(waveform: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add white Gaussian noise `snr_db` below the waveform's mean power (silence stays silent)."""
    power = float(np.mean(np.square(waveform, dtype=np.float64))) if waveform.size else 0.0
    noise_std = np.sqrt(power / 10.0 ** (snr_db / 10.0))
    noise = rng.standard_normal(waveform.shape, dtype=np.float32) * np.float32(noise_std)
    return waveform + noise
