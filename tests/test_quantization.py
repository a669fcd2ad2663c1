"""Int8 quantization: accuracy against float, the saved folder's tensors, loading without the package, the CLI."""

import copy
import json
import textwrap

import pytest
import torch
from conftest import JFK_TEXT, TINY_FRAMES, run_without_package, tiny_moe
from safetensors import safe_open
from transformers import pipeline
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from modeling_whisper_moe import WhisperMoEForConditionalGeneration
from modeling_whisper_moe.quantization import (
    ROW_CHUNK,
    Int8Embedding,
    Int8Experts,
    Int8Linear,
    Int8TiedProjection,
    dequantize,
    quantize_model,
    quantize_per_channel,
)
from processing.cli import main as cli_main

# Int8 per-channel weights and 7-bit dynamic activations lose ~1-2% per matmul; through a few layers the logits of a
# random model stay within this relative error, while a wrong scale, axis or bias would be off by order one.
MAX_RELATIVE_ERROR = 0.08
MAX_EXPERTS_RELATIVE_ERROR = 0.03


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def tiny_inputs(model: WhisperMoEForConditionalGeneration, batch: int = 2, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, model.config.num_mel_bins, TINY_FRAMES, generator=generator)
    decoder_input_ids = torch.randint(4, model.config.vocab_size, (batch, 5), generator=generator)
    return {"input_features": features, "decoder_input_ids": decoder_input_ids}


def quantized_copy(model: WhisperMoEForConditionalGeneration, **options) -> WhisperMoEForConditionalGeneration:
    quantized = copy.deepcopy(model)
    quantized.config.quantization = {"dtype": "int8", **options}
    return quantize_model(quantized)


