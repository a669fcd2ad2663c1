"""Growing a WhisperMoE with new experts (lifelong learning): exact at step 0, trainable, saved and reloaded."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, TINY_FRAMES, run_without_package, tiny_moe, tiny_moe_config

from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration
from modeling_whisper_moe.growth import grow_experts, previous_model
from modeling_whisper_moe.modeling_whisper_moe import EXPERTS_FUNCTIONS, WhisperMoESparseBlock


def _inputs(batch: int = 2, tgt_len: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, TINY["num_mel_bins"], TINY_FRAMES, generator=generator)
    labels = torch.randint(4, TINY["vocab_size"], (batch, tgt_len), generator=generator)
    return features, labels


def _perturbed(model: WhisperMoEForConditionalGeneration, seed: int = 1) -> WhisperMoEForConditionalGeneration:
    """Experts and routers that differ from one another, like a fine-tuned model's."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mlp." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def _logits(model, features, labels) -> torch.Tensor:
    with torch.no_grad():
        return model(features, labels=labels).logits


@pytest.mark.parametrize("init", ["copy", "random"])
def test_growing_keeps_every_output(init):
    model = _perturbed(tiny_moe(decoder_sparse_layers=[1]))
    features, labels = _inputs()
    before = _logits(model, features, labels)
    grow_experts(model, num_new=3, num_experts_per_tok=2, init=init)
    assert model.config.expert_growth == [
        {"num_experts": 3, "num_experts_per_tok": 2, "encoder_layers": [0, 1], "decoder_layers": [1]}
    ]
    block = model.model.decoder.layers[1].mlp
    assert block.experts.fc1_weight.shape[0] == 7 and block.router.weight.shape[0] == 7
    assert isinstance(model.model.decoder.layers[0].mlp, torch.nn.Module) and not isinstance(
        model.model.decoder.layers[0].mlp, WhisperMoESparseBlock
    )
    torch.testing.assert_close(_logits(model, features, labels), before, atol=0, rtol=0)


def test_new_experts_take_traffic_and_learn():
    model = tiny_moe()
    grow_experts(model, num_new=2, num_experts_per_tok=1)
    features, labels = _inputs()
    model.train()
    out = model(features, labels=labels)
    out.loss.backward()
    block = model.model.encoder.layers[0].mlp
    # every token also went to one new expert, whose zero output projection has a gradient
    assert block.experts.fc2_weight.grad[4:].abs().sum() > 0
    assert block.router.null_logits.requires_grad
    # router logits: 4 + 2 experts and one null column
    assert out.encoder_router_logits[0].shape[-1] == 7
    assert out.encoder_aux_loss is not None and torch.isfinite(out.aux_loss)


def test_dense_layer_becomes_sparse_exactly():
    model = _perturbed(tiny_moe(encoder_sparse_layers=[], decoder_sparse_layers=[0]))
    features, labels = _inputs()
    before = _logits(model, features, labels)
    grow_experts(model, num_new=2, encoder_layers=[1], decoder_layers=[1])
    assert isinstance(model.model.encoder.layers[1].mlp, WhisperMoESparseBlock)
    assert model.config.expert_groups("encoder", 1) == [(1, 1), (2, 1)]
    assert model.config.expert_groups("decoder", 0) == [(4, 2)]
    torch.testing.assert_close(_logits(model, features, labels), before, atol=0, rtol=0)


def test_grown_folder_reloads_identically(tmp_path):
    model = _perturbed(tiny_moe())
    grow_experts(model, num_new=2, decoder_layers=[0])
    _perturbed(model, seed=2)  # as after training: the new experts and null logits are no longer zero
    model.save_pretrained(tmp_path / "grown")
    reloaded = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path / "grown").eval()
    assert reloaded.config.expert_growth == model.config.expert_growth
    features, labels = _inputs()
    torch.testing.assert_close(_logits(reloaded, features, labels), _logits(model.eval(), features, labels))


