"""Isolated-sign corpora (processing/sign_corpora.py): INCLUDE's and WLASL's layouts from tests/fixtures/sign_corpora
(the split CSVs and JSONs, committed) with tiny videos and real-pose keypoint files made here, and the video_to_text
task trained on an INCLUDE-50 pose release and scored through scripts/evaluate.py."""

import csv
import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import REPO_ROOT

from modeling_whisper_moe import WhisperMoEForConditionalGeneration
from modeling_whisper_moe.pose import POSE_KEYPOINTS, read_pose
from processing.sign_corpora import (
    IsolatedSignDataset,
    SignSample,
    fit_frames,
    read_include,
    read_keypoints,
    read_wlasl,
    sample_clip,
)
from processing.sign_data import Augmentation, PoseCollator, lexicon_dir

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "sign_corpora"
# which real ASL letter clip of the lexicon stands in for each sign (one clip per gloss, varied per recording)
STAND_IN = {"Bird": "b", "Dog": "d", "Car": "c", "Good Morning": "g", "book": "k", "drink": "y"}
PICKLED = "Animals/4. Bird/MVI_2987.MOV"  # the pose release's recording kept as an OpenHands pickle
HOLISTIC_BODY_AND_HANDS = [*range(33), *range(511, 553)]  # what OpenHands' pickles keep of the 586 points


def include_rows(root: Path) -> dict[str, str]:
    """{FilePath: gloss} over every split CSV of the INCLUDE tree at `root`."""
    rows = {}
    for path in (root / "Train_Test_Split").glob("*.csv"):
        with open(path, newline="") as handle:
            rows.update({row["FilePath"]: row["Word"].split(". ", 1)[1] for row in csv.DictReader(handle)})
    return rows


def seed_of(file_path: str) -> int:
    return sum(file_path.encode())