@torch.no_grad()
def test_each_row_gets_its_own_activation_scale():
    """A quiet token batched with one 1000x louder keeps the accuracy it has alone: one scale for the whole input
    would round the quiet row to zero (relative error ~1)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = Int8Linear.from_float(linear)
    quiet = torch.randn(1, 64)
    loud = 1000 * torch.randn(1, 64)
    alone = relative_error(layer(quiet), linear(quiet))
    batched = relative_error(layer(torch.cat([quiet, loud]))[:1], linear(quiet))
    loud_error = relative_error(layer(torch.cat([quiet, loud]))[1:], linear(loud))
    assert alone < 0.05 and batched < 2 * alone + 0.01 and loud_error < 0.05
    many = torch.randn(3, ROW_CHUNK // 2 + 3, 64) * torch.logspace(-3, 3, 3)[:, None, None]  # chunks of rows
    output = layer(many)
    assert output.shape == (3, ROW_CHUNK // 2 + 3, 32)
    assert max(relative_error(output[i], linear(many[i])) for i in range(3)) < 0.05


@torch.no_grad()
def test_per_channel_quantization_round_trips_within_half_a_step():
    weight = torch.randn(3, 7, 5) * torch.logspace(-3, 1, 7)[:, None]  # channels of very different ranges
    int8, scale = quantize_per_channel(weight)
    assert int8.dtype == torch.int8 and scale.shape == (3, 7)
    assert int8.abs().amax(dim=-1).eq(127).all()  # each channel uses its full range
    assert ((dequantize(int8, scale) - weight).abs() <= scale[..., None] / 2 + 1e-7).all()


@torch.no_grad()
def test_every_linear_expert_and_embedding_is_replaced():
    quantized = quantized_copy(tiny_moe())
    assert not [name for name, module in quantized.named_modules() if isinstance(module, torch.nn.Linear)]
    assert isinstance(quantized.model.decoder.embed_tokens, Int8Embedding)
    assert isinstance(quantized.proj_out, Int8TiedProjection)
    assert quantized.proj_out.embedding is quantized.model.decoder.embed_tokens
    layer = quantized.model.encoder.layers[0]
    assert isinstance(layer.mlp.experts, Int8Experts) and isinstance(layer.self_attn.q_proj, Int8Linear)
    assert isinstance(layer.mlp.router.weight, torch.nn.Parameter)  # routers stay float


@torch.no_grad()
def test_int8_experts_close_to_float_experts():
    model = tiny_moe(encoder_ffn_dim=64, d_model=32)
    experts = model.model.encoder.layers[0].mlp.experts
    tokens = torch.randn(200, 32)
    top_k_weights, top_k_index = torch.rand(200, 4).softmax(-1).topk(2, dim=-1)
    expected = experts(tokens, top_k_index, top_k_weights)
    actual = Int8Experts.from_float(experts)(tokens, top_k_index, top_k_weights)
    assert relative_error(actual, expected) < MAX_EXPERTS_RELATIVE_ERROR


@torch.no_grad()
def test_int8_logits_close_to_float_logits():
    model = tiny_moe()
    inputs = tiny_inputs(model)
    expected = model(**inputs).logits
    actual = quantized_copy(model)(**inputs).logits
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < MAX_RELATIVE_ERROR


@torch.no_grad()
def test_save_load_round_trip_is_exact_and_stores_int8(tmp_path):
    quantized = quantized_copy(tiny_moe())
    inputs = tiny_inputs(quantized)
    quantized.save_pretrained(tmp_path)
    loaded, info = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(loaded.eval()(**inputs).logits, quantized(**inputs).logits)

    assert json.loads((tmp_path / "config.json").read_text())["quantization"] == {"dtype": "int8"}
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        dtypes = {name: weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes["model.encoder.layers.0.mlp.experts.fc1_weight_int8"] == "I8"
    assert dtypes["model.decoder.layers.0.self_attn.q_proj.weight_int8"] == "I8"
    assert dtypes["model.decoder.embed_tokens.weight_int8"] == "I8"
    assert not [name for name in dtypes if name.endswith(("fc1_weight", "proj.weight")) or name.startswith("proj_out")]


@torch.no_grad()
def test_float_embeddings_stay_tied_and_round_trip(tmp_path):
    model = tiny_moe()
    quantized = quantized_copy(model, float_embeddings=True)
    assert isinstance(quantized.model.decoder.layers[0].mlp.experts, Int8Experts)
    assert quantized.proj_out.weight is quantized.model.decoder.embed_tokens.weight
    inputs = tiny_inputs(quantized)
    assert relative_error(quantized(**inputs).logits, model(**inputs).logits) < MAX_RELATIVE_ERROR
    quantized.save_pretrained(tmp_path)
    loaded, info = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert loaded.config.quantization == {"dtype": "int8", "float_embeddings": True}
    assert torch.equal(loaded.eval()(**inputs).logits, quantized(**inputs).logits)


@torch.no_grad()
def test_replaced_buffers_are_packed_again():
    quantized = quantized_copy(tiny_moe())
    inputs = tiny_inputs(quantized)
    before = quantized(**inputs).logits
    embedding = quantized.model.decoder.embed_tokens
    embedding.weight_scale = embedding.weight_scale * 2  # the tied projection must see the new scales
    after = quantized(**inputs).logits
    assert not torch.allclose(before, after)


def test_config_rejects_unknown_quantization():
    with pytest.raises(ValueError, match="int4"):
        tiny_moe(quantization={"dtype": "int4"})
    with pytest.raises(ValueError, match="bits"):
        tiny_moe(quantization={"dtype": "int8", "bits": 8})


def quantize_cli(source, destination, *flags) -> int:
    return cli_main(["quantize", str(source), str(destination), *flags])


def test_cli_errors_name_the_problem(tmp_path, capsys):
    float_folder = tmp_path / "float"
    tiny_moe().save_pretrained(float_folder)
    assert quantize_cli(float_folder, tmp_path / "out", "--dtype", "int4") == 1
    assert "int4" in capsys.readouterr().err
    assert quantize_cli(tmp_path / "missing", tmp_path / "out") == 1
    assert "missing" in capsys.readouterr().err
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    assert quantize_cli(tmp_path / "dense", tmp_path / "out") == 1
    assert "'whisper'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert quantize_cli(float_folder, tmp_path / "int8") == 0
    assert quantize_cli(tmp_path / "int8", tmp_path / "twice") == 1
    assert "already quantized" in capsys.readouterr().err


# Runs where the package cannot be imported (see conftest.run_without_package): only the folder's code can answer.
REMOTE_SCRIPT = textwrap.dedent(
    """
    from transformers import pipeline

    folder, audio = sys.argv[1], sys.argv[2]
    asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
    result = {
        "text": asr(audio, generate_kwargs={"max_new_tokens": 8})["text"],
        "modules": sorted({type(module).__name__ for module in asr.model.modules()}),
    }
    """
)


def test_quantized_folder_loads_through_pipeline_without_package(tiny_random_moe, data_dir, tmp_path):
    folder = tmp_path / "int8"
    assert quantize_cli(tiny_random_moe, folder, "--int8-embeddings") == 0
    jfk = data_dir / "misc" / "jfk.flac"
    remote = run_without_package(REMOTE_SCRIPT, folder, jfk, tmp_path=tmp_path)
    assert {"Int8Experts", "Int8Linear", "Int8Embedding", "Int8TiedProjection"} <= set(remote["modules"])
    assert "Linear" not in remote["modules"]
    local = pipeline("automatic-speech-recognition", model=str(folder), trust_remote_code=True)
    assert remote["text"] == local(str(jfk), generate_kwargs={"max_new_tokens": 8})["text"]
    assert remote["leaked"] == []


def test_int8_tiny_en_moe_transcribes_jfk(tiny_en_moe, data_dir, tmp_path):
    folder = tmp_path / "int8"
    assert quantize_cli(tiny_en_moe, folder) == 0
    float_bytes = (tiny_en_moe / "model.safetensors").stat().st_size
    assert (folder / "model.safetensors").stat().st_size < 0.45 * float_bytes  # the float embedding is ~20%
    asr = pipeline("automatic-speech-recognition", model=str(folder), trust_remote_code=True)
    normalize = EnglishTextNormalizer({})  # no British spellings in this clip
    assert normalize(asr(str(data_dir / "misc" / "jfk.flac"))["text"]) == normalize(JFK_TEXT)