def test_growing_twice_and_previous_model():
    model = _perturbed(tiny_moe())
    features, labels = _inputs()
    first = _logits(model, features, labels)
    grow_experts(model, num_new=2)
    _perturbed(model, seed=3)  # phase 0 trained (old experts changed too, so compare phase by phase)
    after_phase_0 = _logits(model, features, labels)
    grow_experts(model, num_new=1, decoder_layers=[1])
    torch.testing.assert_close(_logits(model, features, labels), after_phase_0, atol=0, rtol=0)
    with previous_model(model) as previous:  # before phase 1 = after phase 0
        torch.testing.assert_close(_logits(previous, features, labels), after_phase_0, atol=0, rtol=0)
    with previous_model(model, phase=0):  # before any growth: the base groups alone
        base_only = _logits(model, features, labels)
    assert not torch.equal(base_only, first)  # _perturbed changed the base experts as well
    assert model.model.decoder.layers[1].mlp.router.phases == [0, 1]
    assert model.model.decoder.layers[0].mlp.router.phases == [0]


@pytest.mark.parametrize("implementation", ["grouped", "loop", "grouped_mm", "batched_mm"])
def test_grown_block_same_under_every_experts_implementation(implementation):
    assert implementation in EXPERTS_FUNCTIONS or implementation == "grouped"
    model = _perturbed(tiny_moe())
    grow_experts(model, num_new=3, num_experts_per_tok=2)
    _perturbed(model, seed=4)
    features, labels = _inputs()
    reference = _logits(model, features, labels)
    model.set_experts_implementation(implementation)
    torch.testing.assert_close(_logits(model, features, labels), reference, atol=1e-5, rtol=1e-5)


def test_grown_group_weights_are_softmax_against_null():
    config = tiny_moe_config(
        num_experts=3,
        num_experts_per_tok=2,
        expert_growth=[{"num_experts": 2, "num_experts_per_tok": 1, "encoder_layers": [0], "decoder_layers": []}],
    )
    block = WhisperMoESparseBlock(config, 24, config.expert_groups("encoder", 0), config.growth_phases("encoder", 0))
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    tokens = torch.randn(6, 16)
    logits, weights, index = block.router(tokens)
    raw = F.linear(tokens, block.router.weight)
    base = raw[:, :3].softmax(-1).topk(2, dim=-1)
    grown = torch.cat([raw[:, 3:], block.router.null_logits.expand(6, 1)], -1).softmax(-1)[:, :2].topk(1, dim=-1)
    torch.testing.assert_close(weights[:, :2], base.values / base.values.sum(-1, keepdim=True))
    torch.testing.assert_close(weights[:, 2:], grown.values)
    torch.testing.assert_close(index, torch.cat([base.indices, grown.indices + 3], -1))
    assert logits.shape == (6, 6)  # 5 experts and the null column


@pytest.mark.parametrize(
    "phase, message",
    [
        (
            {"num_experts": 0, "num_experts_per_tok": 1, "encoder_layers": [], "decoder_layers": [0]},
            "num_experts >= 1",
        ),
        ({"num_experts": 2, "num_experts_per_tok": 3, "encoder_layers": [], "decoder_layers": [0]}, "num_experts_per"),
        ({"num_experts": 2, "num_experts_per_tok": 1, "encoder_layers": [5], "decoder_layers": []}, "encoder layers"),
        ({"num_experts": 2}, "exactly the keys"),
    ],
)
def test_impossible_growth_configs_raise(phase, message):
    with pytest.raises(ValueError, match=message):
        WhisperMoEConfig(**{**TINY, "expert_growth": [phase]})


def test_grow_rejects_bad_arguments():
    with pytest.raises(ValueError, match="init must be one of"):
        grow_experts(tiny_moe(), num_new=2, init="zeros")
    with pytest.raises(ValueError, match="no layer to grow"):
        grow_experts(tiny_moe(encoder_sparse_layers=[], decoder_sparse_layers=[]), num_new=2)


def test_router_losses_balance_the_base_group_with_its_own_top_k_when_a_dense_layer_grew_first():
    from modeling_whisper_moe.modeling_whisper_moe import grown_router_losses, load_balancing_loss

    config = tiny_moe_config(encoder_sparse_layers=[1], expert_growth=[
        {"num_experts": 1, "num_experts_per_tok": 1, "encoder_layers": [0], "decoder_layers": []}
    ])  # fmt: skip
    groups = config.sparse_layer_groups("encoder")
    assert groups == [[(1, 1), (1, 1)], [(4, 2)]]
    dense_made_sparse, sparse = torch.randn(6, 3), torch.randn(6, 4)
    balance, _ = grown_router_losses((dense_made_sparse, sparse), groups)
    torch.testing.assert_close(balance, load_balancing_loss((sparse,), 4, 2))


