"""Fine-grained experts (DeepSeek-MoE, `expert_segments`): upcycling splits each expert and stays exact."""

import json
import textwrap

import pytest
import torch
from conftest import REPO_ROOT, TINY, TINY_FRAMES, run_without_package, tiny_dense_config, tiny_moe_config
from transformers import WhisperForConditionalGeneration

from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration, WhisperMoEProcessor
from modeling_whisper_moe.growth import grow_experts
from modeling_whisper_moe.model_card import count_parameters
from modeling_whisper_moe.modeling_whisper_moe import EXPERTS_FUNCTIONS, WhisperMoESparseBlock
from modeling_whisper_moe.upcycling import split_experts

FFN = TINY["encoder_ffn_dim"]
JFK = REPO_ROOT / "examples" / "jfk.flac"


def _inputs(batch: int = 2, tgt_len: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, TINY["num_mel_bins"], TINY_FRAMES, generator=generator)
    labels = torch.randint(4, TINY["vocab_size"], (batch, tgt_len), generator=generator)
    return features, labels


def _dense() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(tiny_dense_config()).eval()


def _logits(model, features, labels) -> torch.Tensor:
    with torch.no_grad():
        return model(features, labels=labels).logits


@pytest.mark.parametrize("segments", [2, 4])
@pytest.mark.parametrize("shared", [0, 1])
def test_fine_grained_upcycling_equals_dense_source(segments, shared):
    dense = _dense()
    features, labels = _inputs()
    moe = WhisperMoEForConditionalGeneration.from_dense(
        dense, num_experts=4, num_experts_per_tok=2, expert_segments=segments, num_shared_experts=shared
    ).eval()
    config, block = moe.config, moe.model.decoder.layers[1].mlp
    assert (config.num_experts, config.num_experts_per_tok, config.expert_segments) == (
        4 * segments,
        2 * segments,
        segments,
    )
    assert block.experts.fc1_weight.shape == (4 * segments, FFN // segments, TINY["d_model"])
    assert block.shared_experts is None if shared == 0 else block.shared_experts.fc1.out_features == FFN * shared
    torch.testing.assert_close(_logits(moe, features, labels), _logits(dense, features, labels), atol=1e-5, rtol=1e-5)


def test_fine_grained_keeps_the_coarse_models_parameters_and_active_parameters():
    dense = _dense()
    coarse = WhisperMoEForConditionalGeneration.from_dense(dense, num_experts=4, num_experts_per_tok=2)
    fine = WhisperMoEForConditionalGeneration.from_dense(
        dense, num_experts=4, num_experts_per_tok=2, expert_segments=4
    )
    (coarse_total, coarse_active), (fine_total, fine_active) = count_parameters(coarse), count_parameters(fine)
    # each extra (narrow) expert brings a router row, always active, and an fc2 bias, active top-k / E of the time
    extra, layers, d_model = 16 - 4, TINY["encoder_layers"] + TINY["decoder_layers"], TINY["d_model"]
    assert fine_total - coarse_total == extra * 2 * d_model * layers
    assert fine_active - coarse_active == extra * (d_model + d_model * 8 // 16) * layers


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("shared", [0, 1])
def test_split_experts_keeps_a_trained_block_with_and_without_norm_topk_prob(norm_topk_prob, shared):
    """Any top-k block, not only an upcycled one: the segments of each expert are picked together, weighted w_e/m."""
    coarse_config = tiny_moe_config(num_experts=5, num_experts_per_tok=2, num_shared_experts=shared,
                                    norm_topk_prob=norm_topk_prob)  # fmt: skip
    torch.manual_seed(1)
    coarse = WhisperMoESparseBlock(coarse_config, FFN)
    for parameter in coarse.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    fine_config = tiny_moe_config(num_experts=15, num_experts_per_tok=6, expert_segments=3,
                                  num_shared_experts=shared, norm_topk_prob=norm_topk_prob)  # fmt: skip
    fine = WhisperMoESparseBlock(fine_config, FFN)
    fine.load_state_dict(split_experts(coarse.state_dict(), segments=3), strict=True)
    hidden = torch.randn(3, 7, TINY["d_model"])
    torch.testing.assert_close(fine(hidden), coarse(hidden), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["grouped", "loop", "grouped_mm", "batched_mm"])
def test_fine_grained_model_is_exact_under_every_experts_implementation(implementation):
    assert implementation in EXPERTS_FUNCTIONS or implementation == "grouped"
    dense = _dense()
    features, labels = _inputs()
    # width 12: torch._grouped_mm wants rows of a multiple of 16 bytes, which 24 / 4 = 6 floats are not
    moe = WhisperMoEForConditionalGeneration.from_dense(dense, num_experts=4, expert_segments=2).eval()
    moe.set_experts_implementation(implementation)
    torch.testing.assert_close(_logits(moe, features, labels), _logits(dense, features, labels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"expert_segments": 0}, "expert_segments must be at least 1, got 0"),
        ({"expert_segments": -2}, "expert_segments must be at least 1, got -2"),
        ({"expert_segments": 5}, "expert_segments must divide encoder_ffn_dim=24, got 5"),
        ({"expert_segments": 4, "decoder_ffn_dim": 30}, "expert_segments must divide decoder_ffn_dim=30, got 4"),
    ],
)
def test_impossible_segments_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_moe_config(**overrides)


@pytest.mark.parametrize("segments, message", [(0, "at least 1, got 0"), (5, "divide encoder_ffn_dim=24, got 5")])
def test_upcycling_rejects_impossible_segments(segments, message):
    with pytest.raises(ValueError, match=f"expert_segments must .*{message}"):
        WhisperMoEForConditionalGeneration.from_dense(_dense(), num_experts=4, expert_segments=segments)


