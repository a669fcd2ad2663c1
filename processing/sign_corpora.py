"""Isolated-sign corpora on disk, INCLUDE (Indian Sign Language) and WLASL (American), read into one list of samples.

INCLUDE (AI4Bharat, Zenodo): `<root>/<Category>/<N. Word>/<video>.MOV` (some .MP4, some under `Extra/`) and
`<root>/Train_Test_Split/{train,test}_{include,include50}.csv` with the columns `Category,Word,Video,FilePath`.
`FilePath` is relative to the root and is the one to trust: category folders are not always spelled as the
`Category` column (`Means_of_Transportation/` for "Means of Transportation"). `Word` carries the sign's number
("4. Bird"); the gloss is the word without it ("Bird"). Its pose release (OpenHands) is the same tree with each
video's keypoints beside its name: OpenHands' pickles (`MVI_2987.pkl`: {"keypoints": (frames, 75, 3),
"confidences": (frames, 75)}, MediaPipe Holistic's 33 body points then 21 per hand, left and right) or pose-format
`.pose` files (`MVI_2987.pose`). A pickle can run code when loaded: read only a release you trust.

WLASL: `WLASL_v0.3.json`, a list of {"gloss", "instances": [{"video_id", "split", "frame_start", "frame_end", "fps",
"signer_id", "bbox", "url", ...}]}, the videos as `<video_dir>/<video_id>.mp4`; `frame_start` counts from 1 and
`frame_end` -1 means the last frame, both at `fps` (25, the rate the annotation decoded at). The `nslt_{100,300,
1000,2000}.json` subsets map the video ids they keep to {"subset": split, "action": [class, start, end]}.

Missing files: INCLUDE is a fixed release, so by default a row whose file is absent is an error that names the files
(`skip_missing=True` skips them instead, for a partial copy); WLASL's videos are fetched from the web and many links
are dead, so absent ones are always skipped. Either way the skipped paths are in `SignCorpus.missing` and logged.
"""

from __future__ import annotations

import csv
import logging
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modeling_whisper_moe.pose import pose_values, read_pose, select_keypoints
from processing.data import MAX_NAMED_IN_ERRORS, read_json
from processing.sign_data import Augmentation, augment_clip

logger = logging.getLogger(__name__)

SIGN_CORPORA = ("fingerspelling", "include", "wlasl")  # the video_to_text task's data sources
MEDIA = ("video", "pose")  # what a sample's path points at: the recording, or its keypoints
KEYPOINT_SUFFIXES = (".pose", ".pkl")  # pose-format files, OpenHands' pickles
INCLUDE_SUBSETS = ("include", "include50")  # all 263 signs, the 50-sign subset
INCLUDE_SPLIT_DIR = "Train_Test_Split"
INCLUDE_COLUMNS = ("Category", "Word", "Video", "FilePath")
SIGN_NUMBER = re.compile(r"^\s*\d+\.\s*")  # "4. Bird" -> "Bird"
# OpenHands' pose pickles keep Holistic's body and hands, not the face
OPENHANDS_COMPONENTS = [("POSE_LANDMARKS", 33), ("LEFT_HAND_LANDMARKS", 21), ("RIGHT_HAND_LANDMARKS", 21)]
WLASL_VIDEO_SUFFIX = ".mp4"
WLASL_FPS = 25.0  # the rate WLASL's frame_start / frame_end count at
TO_THE_END = -1  # WLASL's frame_end for "the last frame"


@dataclass(frozen=True)
class SignSample:
    """One recorded sign: its file (video or keypoints), gloss, split, signer when known, and the frames that hold the
    sign: `frame_start` (1-based) to `frame_end` (inclusive; None: to the end), counted at `fps` (None: the file's)."""

    path: Path
    gloss: str
    split: str
    signer: str | None = None
    frame_start: int = 1
    frame_end: int | None = None
    fps: float | None = None


@dataclass(frozen=True)
class SignCorpus:
    """The samples a reader found, and the files it skipped because they are absent."""

    samples: list[SignSample]
    missing: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def glosses(self) -> list[str]:
        return sorted({sample.gloss for sample in self.samples})


# ---------------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------------