# greedy: equal transcripts are the claim, and growth adds no decoding state that beam search would reorder
GROWN_REMOTE_SCRIPT = """
from transformers import pipeline

data, folders = sys.argv[1], sys.argv[2:]
clips = [data + "/misc/jfk.flac", data + "/librispeech/test-other/1688/142285/1688-142285-0000.flac"]
result = {}
for folder in folders:
    asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
    routers = [m for m in asr.model.modules() if type(m).__name__ == "WhisperMoERouter"]
    texts = [asr(clip, generate_kwargs={"num_beams": 1})["text"] for clip in clips]
    result[folder] = {"texts": texts, "module": type(asr.model).__module__,
                      "routers": sorted({len(router.groups) for router in routers})}
"""


@pytest.mark.slow
def test_add_experts_cli_keeps_real_transcripts_through_the_remote_pipeline(tiny_en_moe, data_dir, tmp_path):
    """`whisper-moe add-experts` on real tiny.en 8x2, freshly upcycled and with experts that differ as after
    fine-tuning: the grown folders transcribe real speech exactly as their sources, from the folder's code alone."""
    from modeling_whisper_moe import WhisperMoEProcessor
    from processing.cli import main as cli

    fine_tuned = tmp_path / "fine-tuned"
    model = WhisperMoEForConditionalGeneration.from_pretrained(tiny_en_moe)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # experts (not routers) made to differ a little, as fine-tuning leaves them
        for name, parameter in model.named_parameters():
            if ".mlp.experts." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std() * 0.05)
    model.save_pretrained(fine_tuned)
    WhisperMoEProcessor.from_pretrained(tiny_en_moe).save_pretrained(fine_tuned)
    pairs = []
    for source, layers in ((tiny_en_moe, ["--encoder-layers", "none"]), (fine_tuned, ["--encoder-layers", "1,3"])):
        grown = tmp_path / f"{source.name}-grown"
        assert cli(["add-experts", str(source), str(grown), "--num-new", "2", "--init", "random", *layers]) == 0
        pairs.append((source, grown))
    assert cli(["add-experts", str(tiny_en_moe), str(tmp_path / "bad"), "--num-new", "0"]) == 1
    assert not (tmp_path / "bad").exists()
    folders = [str(folder) for pair in pairs for folder in pair]
    remote = run_without_package(GROWN_REMOTE_SCRIPT, data_dir, *folders, tmp_path=tmp_path)
    assert remote["leaked"] == []
    for source, grown in pairs:
        assert remote[str(grown)]["texts"] == remote[str(source)]["texts"]
        assert remote[str(grown)]["module"].startswith("transformers_modules")
        assert remote[str(source)]["routers"] == [1] and remote[str(grown)]["routers"] == [1, 2]
    assert "And so my fellow Americans" in remote[str(pairs[0][0])]["texts"][0]


def test_phase_weight_shares_measure_the_traffic_a_growth_phase_takes():
    """The share of routing weight on a phase's experts follows its null logit: ~0 while the null expert takes the
    group's weight, 1/(base weight + 1) once the new experts take all of it; real tokens only, summing to 1."""
    from processing.pruning import phase_weight_shares

    model = grow_experts(tiny_moe(), num_new=1, num_experts_per_tok=1, encoder_layers=[]).eval()
    features, labels = _inputs()
    batches = [{"input_features": features, "labels": labels}]
    routers = [layer.mlp.router for layer in model.model.decoder.layers]
    for null_logit, expected in ((30.0, 0.0), (-30.0, 0.5)):
        with torch.no_grad():
            for router in routers:
                router.null_logits.fill_(null_logit)
        shares = phase_weight_shares(model, batches)
        assert set(shares) == {"encoder", "decoder"} and shares["encoder"] == {"base": 1.0}
        assert shares["decoder"]["phase 0"] == pytest.approx(expected, abs=1e-6)  # base top-2 weights sum to 1
        assert sum(shares["decoder"].values()) == pytest.approx(1.0)


