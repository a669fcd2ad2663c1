"""Unit tests of WhisperMoE on tiny random configurations."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, TINY_FRAMES, tiny_dense_config, tiny_moe, tiny_moe_config
from transformers import WhisperForConditionalGeneration

from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration, load_balancing_loss
from modeling_whisper_moe.modeling_whisper_moe import EXPERTS_FUNCTIONS, WhisperMoESparseBlock


def _inputs(batch: int = 2, tgt_len: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, TINY["num_mel_bins"], TINY_FRAMES, generator=generator)
    labels = torch.randint(4, TINY["vocab_size"], (batch, tgt_len), generator=generator)
    return features, labels


def test_forward_shapes_and_router_outputs():
    model = tiny_moe(decoder_sparse_layers=[1])
    features, labels = _inputs()
    out = model(features, labels=labels)
    assert out.logits.shape == (2, 5, TINY["vocab_size"])
    assert len(out.encoder_router_logits) == TINY["encoder_layers"]
    assert len(out.decoder_router_logits) == 1
    assert out.encoder_router_logits[0].shape == (2 * TINY["max_source_positions"], 4)
    assert out.decoder_router_logits[0].shape == (2 * 5, 4)
    expected_aux = model.config.router_aux_loss_coef * (
        out.encoder_aux_loss + out.decoder_aux_loss
    ) + model.config.router_z_loss_coef * (out.encoder_z_loss + out.decoder_z_loss)
    torch.testing.assert_close(out.aux_loss, expected_aux)
    ce = F.cross_entropy(out.logits.reshape(-1, TINY["vocab_size"]), labels.reshape(-1))
    torch.testing.assert_close(out.loss, ce + out.aux_loss)


def test_no_router_outputs_without_labels_by_default():
    out = tiny_moe()(*_inputs()[:1], decoder_input_ids=torch.tensor([[3, 5]]).repeat(2, 1))
    assert out.aux_loss is None and out.encoder_router_logits is None


def test_sparse_block_matches_naive_top_k_mixture():
    config = tiny_moe_config(num_experts=5, num_experts_per_tok=3, num_shared_experts=1)
    torch.manual_seed(1)
    block = WhisperMoESparseBlock(config, ffn_dim=24)
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    hidden = torch.randn(3, 7, 16)
    tokens = hidden.reshape(-1, 16)
    probs = F.linear(tokens, block.router.weight).softmax(-1)
    weights, index = probs.topk(3, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    experts = block.experts
    expected = block.shared_experts(tokens)
    for t in range(tokens.shape[0]):
        for slot in range(3):
            e = index[t, slot]
            h = F.gelu(F.linear(tokens[t], experts.fc1_weight[e], experts.fc1_bias[e]))
            expected[t] += weights[t, slot] * F.linear(h, experts.fc2_weight[e], experts.fc2_bias[e])
    torch.testing.assert_close(block(hidden), expected.reshape(3, 7, 16), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["loop", "grouped_mm", "batched_mm"])
def test_expert_implementations_give_the_same_outputs_and_gradients(implementation):
    """Every implementation matches the default grouped dispatch, in outputs and in input, weight and bias grads."""
    torch.manual_seed(0)
    tokens = torch.randn(3000, 16)
    top_k_index = torch.randint(0, 4, (3000, 2))
    top_k_weights = torch.rand(3000, 2, requires_grad=True)
    results = {}
    for name in ("grouped", implementation):
        torch.manual_seed(1)
        block = WhisperMoESparseBlock(tiny_moe_config(experts_implementation=name), ffn_dim=24)
        for parameter in block.parameters():
            torch.nn.init.normal_(parameter, std=0.3)
        inputs = tokens.clone().requires_grad_(True)
        weights = top_k_weights.detach().clone().requires_grad_(True)
        out = block.experts(inputs, top_k_index, weights)
        out.square().sum().backward()
        experts = block.experts
        results[name] = (out, inputs.grad, weights.grad, experts.fc1_weight.grad, experts.fc2_weight.grad)
        results[name] += (experts.fc1_bias.grad, experts.fc2_bias.grad)
    for grouped, other in zip(results["grouped"], results[implementation], strict=True):
        # weight gradients sum thousands of tokens: compare at float32 accumulation-order precision of their scale
        torch.testing.assert_close(other, grouped, atol=1e-5 * grouped.abs().max().item(), rtol=1e-4)


def test_experts_implementation_is_switchable_after_a_dense_whisper_was_built(tmp_path):
    """transformers caches 'cannot set experts implementation' on WhisperPreTrainedModel once a dense Whisper is
    built; the MoE must still honour from_pretrained(experts_implementation=...) and set_experts_implementation."""
    WhisperForConditionalGeneration(tiny_dense_config())
    tiny_moe().save_pretrained(tmp_path)
    model = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path, experts_implementation="batched_mm")
    features, labels = _inputs()
    calls = []
    original = EXPERTS_FUNCTIONS["batched_mm"]
    EXPERTS_FUNCTIONS["batched_mm"] = lambda *args: calls.append(1) or original(*args)
    try:
        reference = model(features, labels=labels).logits
        assert calls, "batched_mm was requested but never ran"
        model.set_experts_implementation("loop")
        assert model.config._experts_implementation == "loop"
        torch.testing.assert_close(model(features, labels=labels).logits, reference, atol=1e-5, rtol=1e-5)
    finally:
        EXPERTS_FUNCTIONS["batched_mm"] = original
    with pytest.raises(ValueError, match="magic"):
        WhisperMoEForConditionalGeneration.from_pretrained(tmp_path, experts_implementation="magic")


def test_gradients_reach_routers_and_experts():
    model = tiny_moe().train()
    features, labels = _inputs()
    model(features, labels=labels).loss.backward()
    block = model.model.decoder.layers[0].mlp
    assert block.router.weight.grad.abs().sum() > 0
    assert block.experts.fc1_weight.grad.abs().sum() > 0


def test_save_and_load_round_trip_has_no_missing_keys(tmp_path):
    model = tiny_moe(num_shared_experts=1, encoder_sparse_layers=[0])
    model.save_pretrained(tmp_path)
    loaded, info = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert loaded.config.num_shared_experts == 1 and loaded.config.encoder_sparse_layers == [0]
    features, labels = _inputs()
    torch.testing.assert_close(loaded.eval()(features, labels=labels).logits, model(features, labels=labels).logits)


def test_cache_equals_no_cache():
    model = tiny_moe()
    features, _ = _inputs(batch=1)
    kwargs = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with_cache = model.generate(features, use_cache=True, **kwargs)
    without_cache = model.generate(features, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache)
    assert with_cache.shape[1] >= 8


def test_padding_does_not_change_router_losses():
    model = tiny_moe()
    features, labels = _inputs(batch=1, tgt_len=4)
    padded = torch.cat([labels, torch.full((1, 3), -100)], dim=1)
    frames = torch.ones(1, TINY_FRAMES, dtype=torch.long)
    plain = model(features, labels=labels, attention_mask=frames)
    with_padding = model(features, labels=padded, attention_mask=frames)
    torch.testing.assert_close(with_padding.decoder_aux_loss, plain.decoder_aux_loss)
    torch.testing.assert_close(with_padding.decoder_z_loss, plain.decoder_z_loss)

    # masked mel frames (the second half) leave the encoder losses to the frames that are real
    half = torch.cat([torch.ones(1, TINY_FRAMES // 2), torch.zeros(1, TINY_FRAMES // 2)], dim=1).long()
    masked = model(features, labels=labels, attention_mask=half)
    real_positions = TINY["max_source_positions"] // 2
    expected = load_balancing_loss(tuple(logits[:real_positions] for logits in masked.encoder_router_logits), 4, 2)
    torch.testing.assert_close(masked.encoder_aux_loss, expected)


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_collapsed():
    balanced = (torch.zeros(64, 4),)
    collapsed = (torch.tensor([[10.0, 9.0, 0.0, 0.0]]).repeat(64, 1),)
    assert load_balancing_loss(balanced, num_experts=4, top_k=2).item() == pytest.approx(1.0)
    assert load_balancing_loss(collapsed, num_experts=4, top_k=2).item() > 1.9


def test_loss_is_independent_of_gradient_accumulation_split():
    model = tiny_moe()
    features, labels = _inputs(batch=4, tgt_len=6)
    labels[0, 2:] = -100  # uneven label counts make a mean of per-batch means wrong
    labels[3, 5:] = -100
    num_items = (labels != -100).sum()
    full = model(features, labels=labels)
    halves = [model(features[i : i + 2], labels=labels[i : i + 2], num_items_in_batch=num_items) for i in (0, 2)]
    full_ce = full.loss - full.aux_loss
    torch.testing.assert_close(sum(half.loss - half.aux_loss for half in halves), full_ce)
    # router losses: each half weighted by its share of the labels, i.e. a token-weighted mean at full-batch scale
    unweighted = [model(features[i : i + 2], labels=labels[i : i + 2]).aux_loss for i in (0, 2)]
    shares = [(labels[i : i + 2] != -100).sum() / num_items for i in (0, 2)]
    torch.testing.assert_close(halves[0].aux_loss + halves[1].aux_loss, sum(a * s for a, s in zip(unweighted, shares)))


def test_upcycled_tiny_model_equals_dense_source():
    torch.manual_seed(0)
    dense = WhisperForConditionalGeneration(tiny_dense_config()).eval()
    features, labels = _inputs()
    expected = dense(features, labels=labels).logits
    for options in ({}, {"num_shared_experts": 2}, {"encoder_sparse_layers": [1], "decoder_sparse_layers": []}):
        moe = WhisperMoEForConditionalGeneration.from_dense(dense, num_experts=4, **options)
        torch.testing.assert_close(moe(features, labels=labels).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"num_experts": 0}, "num_experts"),
        ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef"),
        ({"router_z_loss_coef": -1.0}, "router_z_loss_coef"),
        ({"router_jitter_noise": 1.5}, "router_jitter_noise"),
        ({"num_shared_experts": -1}, "num_shared_experts"),
        ({"encoder_sparse_layers": [0, 7]}, r"encoder_sparse_layers names layers \[7\]"),
        ({"decoder_sparse_layers": [-1]}, "decoder_sparse_layers"),
        ({"experts_implementation": "magic"}, "experts_implementation"),
    ],
)
def test_impossible_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_moe_config(**overrides)


def test_upcycling_rejects_unknown_options_and_unnormalised_top_k():
    dense = WhisperForConditionalGeneration(tiny_dense_config())
    with pytest.raises(ValueError, match="num_expert"):
        WhisperMoEForConditionalGeneration.from_dense(dense, num_expert=4)
    with pytest.raises(ValueError, match="norm_topk_prob"):
        WhisperMoEForConditionalGeneration.from_dense(dense, norm_topk_prob=False)


def test_config_round_trips_through_json(tmp_path):
    config = tiny_moe_config(num_experts=6, decoder_sparse_layers=[0], router_jitter_noise=0.1)
    config.save_pretrained(tmp_path)
    loaded = WhisperMoEConfig.from_pretrained(tmp_path)
    assert (loaded.num_experts, loaded.decoder_sparse_layers, loaded.router_jitter_noise) == (6, [0], 0.1)
    assert loaded.model_type == "whisper_moe"


def test_pruning_unused_experts_keeps_the_outputs():
    from processing.pruning import prune_experts, routing_counts

    model = tiny_moe(num_experts=6)
    direction = torch.randn(TINY["d_model"])
    for layer in [*model.model.encoder.layers, *model.model.decoder.layers]:
        # every token reaches the experts as `direction`, which experts 4 and 5 score lowest
        torch.nn.init.zeros_(layer.final_layer_norm.weight)
        layer.final_layer_norm.bias.data.copy_(direction)
        router = layer.mlp.router.weight.data
        router[:4] = direction + 0.1 * torch.randn(4, TINY["d_model"])
        router[4:] = -direction
    features, labels = _inputs()
    expected = model(features, labels=labels).logits
    counts = routing_counts(model, [{"input_features": features, "labels": labels}])
    assert all(count[4:].sum() == 0 and count.sum() > 0 for count in counts.values())
    pruned = prune_experts(model, counts, keep=4)
    assert pruned.config.num_experts == 4 and pruned.model.decoder.layers[0].mlp.experts.fc1_weight.shape[0] == 4
    torch.testing.assert_close(pruned(features, labels=labels).logits, expected)
    with pytest.raises(ValueError, match="keep must be between"):
        prune_experts(pruned, counts, keep=1)


def test_routing_counts_count_real_tokens_only():
    from processing.pruning import routing_counts

    model = tiny_moe()
    features, labels = _inputs()
    top_k, positions = model.config.num_experts_per_tok, TINY_FRAMES // 2
    every = routing_counts(model, [{"input_features": features, "labels": labels}])
    assert every["model.encoder.layers.0.mlp"].sum() == 2 * positions * top_k
    assert every["model.decoder.layers.0.mlp"].sum() == labels.numel() * top_k
    labels[1, 3:] = -100  # row 1 has 3 real labels
    attention_mask = torch.ones(2, TINY_FRAMES, dtype=torch.long)
    attention_mask[0, 10:] = 0  # row 0 has 10 real frames: 5 encoder positions
    batch = {"input_features": features, "attention_mask": attention_mask, "labels": labels}
    real = routing_counts(model, [batch])
    assert real["model.encoder.layers.0.mlp"].sum() == (5 + positions) * top_k
    assert real["model.decoder.layers.0.mlp"].sum() == (5 + 3) * top_k


def test_a_model_built_from_a_config_has_whispers_encoder_sinusoids_and_loading_keeps_a_saved_table(tmp_path):
    from transformers.models.whisper.modeling_whisper import sinusoids

    table = tiny_moe().model.encoder.embed_positions.weight
    assert torch.equal(table, sinusoids(*table.shape)) and not table.requires_grad
    model = tiny_moe()
    with torch.no_grad():
        model.model.encoder.embed_positions.weight.mul_(2.0)  # a saved table the init must not overwrite
    model.save_pretrained(tmp_path)
    loaded = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path).model.encoder.embed_positions.weight
    assert torch.equal(loaded, 2.0 * sinusoids(*table.shape))
