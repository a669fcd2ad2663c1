"""Text-to-speech training data: spoken digit sequences made from espeak-ng words, with exact per-token durations.

Each digit word is synthesised once per voice, speed and pitch, trimmed of silence, and sequences are built by
concatenating those clips with short pauses. Because every word's clip (plus its pause) is cut to a whole number of
10 ms frames, the number of log-mel frames each text token covers is known exactly, which is what a parallel
(duration-predicting) model trains on. Sequences are drawn on the fly, so the corpus is as large as training needs.

Held-out split: a 4-digit sequence is held out when a hash of it falls in one bucket of `HELD_OUT_BUCKETS`; training
sequences never contain a held-out 4-digit window, so evaluated sequences are never heard (even inside longer ones).
"""

import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from modeling_whisper_moe.audio import load_audio
from modeling_whisper_moe.pipeline_text_to_audio import normalize_tts_text
from modeling_whisper_moe.vocoder import HOP_LENGTH, SAMPLING_RATE, log_mel_spectrogram
from processing.espeak import speak

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HELD_OUT_BUCKETS = 10  # one 4-digit sequence in ten is held out for evaluation
EVAL_SEQUENCE_LENGTH = 4  # digits in an evaluated sequence
SILENCE_THRESHOLD = 0.02  # fraction of the clip's peak below which leading/trailing samples count as silence
FRAME_SECONDS = HOP_LENGTH / SAMPLING_RATE


def digits_to_words(digits: str) -> str:
    """'3141' -> 'three one four one'."""
    if not digits.isdigit():
        raise ValueError(f"expected a string of digits, got {digits!r}.")
    return " ".join(DIGIT_WORDS[int(d)] for d in digits)


def is_held_out(digits: str) -> bool:
    """Whether a 4-digit sequence belongs to the held-out set (a stable hash, the same on every machine)."""
    return int(hashlib.sha1(digits.encode()).hexdigest(), 16) % HELD_OUT_BUCKETS == 0


def contains_held_out(digits: str) -> bool:
    """Whether any 4-digit window of `digits` is held out."""
    windows = (digits[i : i + EVAL_SEQUENCE_LENGTH] for i in range(len(digits) - EVAL_SEQUENCE_LENGTH + 1))
    return any(is_held_out(window) for window in windows)


def held_out_sequences(count: int, seed: int = 0) -> list[str]:
    """`count` held-out 4-digit sequences, the same ones for a given seed."""
    pool = [f"{n:0{EVAL_SEQUENCE_LENGTH}d}" for n in range(10**EVAL_SEQUENCE_LENGTH)]
    pool = [digits for digits in pool if is_held_out(digits)]
    if count > len(pool):
        raise ValueError(f"count={count} exceeds the {len(pool)} held-out sequences.")
    return random.Random(seed).sample(pool, count)


def training_sequence(rng: random.Random, min_digits: int, max_digits: int) -> str:
    """A random digit string of `min_digits`..`max_digits` digits containing no held-out 4-digit window."""
    while True:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(min_digits, max_digits)))
        if not contains_held_out(digits):
            return digits


# ---------------------------------------------------------------------------------------------------------------------
# Synthesis
# ---------------------------------------------------------------------------------------------------------------------


def trim_silence(audio: np.ndarray) -> np.ndarray:
    """Drop leading and trailing samples quieter than SILENCE_THRESHOLD of the peak."""
    loud = np.flatnonzero(np.abs(audio) > SILENCE_THRESHOLD * np.abs(audio).max())
    return audio[loud[0] : loud[-1] + 1] if loud.size else audio


@dataclass(frozen=True)
class Style:
    """How a clip is spoken: voice index (into the bank's voices), espeak-ng speed in words per minute and pitch
    0-99 (0 for recordings, spoken as they are)."""

    voice: int
    speed: int = 0
    pitch: int = 0