def _train_newest_phase(model: WhisperMoEForConditionalGeneration, seed: int = 5) -> None:
    """Move every parameter the newest growth phase added, as training it would: experts, router rows, null logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, WhisperMoESparseBlock) and len(module.router.groups) > 1:
                new = module.router.num_experts - module.router.groups[-1][0]
                for tensor in (module.experts.fc2_weight, module.experts.fc1_weight, module.router.weight):
                    tensor[new:] += torch.randn(tensor[new:].shape, generator=generator)
                module.router.null_logits[-1] = -5.0  # the new experts now take most of the group's weight


def test_a_text_phase_never_changes_speech_however_it_trains(tmp_path):
    from test_text_translation import _text_batch, tiny_text_moe

    model = _perturbed(tiny_text_moe()).eval()
    features, labels = _inputs(batch=3)
    ids, mask = _text_batch()
    speech_before, text_before = _logits(model, features, labels), model(input_ids=ids, attention_mask=mask,
                                                                         labels=labels).logits  # fmt: skip
    grow_experts(model, num_new=2, encoder_layers=[0], decoder_layers=[0, 1], modalities=["text"])
    assert model.config.expert_growth[-1]["modalities"] == ["text"]
    _train_newest_phase(model)
    torch.testing.assert_close(_logits(model, features, labels), speech_before, atol=0, rtol=0)
    # as generate calls it: the encoder first, its output (with its modality) handed to every decoder step
    encoded = model.get_encoder()(features)
    assert encoded["modality"] == "speech"
    stepwise = model(encoder_outputs=encoded, labels=labels).logits
    torch.testing.assert_close(stepwise, speech_before, atol=0, rtol=0)
    text_after = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    assert (text_after - text_before).abs().max() > 1e-3  # the phase does serve text
    model.save_pretrained(tmp_path / "grown")
    reloaded = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path / "grown").eval()
    torch.testing.assert_close(_logits(reloaded, features, labels), speech_before, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask, labels=labels).logits, text_after)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_speech_phase_leaves_text_generation_as_it_was(num_beams):
    from test_text_translation import _text_batch, tiny_text_moe

    model = _perturbed(tiny_text_moe()).eval()
    ids, mask = _text_batch()
    before = model.generate(input_ids=ids, attention_mask=mask, language="de", max_new_tokens=4, num_beams=num_beams)
    grow_experts(model, num_new=2, modalities=["speech"])
    _train_newest_phase(model)
    after = model.generate(input_ids=ids, attention_mask=mask, language="de", max_new_tokens=4, num_beams=num_beams)
    assert after.tolist() == before.tolist()
    features, labels = _inputs(batch=3)
    with previous_model(model):
        speech_before = _logits(model, features, labels)
    assert (_logits(model, features, labels) - speech_before).abs().max() > 1e-3


def test_inputs_a_phase_does_not_serve_give_its_parameters_no_gradient():
    model = _perturbed(tiny_moe(text_frontend=True, max_text_positions=10)).train()
    grow_experts(model, num_new=2, decoder_layers=[1], encoder_layers=[], modalities=["text"])
    _train_newest_phase(model)
    features, labels = _inputs()
    out = model(features, labels=labels)
    out.loss.backward()
    block = model.model.decoder.layers[1].mlp
    assert block.experts.fc2_weight.grad[4:].abs().sum() == 0
    assert block.router.weight.grad[4:].abs().sum() == 0  # not even through the balance or z-loss
    assert block.router.null_logits.grad.abs().sum() == 0
    assert block.router.weight.grad[:4].abs().sum() > 0  # the old rows still get their losses' gradient
    assert all(router.input_modality is None for router in [block.router])  # the context was left


@pytest.mark.parametrize("modalities", [["image"], [], "text"])
def test_growth_modalities_must_be_known_input_modalities(modalities):
    phase = {"num_experts": 2, "num_experts_per_tok": 1, "encoder_layers": [], "decoder_layers": [0],
             "modalities": modalities}  # fmt: skip
    with pytest.raises(ValueError, match="modalities must be a non-empty list"):
        WhisperMoEConfig(**{**TINY, "expert_growth": [phase]})


def test_growing_a_model_that_already_ran_still_records_every_router():
    model = tiny_moe()
    features, labels = _inputs()
    model(features, labels=labels)  # transformers installs its router-logit hooks on this first call
    grow_experts(model, num_new=2, decoder_layers=[1])
    out = model(features, labels=labels)
    assert [logits.shape[-1] for logits in out.decoder_router_logits] == [4, 7]  # the grown layer: 4 + 2 + null