def write_video(path: Path, frames: int = 3) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mov" if path.suffix.lower() == ".mov" else "mp4") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for index in range(frames):
            image = np.full((16, 16, 3), 40 * index, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def letter_pose(letter: str):
    from pose_format import Pose

    with open(lexicon_dir() / "index.csv", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["signed_language"] == "ase" and r["words"] == letter.upper())
    return Pose.read((lexicon_dir() / row["path"]).read_bytes())


def write_pose(path: Path, letter: str, seed: int, suffix: str = ".pose") -> Path:
    """A recording of the sign: the letter's real clip at another pace, place and scale, with tracker jitter."""
    from pose_format import Pose
    from pose_format.numpy import NumPyPoseBody

    pose, rng = letter_pose(letter), np.random.default_rng(seed)
    frames = len(pose.body.data)
    kept = np.linspace(0, frames - 1, int(rng.integers(frames * 4 // 5, frames * 5 // 4))).round().astype(int)
    data = pose.body.data[kept] * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30, 3)
    data = data + rng.normal(0, 1.0, data.shape)
    path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".pkl":  # OpenHands' pose release
        content = {"keypoints": np.ma.filled(data, 0)[:, 0, HOLISTIC_BODY_AND_HANDS],
                   "confidences": pose.body.confidence[kept][:, 0, HOLISTIC_BODY_AND_HANDS]}  # fmt: skip
        path.write_bytes(pickle.dumps(content))
        return path
    body = NumPyPoseBody(fps=pose.body.fps, data=data, confidence=pose.body.confidence[kept])
    with open(path, "wb") as handle:
        Pose(pose.header, body).write(handle)
    return path


@pytest.fixture
def include_videos(tmp_path) -> Path:
    """INCLUDE's video tree (tiny MOV / MP4 files) with the fixture's split CSVs."""
    root = tmp_path / "INCLUDE"
    shutil.copytree(FIXTURES / "INCLUDE", root)
    for file_path in include_rows(root):
        write_video(root / file_path)
    return root


@pytest.fixture
def include_poses(tmp_path) -> Path:
    """INCLUDE's pose release: a keypoint file beside each video's name (one an OpenHands pickle), no videos."""
    root = tmp_path / "INCLUDE-poses"
    shutil.copytree(FIXTURES / "INCLUDE", root)
    for file_path, gloss in include_rows(root).items():
        write_pose(root / file_path, STAND_IN[gloss], seed_of(file_path), ".pkl" if file_path == PICKLED else ".pose")
    return root


def test_include_reads_its_split_files_in_the_release_layout(include_videos):
    train = read_include(include_videos, "include", "train")
    assert len(train) == 10 and train.missing == []
    assert train.glosses() == ["Bird", "Car", "Dog", "Good Morning"]  # the sign's number dropped
    paths = [sample.path.relative_to(include_videos).as_posix() for sample in train.samples]
    assert "Animals/4. Bird/Extra/MVI_3045.MOV" in paths and "Animals/4. Bird/MVI_8567.MP4" in paths
    assert "Means_of_Transportation/11. Car/MVI_3118.MOV" in paths  # FilePath, not the Category column
    assert {sample.split for sample in train.samples} == {"train"}
    with av.open(str(train.samples[0].path)) as container:  # a real video file
        assert sum(1 for _ in container.decode(video=0)) == 3
    test50 = read_include(include_videos, "include50", "test")
    assert [(s.gloss, s.path.name) for s in test50.samples] == [("Bird", "MVI_3094.MOV"), ("Car", "MVI_3146.MOV")]


def test_include_errors_name_what_is_missing(include_videos, tmp_path):
    gone = include_videos / "Animals" / "1. Dog" / "MVI_3085.MOV"
    gone.unlink()
    with pytest.raises(FileNotFoundError, match="1 of 10 rows have no file.*MVI_3085.MOV"):
        read_include(include_videos, "include", "train")
    partial = read_include(include_videos, "include", "train", skip_missing=True)
    assert len(partial) == 9 and partial.missing == [gone]
    with pytest.raises(FileNotFoundError, match="INCLUDE folder not found"):
        read_include(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"val_include\.csv.*test_include\.csv"):
        read_include(include_videos, "include", "val")
    with pytest.raises(ValueError, match="Unknown INCLUDE subset 'include263'"):
        read_include(include_videos, "include263")
    (include_videos / "Train_Test_Split" / "train_include50.csv").write_text("Word,Video\n4. Bird,MVI_2987.MOV\n")
    with pytest.raises(ValueError, match=r"missing columns \['Category', 'FilePath'\]"):
        read_include(include_videos, "include50", "train")
    with pytest.raises(FileNotFoundError, match="not their keypoints.*video_to_pose"):
        read_include(include_videos, "include", "test", media="pose")  # a video tree is not a pose release


def test_include_pose_release_gives_27_keypoints_per_frame_from_pickles_and_pose_files(include_poses):
    train = read_include(include_poses, "include", "train", media="pose")
    suffixes = sorted(sample.path.suffix for sample in train.samples)
    assert len(train) == 10 and suffixes.count(".pkl") == 1 and suffixes.count(".pose") == 9
    for sample in train.samples:
        keypoints, visible, _ = read_keypoints(sample.path)
        assert keypoints.shape == (len(keypoints), POSE_KEYPOINTS, 3) and visible.shape == keypoints.shape[:2]
        assert visible[:, 1:3].all()  # the shoulders
    pickled = next(sample.path for sample in train.samples if sample.path.suffix == ".pkl")
    as_pose = write_pose(pickled, STAND_IN["Bird"], seed_of(PICKLED))  # the same recording as a .pose file
    from_pickle, seen_pickle, fps = read_keypoints(pickled)
    from_pose, seen_pose, _ = read_pose(as_pose)
    assert fps is None and np.allclose(from_pickle, from_pose) and np.array_equal(seen_pickle, seen_pose)
    pickled.write_bytes(pickle.dumps({"keypoints": np.zeros((4, 543, 3))}))
    with pytest.raises(ValueError, match="expected OpenHands'.*got dict with keypoints of shape \\(4, 543, 3\\)"):
        read_keypoints(pickled)


@pytest.fixture
def wlasl(tmp_path) -> tuple[Path, Path]:
    """WLASL's JSON and its videos folder, where two of the nine videos never downloaded (07099, 17710)."""
    videos = tmp_path / "videos"
    entries = json.loads((FIXTURES / "WLASL" / "WLASL_v0.3.json").read_text())
    for entry in entries:
        for instance in entry["instances"]:
            if instance["video_id"] not in ("07099", "17710"):
                write_video(videos / f"{instance['video_id']}.mp4")
                write_pose(videos / instance["video_id"], STAND_IN[entry["gloss"]], int(instance["video_id"]))
    return FIXTURES / "WLASL" / "WLASL_v0.3.json", videos


def test_wlasl_reads_splits_frame_ranges_and_skips_absent_videos(wlasl):
    json_path, videos = wlasl
    train = read_wlasl(json_path, videos, "train")
    assert [s.path.name for s in train.samples] == ["69241.mp4", "07069.mp4", "69302.mp4", "65539.mp4"]
    assert train.missing == [videos / "07099.mp4"]
    late = train.samples[3]
    assert (late.gloss, late.signer, late.frame_start, late.frame_end, late.fps) == ("drink", "12", 5, None, 25.0)
    everything = read_wlasl(json_path, videos)
    assert len(everything) == 7 and len(everything.missing) == 2
    assert {s.split for s in everything.samples} == {"train", "val", "test"}
    subset = read_wlasl(json_path, videos, subset_json=FIXTURES / "WLASL" / "nslt_2.json")
    assert sorted(s.path.stem for s in subset.samples) == ["07068", "07070", "17733", "65539", "69241"]
    with pytest.raises(ValueError, match=r"no instance of split 'dev'; its splits: \['test', 'train', 'val'\]"):
        read_wlasl(json_path, videos, "dev")
    with pytest.raises(FileNotFoundError, match="WLASL file not found"):
        read_wlasl(videos / "WLASL_v9.json", videos)
    with pytest.raises(FileNotFoundError, match="WLASL video folder not found"):
        read_wlasl(json_path, videos / "missing")


def test_the_task_reads_a_corpus_s_keypoints_and_names_what_it_needs(wlasl, include_videos):
    from types import SimpleNamespace

    from processing.tasks.video_to_text import gloss_key, read_corpus

    json_path, videos = wlasl
    args = SimpleNamespace(sign_corpus="wlasl", sign_root=str(videos), wlasl_json=str(json_path),
                           wlasl_subset_json=None, include_subset="include")  # fmt: skip
    val = read_corpus(args, "val")
    assert [(s.gloss, s.path.name) for s in val.samples] == [("book", "07068.pose")]
    assert val.missing == [videos / "17710.pose"]  # never downloaded: no video, no keypoints
    with pytest.raises(ValueError, match="give --wlasl_json"):
        read_corpus(SimpleNamespace(**{**vars(args), "wlasl_json": None}), "val")
    with pytest.raises(ValueError, match="give --sign_root"):
        read_corpus(SimpleNamespace(**{**vars(args), "sign_root": None}), "val")
    include = SimpleNamespace(**{**vars(args), "sign_corpus": "include", "sign_root": str(include_videos)})
    with pytest.raises(FileNotFoundError, match="videos are there but not their keypoints"):
        read_corpus(include, "train")  # raw videos are refused: keypoints are extracted once, beforehand
    assert gloss_key(" Good morning.") == gloss_key("Good Morning") == "goodmorning"


def test_wlasl_frame_ranges_cut_the_keypoints(wlasl):
    json_path, videos = wlasl
    (test,) = [s for s in read_wlasl(json_path, videos, "test", media="pose").samples if s.gloss == "book"]
    assert test.path.suffix == ".pose" and (test.frame_start, test.frame_end) == (3, 12)
    whole, seen, fps = read_keypoints(test.path)
    keypoints, visible = sample_clip(test)
    assert fps == 25.0 and np.array_equal(keypoints, whole[2:12]) and np.array_equal(visible, seen[2:12])
    half_rate = SignSample(test.path, "book", "test", frame_start=2, frame_end=5, fps=12.5)  # 2..5 at 12.5 fps
    assert np.array_equal(sample_clip(half_rate)[0], whole[2:10])
    beyond = SignSample(test.path, "book", "test", frame_start=len(whole) + 1)
    with pytest.raises(ValueError, match="lie outside its"):
        sample_clip(beyond)
    short, _ = fit_frames(whole, seen, 7)
    assert len(short) == 7 and np.array_equal(short[[0, -1]], whole[[0, -1]])


def test_isolated_sign_items_write_the_gloss(include_poses, tiny_random_moe):
    from modeling_whisper_moe import WhisperMoEProcessor

    tokenizer = WhisperMoEProcessor.from_pretrained(tiny_random_moe).tokenizer
    samples = read_include(include_poses, "include", "test", media="pose").samples
    data = IsolatedSignDataset(samples, [7, 8], tokenizer, eos_id=9, max_frames=16, size=8, augment=Augmentation())
    items = [data[i] for i in range(8)]
    assert [item["gloss"] for item in items] == [s.gloss for s in samples] * 2
    for item in items:
        assert item["labels"][:2] == [7, 8] and item["labels"][-1] == 9
        assert tokenizer.decode(item["labels"][2:-1]).strip() == item["gloss"]
        assert item["pose_values"].shape[1:] == (POSE_KEYPOINTS, 4) and len(item["pose_values"]) <= 16
    assert not np.array_equal(items[0]["pose_values"], items[4]["pose_values"])  # another draw of the same clip
    batch = PoseCollator()(items)
    assert batch["pose_values"].shape[0] == 8


def _evaluate_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO_ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_include_50_recipe_trains_on_a_pose_release_and_is_scored_per_split(include_poses, tiny_random_moe, tmp_path):
    """A few steps of the INCLUDE-50 recipe on a tiny random model: the folder reads signs through its pipeline, and
    scripts/evaluate.py reports top-1 gloss accuracy on each split."""
    from processing.train import main

    out = tmp_path / "include50"
    main([str(REPO_ROOT / "configuration" / "recipes" / "include-50.json"), "--data_root", str(include_poses),
          "--model_name_or_path", str(tiny_random_moe), "--output_dir", str(out), "--max_steps", "3",
          "--per_device_train_batch_size", "2", "--eval_strategy", "no", "--save_strategy", "no",
          "--sign_examples", "6", "--generation_max_length", "8", "--dataloader_num_workers", "0"])  # fmt: skip
    assert WhisperMoEForConditionalGeneration.from_pretrained(out).config.pose_frontend
    report_path = tmp_path / "include50.json"
    assert _evaluate_script().main(["--tasks", "video_to_text", "--model", f"tiny={out}",
                                    "--limit", "1", "--output_json", str(report_path)]) == 0  # fmt: skip
    (system,) = json.loads(report_path.read_text())["reports"]["video_to_text"]["systems"]
    assert system["corpus"] == "include" and list(system["splits"]) == ["train", "test"]
    assert [system["splits"][split]["clips"] for split in ("train", "test")] == [1, 1]  # --limit 1 of 5 and 2
    for scores in system["splits"].values():
        assert scores["accuracy"] == pytest.approx(100 * scores["correct"] / scores["clips"])
    assert [example["gloss"] for example in system["examples"]] == ["Bird", "Bird"]
    assert all(isinstance(example["read"], str) for example in system["examples"])