class DigitClipBank:
    """Every digit word once per style, trimmed of silence: clips[(style, digit)] -> 16 kHz float32 waveform."""

    def __init__(self, voices: list[str], clips: dict[tuple[Style, int], np.ndarray]):
        styles = sorted({style for style, _ in clips}, key=lambda s: (s.voice, s.speed, s.pitch))
        missing = [(style, digit) for style in styles for digit in range(10) if (style, digit) not in clips]
        if not clips or missing:
            raise ValueError(f"every style needs a clip of each digit 0-9; missing {missing[:5]} (or no clips).")
        if any(not 0 <= style.voice < len(voices) for style in styles):
            raise ValueError(f"style voice indices must index the {len(voices)} voices {voices}.")
        self.voices, self.styles = list(voices), styles
        self.clips = {key: trim_silence(np.asarray(clip, dtype=np.float32)) for key, clip in clips.items()}

    @classmethod
    def from_espeak(cls, voices: list[str], speeds: list[int], pitches: list[int]) -> "DigitClipBank":
        """Speak each digit word with espeak-ng in every voice x speed x pitch."""
        if not voices or not speeds or not pitches:
            raise ValueError(f"need at least one voice, speed and pitch, got {voices}, {speeds}, {pitches}.")
        styles = [Style(v, s, p) for v in range(len(voices)) for s in speeds for p in pitches]
        clips = {
            (style, digit): speak(word, voices[style.voice], style.speed, style.pitch)
            for style in styles
            for digit, word in enumerate(DIGIT_WORDS)
        }
        return cls(voices, clips)

    def speak(
        self, digits: str, style: Style, pauses: list[int], frames_multiple: int = 1
    ) -> tuple[np.ndarray, list[int]]:
        """Waveform of `digits` in `style` with `pauses[i]` silent frames after word i, and each word's frames.

        Every word plus its pause is padded to a whole multiple of `frames_multiple` frames, so the frame counts sum
        to the log-mel length exactly and suit a model with that reduction factor.
        """
        clips = [self.clips[(style, int(digit))] for digit in digits]
        return join_words(clips, pauses, frames_multiple)