def test_a_config_saved_before_segments_existed_loads_with_one(tmp_path):
    tiny_moe_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["expert_segments"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert WhisperMoEConfig.from_pretrained(tmp_path).expert_segments == 1


def test_growing_a_fine_grained_model_is_exact_and_refuses_dense_layers():
    model = WhisperMoEForConditionalGeneration.from_dense(
        _dense(), num_experts=2, expert_segments=2, num_shared_experts=1, decoder_sparse_layers=[1]
    ).eval()
    with torch.no_grad():  # as after training: segments and routers no longer tie
        for name, parameter in model.named_parameters():
            if ".mlp." in name:
                parameter.add_(torch.randn(parameter.shape) * 0.3)
    features, labels = _inputs()
    before = _logits(model, features, labels)
    grow_experts(model, num_new=3, num_experts_per_tok=2)
    block = model.model.decoder.layers[1].mlp
    assert block.experts.fc1_weight.shape == (4 + 3, FFN // 2, TINY["d_model"])
    assert block.shared_experts.fc1.out_features == FFN
    torch.testing.assert_close(_logits(model, features, labels), before, atol=0, rtol=0)
    growth = model.config.expert_growth
    with pytest.raises(ValueError, match=r"dense decoder layers \[0\], but with expert_segments=2"):
        grow_experts(model, num_new=1, decoder_layers=[0])
    assert model.config.expert_growth == growth  # the refused phase left no trace


def test_int8_fine_grained_folder_stays_close_and_reloads(tmp_path):
    from modeling_whisper_moe.quantization import Int8Experts, quantize_model

    dense = WhisperForConditionalGeneration(tiny_dense_config(encoder_ffn_dim=64, decoder_ffn_dim=64)).eval()
    moe = WhisperMoEForConditionalGeneration.from_dense(dense, num_experts=4, expert_segments=4).eval()
    features, labels = _inputs()
    expected = _logits(moe, features, labels)
    moe.config.quantization = {"dtype": "int8"}
    quantize_model(moe)
    experts = moe.model.encoder.layers[0].mlp.experts
    assert isinstance(experts, Int8Experts) and experts.fc1_weight_int8.shape == (16, 16, TINY["d_model"])
    quantized = _logits(moe, features, labels)
    assert ((quantized - expected).norm() / expected.norm()).item() < 0.03  # int8 noise, not a wrong segment
    moe.save_pretrained(tmp_path)
    reloaded = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, features, labels), quantized, atol=0, rtol=0)


def test_fine_grained_folder_loads_without_the_package(tmp_path):
    moe = WhisperMoEForConditionalGeneration.from_dense(
        _dense(), num_experts=4, expert_segments=4, num_shared_experts=1
    ).eval()
    features, labels = _inputs()
    moe.save_pretrained(tmp_path / "fine")
    torch.save({"features": features, "labels": labels}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        """
        import sys
        import torch
        from transformers import AutoModelForSpeechSeq2Seq

        model = AutoModelForSpeechSeq2Seq.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        inputs = torch.load(sys.argv[2])
        with torch.no_grad():
            logits = model(inputs["features"], labels=inputs["labels"]).logits
        result = {"logits": logits.tolist(), "segments": model.config.expert_segments}
        """
    )
    result = run_without_package(script, tmp_path / "fine", tmp_path / "inputs.pt", tmp_path=tmp_path)
    assert result["leaked"] == [] and result["segments"] == 4
    torch.testing.assert_close(torch.tensor(result["logits"]), _logits(moe, features, labels), atol=1e-6, rtol=1e-6)
    card = (tmp_path / "fine" / "README.md").read_text()
    assert f"/ {FFN // 4} |" in card and "(fine-grained: each 1/4 of a block)" in card


def test_cli_and_training_flags_reach_the_config():
    from processing.arguments import ModelArguments
    from processing.cli import _moe_options, build_parser
    from processing.models import _architecture, moe_options

    args = build_parser().parse_args(["upcycle", "dense", "out", "--expert-segments", "4", "--shared-experts", "1"])
    assert _moe_options(args) == {"expert_segments": 4, "num_shared_experts": 1}
    training = ModelArguments(num_experts=8, num_experts_per_tok=2, expert_segments=4)
    assert moe_options(training) == {"num_experts": 8, "num_experts_per_tok": 2, "expert_segments": 4}
    # random weights: the recipe's counts are coarse there too
    fields = _architecture(training)
    assert (fields["num_experts"], fields["num_experts_per_tok"], fields["expert_segments"]) == (32, 8, 4)


@pytest.mark.slow
def test_fine_grained_tiny_en_transcribes_like_dense(tiny_en_dense):
    from modeling_whisper_moe import load_audio

    dense = WhisperForConditionalGeneration.from_pretrained(tiny_en_dense).eval()
    fine = WhisperMoEForConditionalGeneration.from_dense(tiny_en_dense, expert_segments=4).eval()
    assert (fine.config.num_experts, fine.config.num_experts_per_tok) == (32, 8)
    processor = WhisperMoEProcessor.from_pretrained(tiny_en_dense)
    features = processor(load_audio(JFK), return_tensors="pt").input_features
    prompt = torch.tensor([[dense.generation_config.decoder_start_token_id, 50362, 400, 523]])
    with torch.no_grad():
        difference = fine(features, decoder_input_ids=prompt).logits - dense(features, decoder_input_ids=prompt).logits
        texts = [processor.batch_decode(model.generate(features), skip_special_tokens=True) for model in (dense, fine)]
    assert difference.abs().max().item() <= 1e-4
    assert texts[1] == texts[0] and "ask not what your country can do for you" in texts[0][0].lower()
