"""The one way this project speaks text: espeak-ng, decoded to 16 kHz mono float32.

Training data (digit clip banks, word-by-word sentences) and the evaluations (unseen-voice digits, TTS ceilings,
speech translation) all synthesise through `speak`, so they call espeak-ng with the same arguments and fail the
same way when it is missing or refuses a voice.
"""

import shutil
import subprocess

import numpy as np

from modeling_whisper_moe.audio import SAMPLING_RATE, load_audio

ESPEAK = "espeak-ng"
ESPEAK_MISSING = f"{ESPEAK} is not installed; install it with `apt-get install -y espeak-ng`."


def espeak_installed() -> bool:
    """Whether the espeak-ng executable is on PATH."""
    return shutil.which(ESPEAK) is not None


def speak(
    text: str, voice: str, speed: int | None = None, pitch: int | None = None, sampling_rate: int = SAMPLING_RATE
) -> np.ndarray:
    """Speak `text` with espeak-ng voice `voice` at `speed` words per minute and `pitch` (0-99); espeak-ng's own
    default for either when None. Returns (num_samples,) float32 mono at `sampling_rate`."""
    if not espeak_installed():
        raise RuntimeError(ESPEAK_MISSING)
    command = [ESPEAK, "-v", voice]
    if speed is not None:
        command += ["-s", str(speed)]
    if pitch is not None:
        command += ["-p", str(pitch)]
    result = subprocess.run([*command, "--stdout", text], capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(
            f"espeak-ng failed for voice {voice!r} (exit status {result.returncode}): "
            f"{result.stderr.decode(errors='replace').strip() or 'no audio written'}"
        )
    return load_audio(result.stdout, sampling_rate)