def join_words(clips: list[np.ndarray], pauses: list[int], frames_multiple: int) -> tuple[np.ndarray, list[int]]:
    """Concatenate word clips, each followed by `pauses[i]` silent frames and padded to a multiple of
    `frames_multiple` frames; returns the waveform and each word's frame count (they sum to its log-mel length)."""
    pieces, frames = [], []
    for clip, pause in zip(clips, pauses):
        word_frames = -(-clip.size // HOP_LENGTH) + pause  # ceil, then the pause
        word_frames = -(-word_frames // frames_multiple) * frames_multiple
        piece = np.zeros(word_frames * HOP_LENGTH, dtype=np.float32)
        piece[: clip.size] = clip
        pieces.append(piece)
        frames.append(word_frames)
    return np.concatenate(pieces), frames


# ---------------------------------------------------------------------------------------------------------------------
# Dataset and collator
# ---------------------------------------------------------------------------------------------------------------------


def word_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Token ids of each word as it appears inside ' '.join(words) after a leading space."""
    return [tokenizer(" " + word, add_special_tokens=False).input_ids for word in words]


def split_frames(frames: int, token_ids: list[int], tokenizer, frames_multiple: int = 1) -> list[int]:
    """Share a word's frames among its tokens in proportion to their characters, in whole multiples of
    `frames_multiple` (every token gets at least one multiple)."""
    units = frames // frames_multiple
    if frames % frames_multiple or units < len(token_ids):
        raise ValueError(
            f"a word of {len(token_ids)} tokens needs a multiple of {frames_multiple} frames, at least "
            f"{len(token_ids) * frames_multiple}; got {frames}."
        )
    lengths = np.array([max(len(tokenizer.decode([t]).strip()), 1) for t in token_ids], dtype=float)
    shares = np.maximum(np.floor(units * lengths / lengths.sum()).astype(int), 1)
    shares[-1] = units - shares[:-1].sum()
    return (shares * frames_multiple).tolist()


def encode_utterance(
    words: list[str],
    word_frames: list[int],
    waveform: np.ndarray,
    speaker: int,
    num_speakers: int,
    tokenizer,
    frames_multiple: int,
    num_mel_bins: int,
) -> dict[str, torch.Tensor]:
    """One training example: token ids, frames per token, log-mel target and one-hot speaker."""
    input_ids, durations = [], []
    for ids, frames in zip(word_token_ids(tokenizer, words), word_frames):
        input_ids += ids
        durations += split_frames(frames, ids, tokenizer, frames_multiple)
    speaker_embedding = torch.zeros(num_speakers)
    speaker_embedding[speaker] = 1.0
    return {
        "input_ids": torch.tensor(input_ids),
        "durations": torch.tensor(durations),
        "labels": log_mel_spectrogram(torch.from_numpy(waveform), num_mel_bins),
        "speaker_embeddings": speaker_embedding,
    }


class SpokenDigitsDataset(Dataset):
    """Item i is a deterministic random digit sequence spoken in a random style: token ids, per-token frame counts,
    the log-mel target (frames, num_mel_bins) and a one-hot voice vector (num_voices,). Durations are multiples
    of `frames_multiple` (the model's tts_reduction_factor)."""

    def __init__(
        self,
        bank: DigitClipBank,
        tokenizer,
        num_examples: int,
        min_digits: int,
        max_digits: int,
        pause_frames: tuple[int, int],
        num_mel_bins: int = 80,
        frames_multiple: int = 1,
        seed: int = 0,
    ):
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}.")
        self.bank, self.tokenizer = bank, tokenizer
        self.num_examples, self.min_digits, self.max_digits = num_examples, min_digits, max_digits
        self.pause_frames, self.num_mel_bins, self.seed = pause_frames, num_mel_bins, seed
        self.frames_multiple = frames_multiple

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = random.Random(self.seed * 1_000_003 + index)
        digits = training_sequence(rng, self.min_digits, self.max_digits)
        style = rng.choice(self.bank.styles)
        pauses = [rng.randint(*self.pause_frames) for _ in digits]
        waveform, word_frames = self.bank.speak(digits, style, pauses, self.frames_multiple)
        words = digits_to_words(digits).split()
        return encode_utterance(words, word_frames, waveform, style.voice, len(self.bank.voices), self.tokenizer,
                                self.frames_multiple, self.num_mel_bins)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# General English: sentences spoken word by word by espeak-ng, and recordings aligned by Whisper's word timestamps
# ---------------------------------------------------------------------------------------------------------------------


class EspeakSentenceDataset(Dataset):
    """Item i: sentence i % len(texts), each word spoken separately by espeak-ng in a random style of `voices`
    (speaker indices 0..len(voices)-1), joined with random pauses, so every word's frames are exact."""

    def __init__(self, texts: list[str], voices: list[str], speeds: list[int], pitches: list[int], tokenizer,
                 num_examples: int, pause_frames: tuple[int, int], num_speakers: int, frames_multiple: int = 1,
                 num_mel_bins: int = 80, seed: int = 0):  # fmt: skip
        if not texts:
            raise ValueError("EspeakSentenceDataset needs at least one text.")
        self.texts = [normalize_tts_text(text).split() for text in texts]
        self.voices, self.speeds, self.pitches, self.tokenizer = voices, speeds, pitches, tokenizer
        self.num_examples, self.pause_frames, self.num_speakers = num_examples, pause_frames, num_speakers
        self.frames_multiple, self.num_mel_bins, self.seed = frames_multiple, num_mel_bins, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = random.Random(self.seed * 1_000_003 + index)
        words = self.texts[index % len(self.texts)]
        voice, speed, pitch = rng.randrange(len(self.voices)), rng.choice(self.speeds), rng.choice(self.pitches)
        clips = [trim_silence(speak(word, self.voices[voice], speed, pitch)) for word in words]
        pauses = [rng.randint(*self.pause_frames) for _ in words]
        waveform, word_frames = join_words(clips, pauses, self.frames_multiple)
        return encode_utterance(words, word_frames, waveform, voice, self.num_speakers, self.tokenizer,
                                self.frames_multiple, self.num_mel_bins)  # fmt: skip


def align_with_whisper(paths: list[str], whisper: str, batch_size: int = 16) -> list[dict]:
    """Whisper's own transcript of each recording with word start times (cross-attention DTW), as
    [{"path", "words", "starts"}]; the transcript, not a given text, is used so that words and timings agree."""
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=whisper)
    english = {"language": "en"} if getattr(asr.model.generation_config, "is_multilingual", False) else {}
    outputs = asr(paths, batch_size=batch_size, return_timestamps="word", generate_kwargs=english)
    return [
        {
            "path": path,
            "words": [c["text"].strip() for c in out["chunks"]],
            "starts": [c["timestamp"][0] for c in out["chunks"]],
        }
        for path, out in zip(paths, outputs)
    ]


def aligned_word_frames(starts: list[float], total_frames: int, tokens_per_word: list[int], frames_multiple: int):
    """Frames per word from word start times (seconds): each word runs until the next starts, the first from 0 and
    the last to the end, on a grid of `frames_multiple`. None when the timings leave a word too few frames."""
    grid = frames_multiple
    bounds = [0] + [round(start / FRAME_SECONDS / grid) * grid for start in starts[1:]] + [total_frames // grid * grid]
    frames = [end - begin for begin, end in zip(bounds, bounds[1:])]
    if any(f < n * grid for f, n in zip(frames, tokens_per_word)):
        return None
    return frames


class AlignedRecordingsDataset(Dataset):
    """Recordings (e.g. LJSpeech) with word timings from [`align_with_whisper`], all spoken by speaker `speaker`;
    recordings whose timings leave a word fewer frames than tokens are left out."""

    def __init__(self, alignments: list[dict], speaker: int, num_speakers: int, tokenizer, frames_multiple: int = 1,
                 num_mel_bins: int = 80):  # fmt: skip
        self.items = []
        for alignment in alignments:
            words = [normalize_tts_text(w) for w in alignment["words"] if w.strip()]
            audio = load_audio(alignment["path"], SAMPLING_RATE)
            total = audio.size // HOP_LENGTH
            tokens = [len(ids) for ids in word_token_ids(tokenizer, words)]
            frames = aligned_word_frames(alignment["starts"], total, tokens, frames_multiple) if words else None
            if frames is not None and len(frames) == len(words):
                self.items.append((words, frames, audio[: sum(frames) * HOP_LENGTH]))
        self.speaker, self.num_speakers, self.tokenizer = speaker, num_speakers, tokenizer
        self.frames_multiple, self.num_mel_bins = frames_multiple, num_mel_bins

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        words, frames, audio = self.items[index]
        return encode_utterance(words, frames, audio, self.speaker, self.num_speakers, self.tokenizer,
                                self.frames_multiple, self.num_mel_bins)  # fmt: skip


@dataclass
class TextToSpeechCollator:
    """Pads a list of dataset items into a batch. Padding positions get attention_mask / labels_mask 0.

    speaker_dropout: probability of zeroing an item's speaker vector, so that no speaker embedding (zeros) means
    "any voice" at inference.
    """

    pad_token_id: int
    speaker_dropout: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.speaker_dropout < 1.0:
            raise ValueError(f"speaker_dropout must be in [0, 1), got {self.speaker_dropout}.")
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        pad = torch.nn.utils.rnn.pad_sequence
        input_ids = pad([item["input_ids"] for item in items], batch_first=True, padding_value=self.pad_token_id)
        lengths = torch.tensor([item["input_ids"].numel() for item in items])
        frames = torch.tensor([item["labels"].shape[0] for item in items])
        batch = {
            "input_ids": input_ids,
            "attention_mask": (torch.arange(input_ids.shape[1])[None] < lengths[:, None]).long(),
            "durations": pad([item["durations"] for item in items], batch_first=True),
            "labels": pad([item["labels"] for item in items], batch_first=True),
            "labels_mask": (torch.arange(int(frames.max()))[None] < frames[:, None]).long(),
        }
        if "speaker_embeddings" in items[0]:
            speakers = torch.stack([item["speaker_embeddings"] for item in items])
            keep = torch.rand(len(items), generator=self.generator) >= self.speaker_dropout
            batch["speaker_embeddings"] = speakers * keep[:, None]
        return batch