def read_include(
    root: str | Path,
    subset: str = "include",
    split: str = "train",
    media: str = "video",
    split_dir: str | Path | None = None,
    skip_missing: bool = False,
) -> SignCorpus:
    """The rows of INCLUDE's `Train_Test_Split/<split>_<subset>.csv` under `root` (the video tree, or with
    `media="pose"` the pose release's). `split_dir` defaults to `root/Train_Test_Split`.

    Raises:
        FileNotFoundError: no `root` or CSV; or (unless `skip_missing`) rows whose file is absent, named.
        ValueError: an unknown subset or media, a CSV without INCLUDE's columns, or no rows.
    """
    root = _folder(root, "INCLUDE folder")
    _check_choice(subset, INCLUDE_SUBSETS, "INCLUDE subset")
    _check_choice(media, MEDIA, "media")
    split_dir = Path(split_dir).expanduser() if split_dir is not None else root / INCLUDE_SPLIT_DIR
    csv_path = split_dir / f"{split}_{subset}.csv"
    if not csv_path.is_file():
        present = sorted(path.name for path in split_dir.glob("*.csv")) if split_dir.is_dir() else []
        raise FileNotFoundError(f"INCLUDE split file not found: {csv_path} (CSVs in {split_dir}: {present or 'none'};"
                                " give split_dir if Train_Test_Split lies elsewhere)")  # fmt: skip
    samples, missing = [], []
    for row in _csv_rows(csv_path, INCLUDE_COLUMNS):
        video = root / row["FilePath"].strip()
        path = video if media == "video" else keypoint_file(video)
        if not path.is_file():
            missing.append(path)
            continue
        samples.append(SignSample(path, SIGN_NUMBER.sub("", row["Word"]).strip(), split))
    if missing and not skip_missing:
        raise FileNotFoundError(f"{csv_path}: {len(missing)} of {len(samples) + len(missing)} rows have no file under "
                                f"{root}: {_named(missing)}{_keypoint_hint(missing, media)}")  # fmt: skip
    return _corpus(samples, missing, f"INCLUDE {split}_{subset}")


def read_wlasl(
    json_path: str | Path,
    video_dir: str | Path,
    split: str | None = None,
    subset_json: str | Path | None = None,
    media: str = "video",
) -> SignCorpus:
    """The instances of a WLASL JSON whose video (or, with `media="pose"`, its keypoint file) is in `video_dir`,
    those of `split` only when given. `subset_json` (an `nslt_*.json`) keeps the videos it lists, with its split.
    Absent videos are skipped and counted (`SignCorpus.missing`)."""
    entries = _read_json(json_path, list, "a list of {gloss, instances}")
    subset = None if subset_json is None else _read_json(subset_json, dict, "{video_id: {subset, action}}")
    video_dir = _folder(video_dir, "WLASL video folder")
    _check_choice(media, MEDIA, "media")
    samples, missing, splits = [], [], set()
    for entry in entries:
        if not isinstance(entry, dict) or "gloss" not in entry or "instances" not in entry:
            raise ValueError(f"{json_path}: an entry without gloss and instances: {str(entry)[:80]}")
        for instance in entry["instances"]:
            video_id = str(instance["video_id"])
            if subset is not None and video_id not in subset:
                continue
            instance_split = subset[video_id]["subset"] if subset is not None else instance["split"]
            splits.add(instance_split)
            if split is not None and instance_split != split:
                continue
            video = video_dir / f"{video_id}{WLASL_VIDEO_SUFFIX}"
            path = video if media == "video" else keypoint_file(video)
            if not path.is_file():
                missing.append(path)
                continue
            samples.append(_wlasl_sample(path, entry["gloss"], instance_split, instance))
    if split is not None and split not in splits:
        raise ValueError(f"{json_path}: no instance of split {split!r}; its splits: {sorted(splits)}")
    return _corpus(samples, missing, f"WLASL {split or 'all splits'}", _keypoint_hint(missing, media))


def keypoint_file(video: Path) -> Path:
    """The keypoint file of a video: `<stem>.pose` or `<stem>.pkl` beside it, whichever exists (`.pose` when
    neither does, as the name to report)."""
    candidates = [video.with_suffix(suffix) for suffix in KEYPOINT_SUFFIXES]
    return next((path for path in candidates if path.is_file()), candidates[0])


def _wlasl_sample(path: Path, gloss: str, split: str, instance: dict) -> SignSample:
    start, end = int(instance.get("frame_start", 1)), int(instance.get("frame_end", TO_THE_END))
    if start < 1 or (end != TO_THE_END and end < start):
        raise ValueError(f"WLASL video {instance['video_id']}: frames {start}..{end} (1-based, end -1 or >= start)")
    signer = instance.get("signer_id")
    return SignSample(path, str(gloss).strip(), split, None if signer is None else str(signer), start,
                      None if end == TO_THE_END else end, float(instance.get("fps") or WLASL_FPS))  # fmt: skip


def _corpus(samples: list[SignSample], missing: list[Path], name: str, hint: str = "") -> SignCorpus:
    if missing:
        logger.warning("%s: %d of %d files absent, skipped: %s", name, len(missing), len(samples) + len(missing),
                       _named(missing))  # fmt: skip
    if not samples:
        raise ValueError(f"{name}: no sample has its file ({len(missing)} absent: {_named(missing)}){hint}")
    return SignCorpus(samples, missing)


def _keypoint_hint(missing: list[Path], media: str) -> str:
    """Why keypoint files may be absent when the videos are there."""
    videos = [path for path in missing if media == "pose" and any(path.parent.glob(f"{path.stem}.*"))]
    if not videos:
        return ""
    return ("; the videos are there but not their keypoints: extract them once with MediaPipe Holistic (e.g. "
            "pose-format's `video_to_pose`) into <video stem>.pose files beside each video")  # fmt: skip


