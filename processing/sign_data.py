"""Fingerspelling data from real sign poses: letter clips composed into continuously fingerspelled words.

The fingerspelling lexicon of `spoken-to-signed` (an optional dependency: `pip install whisper-moe[sign]`; its
recordings are never copied into this repository) holds one real MediaPipe Holistic `.pose` clip per letter for 20
signed languages (`index.csv`: path, signed_language, words, ...); `ase` is American Sign Language, 26 letters, J and
Z moving. One signer and one clip per letter cannot give held-out signers, but it does give a real sequence task:
compose letter clips into a fingerspelled word (each clip trimmed at random, played faster or slower, joined to the
next by a short movement between the two hand shapes; the whole clip rotated, stretched and jittered as another
camera and another tracker would see it) and decode the word. Words are held out by a hash of the word, so the
evaluation spells words the model never saw spelled.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modeling_whisper_moe.modeling_whisper_moe import IGNORE_INDEX
from modeling_whisper_moe.pose import BODY_POINTS, LEFT_SHOULDER, RIGHT_SHOULDER, pose_values, read_pose, spell

LEXICON_PACKAGE = "spoken_to_signed"
WORD_PATTERN = re.compile(r"^[a-z]{2,12}$")  # words a fingerspelling alphabet of 26 letters spells
HELD_OUT_BUCKETS = 10  # a word is held out when its hash falls in bucket 0 (10 % of words)


@dataclass(frozen=True)
class Augmentation:
    """How far a composed word varies from the plain concatenation of its letters' clips (see the module docstring).

    Defaults: a signer spells at 0.7-1.4x the recorded pace; the lexicon's clips hold the hand shape with some lead-in
    and lead-out, so up to a quarter of each end goes; a move between two shapes takes 2-6 frames (80-240 ms at
    25 fps); a camera is rarely more than ~12 degrees off level; trackers jitter by about 1 % of the shoulder width
    (the unit after normalisation) and lose the hand in a few frames.
    """

    speed: tuple[float, float] = (0.7, 1.4)
    trim: float = 0.25
    transition_frames: tuple[int, int] = (2, 6)
    rotation_degrees: float = 12.0
    stretch: float = 0.1
    jitter: float = 0.01
    dropout: float = 0.03


def lexicon_dir() -> Path:
    try:
        import spoken_to_signed
    except ImportError as error:
        raise ImportError(
            "Fingerspelling data needs the spoken-to-signed lexicon: pip install 'spoken-to-signed==0.4.0' pose-format"
        ) from error
    return Path(spoken_to_signed.__file__).parent / "assets" / "fingerspelling_lexicon"


def read_lexicon(signed_language: str = "ase", folder: str | Path | None = None) -> dict[str, tuple]:
    """{letter (lower case): (keypoints (frames, 27, 3), visible (frames, 27))} of one signed language's alphabet."""
    folder = Path(folder) if folder is not None else lexicon_dir()
    with open(folder / "index.csv", newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["signed_language"] == signed_language]
    letters = {}
    for row in rows:
        letter = row["words"].strip().lower()
        if len(letter) == 1 and letter.isalpha() and letter not in letters:
            keypoints, visible, _ = read_pose(folder / row["path"])
            letters[letter] = (keypoints, visible)
    if not letters:
        raise ValueError(f"No single-letter clips for signed language {signed_language!r} in {folder / 'index.csv'}")
    return letters


def words_from_sentences(csv_paths: Sequence[str | Path], column: str = "en") -> list[str]:
    """The distinct words (2-12 letters a-z, lower-cased) of a column of sentence CSVs, sorted."""
    words = set()
    for path in csv_paths:
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                words.update(w for w in re.findall(r"[A-Za-z]+", row[column]) if WORD_PATTERN.match(w.lower()))
    return sorted({word.lower() for word in words})


def is_held_out(word: str) -> bool:
    """Whether `word` belongs to the evaluation words (a stable hash, the same on every machine)."""
    return int(hashlib.sha1(word.encode()).hexdigest(), 16) % HELD_OUT_BUCKETS == 0


def split_words(words: Sequence[str], alphabet: set[str]) -> tuple[list[str], list[str]]:
    """(training words, held-out words) among those `alphabet` can spell."""
    spellable = [word for word in words if set(word) <= alphabet]
    return [w for w in spellable if not is_held_out(w)], [w for w in spellable if is_held_out(w)]


def compose(word: str, lexicon: dict[str, tuple], rng: np.random.Generator, augment: Augmentation | None):
    """A fingerspelled `word`: (keypoints (frames, 27, 3), visible (frames, 27)), raw (before normalisation)."""
    parts, seen = [], []
    for letter in word:
        keypoints, visible = lexicon[letter]
        if augment is not None:
            keypoints, visible = _trim_and_time(keypoints, visible, rng, augment)
        if parts and augment is not None:
            low, high = augment.transition_frames
            steps = int(rng.integers(low, high + 1))
            weights = np.linspace(0, 1, steps + 2)[1:-1, None, None]
            parts.append(parts[-1][-1] * (1 - weights) + keypoints[0] * weights)
            seen.append(np.repeat(seen[-1][-1:] & visible[:1], steps, axis=0))
        parts.append(keypoints)
        seen.append(visible)
    keypoints, visible = np.concatenate(parts), np.concatenate(seen)
    if augment is not None:
        keypoints, visible = _camera_and_tracker(keypoints, visible, rng, augment)
    return keypoints.astype(np.float32), visible