def _folder(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; one of {', '.join(choices)}")


def _csv_rows(path: Path, columns: Sequence[str]) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        absent = [column for column in columns if column not in (reader.fieldnames or [])]
        if absent:
            raise ValueError(f"{path}: missing columns {absent}; expected {', '.join(columns)}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _read_json(path: str | Path, kind: type, shape: str):
    content = read_json(path, "WLASL file")
    if not isinstance(content, kind):
        raise ValueError(f"{path}: expected {shape}, got a {type(content).__name__}")
    return content


def _named(paths: Sequence[Path]) -> str:
    shown = ", ".join(str(path) for path in paths[:MAX_NAMED_IN_ERRORS])
    more = len(paths) - MAX_NAMED_IN_ERRORS
    return shown + (f" ... and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------------------------------------------------
# Keypoints of a sample
# ---------------------------------------------------------------------------------------------------------------------


def read_keypoints(path: str | Path) -> tuple[np.ndarray, np.ndarray, float | None]:
    """A keypoint file -> (keypoints (frames, 27, 3), visible (frames, 27), frames per second or None): a pose-format
    `.pose` file, or an OpenHands pickle (which records no rate)."""
    path = Path(path)
    if path.suffix == ".pose":
        return read_pose(path)
    if path.suffix != ".pkl":
        raise ValueError(f"{path}: not a keypoint file ({', '.join(KEYPOINT_SUFFIXES)}); a video needs its keypoints "
                         "extracted first (MediaPipe Holistic)")  # fmt: skip
    with open(path, "rb") as handle:
        content = pickle.load(handle)
    expected = sum(count for _, count in OPENHANDS_COMPONENTS)
    points = np.asarray(content.get("keypoints") if isinstance(content, dict) else None)
    if points.ndim != 3 or points.shape[1] != expected or len(points) == 0:
        raise ValueError(f"{path}: expected OpenHands' {{'keypoints': (frames > 0, {expected}, 3), 'confidences'}}, "
                         f"got {type(content).__name__} with keypoints of shape {points.shape}")  # fmt: skip
    keypoints, visible = select_keypoints(points, content.get("confidences"), OPENHANDS_COMPONENTS)
    return keypoints, visible, None


def sample_clip(sample: SignSample) -> tuple[np.ndarray, np.ndarray]:
    """The sample's keypoints and visibility over its frame range (converted to the file's rate when both are
    known)."""
    keypoints, visible, fps = read_keypoints(sample.path)
    scale = fps / sample.fps if fps and sample.fps else 1.0
    start = round((sample.frame_start - 1) * scale)
    stop = len(keypoints) if sample.frame_end is None else min(len(keypoints), round(sample.frame_end * scale))
    if start >= stop:
        raise ValueError(f"{sample.path}: frames {sample.frame_start}..{sample.frame_end} lie outside its "
                         f"{len(keypoints)} frames")  # fmt: skip
    return keypoints[start:stop], visible[start:stop]


def fit_frames(keypoints: np.ndarray, visible: np.ndarray, max_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_frames` frames (the encoder's positions), evenly spaced over a longer clip."""
    if len(keypoints) <= max_frames:
        return keypoints, visible
    kept = np.linspace(0, len(keypoints) - 1, max_frames).round().astype(int)
    return keypoints[kept], visible[kept]


class IsolatedSignDataset(torch.utils.data.Dataset):
    """Isolated-sign classification as text: item i is sample `i % len(samples)` as `pose_values` (frames, 27, 4)
    and decoder `labels` (the prompt, the gloss's tokens, end of text). With `augment`, each item's clip is varied
    (`sign_data.augment_clip`, seeded by `seed` and i), so `size` above the number of samples gives new draws."""

    def __init__(self, samples: Sequence[SignSample], prompt: list[int], tokenizer, eos_id: int, max_frames: int,
                 size: int | None = None, seed: int = 0, augment: Augmentation | None = None):  # fmt: skip
        if not samples:
            raise ValueError("IsolatedSignDataset needs at least one sample")
        self.samples, self.clips = list(samples), [sample_clip(sample) for sample in samples]
        self.prompt, self.tokenizer, self.eos_id, self.max_frames = prompt, tokenizer, eos_id, max_frames
        self.size, self.seed, self.augment = size or len(self.samples), seed, augment

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        keypoints, visible = self.clips[index % len(self.clips)]
        if self.augment is not None:
            keypoints, visible = augment_clip(keypoints, visible, np.random.default_rng([self.seed, index]),
                                              self.augment)  # fmt: skip
        keypoints, visible = fit_frames(keypoints, visible, self.max_frames)
        gloss = self.samples[index % len(self.samples)].gloss
        tokens = self.tokenizer.encode(" " + gloss, add_special_tokens=False)
        return {"pose_values": pose_values(keypoints, visible), "labels": [*self.prompt, *tokens, self.eos_id],
                "gloss": gloss}  # fmt: skip