def augment_clip(keypoints: np.ndarray, visible: np.ndarray, rng: np.random.Generator, augment: Augmentation):
    """One recorded clip (a whole sign) varied as `compose` varies each letter and then the word: (keypoints
    (frames, 27, 3), visible (frames, 27)), raw (before normalisation)."""
    keypoints, visible = _trim_and_time(keypoints, visible, rng, augment)
    keypoints, visible = _camera_and_tracker(keypoints, visible, rng, augment)
    return keypoints.astype(np.float32), visible


def _trim_and_time(keypoints, visible, rng, augment: Augmentation):
    frames = len(keypoints)
    start = int(rng.uniform(0, augment.trim) * frames)
    stop = frames - int(rng.uniform(0, augment.trim) * frames)
    keypoints, visible = keypoints[start : max(stop, start + 2)], visible[start : max(stop, start + 2)]
    length = max(2, round(len(keypoints) / rng.uniform(*augment.speed)))
    where = np.linspace(0, len(keypoints) - 1, length)
    low = np.floor(where).astype(int)
    high = np.minimum(low + 1, len(keypoints) - 1)
    weight = (where - low)[:, None, None]
    return keypoints[low] * (1 - weight) + keypoints[high] * weight, visible[low] & visible[high]


def _camera_and_tracker(keypoints, visible, rng, augment: Augmentation):
    angle = np.deg2rad(rng.uniform(-augment.rotation_degrees, augment.rotation_degrees))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    stretch = np.diag(1 + rng.uniform(-augment.stretch, augment.stretch, 2))
    centre = keypoints[visible].mean(0) if visible.any() else np.zeros(3)
    moved = keypoints - centre
    moved[..., :2] = moved[..., :2] @ (rotation @ stretch).T
    seen = visible[:, LEFT_SHOULDER] & visible[:, RIGHT_SHOULDER]
    shoulders = np.linalg.norm(keypoints[:, LEFT_SHOULDER, :2] - keypoints[:, RIGHT_SHOULDER, :2], axis=-1)
    scale = float(np.median(shoulders[seen])) if seen.any() else 1.0  # the unit normalize_pose divides by
    moved = moved + rng.normal(0, augment.jitter * scale, moved.shape)
    lost = rng.random(visible.shape[0]) < augment.dropout  # frames whose hands the tracker lost
    visible = visible.copy()
    visible[lost, len(BODY_POINTS) :] = False  # the hands' points
    return moved + centre, visible


class FingerspellingDataset(torch.utils.data.Dataset):
    """`size` fingerspelled words drawn from `words` (item i: seeded by `seed` and i, so an epoch is reproducible),
    as `pose_values` (frames, 27, 4) and decoder `labels` (the prompt, the word's letters one token each
    (`pose.spell`), end of text)."""

    def __init__(self, words: Sequence[str], lexicon: dict, size: int, prompt: list[int], tokenizer, eos_id: int,
                 seed: int, augment: Augmentation | None = Augmentation()):  # fmt: skip
        if not words:
            raise ValueError("FingerspellingDataset needs at least one word its alphabet can spell")
        self.words, self.lexicon, self.size, self.seed, self.augment = list(words), lexicon, size, seed, augment
        self.prompt, self.tokenizer, self.eos_id = prompt, tokenizer, eos_id

    def __len__(self) -> int:
        return self.size

    def word(self, index: int) -> str:
        return self.words[int(np.random.default_rng([self.seed, index]).integers(len(self.words)))]

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index, 1])
        word = self.word(index)
        keypoints, visible = compose(word, self.lexicon, rng, self.augment)
        tokens = self.tokenizer.encode(" " + spell(word), add_special_tokens=False)
        return {"pose_values": pose_values(keypoints, visible), "labels": [*self.prompt, *tokens, self.eos_id],
                "word": word}  # fmt: skip


@dataclass
class PoseCollator:
    """Pads `pose_values` (batch, frames, 27, 4) with zeros and an `attention_mask` (batch, frames), 1 = real frame;
    `labels` (batch, tgt_len) with IGNORE_INDEX. Padding is on the right, as the encoder's packing of the clips
    (`config.pack_pose`) takes them. `key="pixel_values"` pads rendered video (batch, frames, height, width, 3) the
    same way, in its own dtype."""

    key: str = "pose_values"

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("PoseCollator got an empty list of examples")
        frames = max(len(example[self.key]) for example in examples)
        width = max(len(example["labels"]) for example in examples)
        first = torch.as_tensor(examples[0][self.key])
        values = torch.zeros(len(examples), frames, *first.shape[1:], dtype=first.dtype)
        mask = torch.zeros(len(examples), frames, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example[self.key])
            values[row, :length] = torch.as_tensor(example[self.key])
            mask[row, :length] = 1
            labels[row, : len(example["labels"])] = torch.as_tensor(example["labels"])
        return {self.key: values, "attention_mask": mask, "labels": labels}
