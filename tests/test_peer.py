"""PEER blocks (peer.py) grown beside the feed-forward blocks: exact at growth, product keys equal brute force, only
the newest phase trains in lifelong mode, the previous model is the pre-PEER one, saved folders load on their own."""

import logging
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, TINY, run_without_package, tiny_batch, tiny_moe, tiny_moe_config

from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration, WhisperMoEProcessor, load_audio
from modeling_whisper_moe.growth import grow_experts, grow_peer, previous_model
from modeling_whisper_moe.peer import PEER
from processing.lifelong import LifelongArguments, apply_lifelong_mode, grow_for_phase, lifelong_losses

SPEC = {"num_keys": 8, "num_heads": 2, "num_experts_per_head": 3, "key_dim": 8}  # 64 experts, 6 per token
PEER_PARAMETERS = ("up.weight", "down.weight", "query.weight", "sub_keys", "query_norm.weight", "query_norm.bias")


def _perturbed(model: WhisperMoEForConditionalGeneration, fragment: str = ".mlp.", seed: int = 1):
    """Parameters whose names hold `fragment` moved off their initial values, as training would move them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if fragment in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def _logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _peer(seed: int = 0, **overrides) -> PEER:
    torch.manual_seed(seed)
    peer = PEER(tiny_moe_config(), {**SPEC, **overrides}, phase=0)
    peer.init_weights(std=0.5)
    torch.nn.init.normal_(peer.up.weight)  # as if trained: the block now writes something
    return peer.eval()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_growing_peer_keeps_every_output(mode):
    model = _perturbed(tiny_moe(decoder_sparse_layers=[1]))
    model.train(mode == "train")
    batch = tiny_batch()
    before = _logits(model, batch)
    model.add_peer(**SPEC, encoder_layers=[], decoder_layers=[0, 1])
    assert model.config.expert_growth == [
        {"num_experts": 0, "num_experts_per_tok": 0, "encoder_layers": [], "decoder_layers": [0, 1], "peer": SPEC}
    ]
    assert [len(layer.peers) for layer in model.model.decoder.layers] == [1, 1]
    assert [len(layer.peers) for layer in model.model.encoder.layers] == [0, 0]
    assert not hasattr(model.model.decoder.layers[0].mlp, "router")  # a dense layer may take PEER and stay dense
    assert model.model.decoder.layers[1].peers[0].training == (mode == "train")
    torch.testing.assert_close(_logits(model, batch), before, atol=0, rtol=0)


def test_product_key_retrieval_equals_brute_force_over_all_keys():
    peer = _peer(num_keys=16, num_heads=3, num_experts_per_head=5, key_dim=12)
    queries = torch.randn(50, 3, 12)
    scores, index = peer.retrieve(queries)
    # every expert's full key: (sub-key a of the first table, sub-key b of the second), expert a * num_keys + b
    first, second = peer.sub_keys[0], peer.sub_keys[1]  # (heads, num_keys, key_dim / 2)
    full_keys = torch.cat(
        [first[:, :, None].expand(-1, -1, 16, -1), second[:, None].expand(-1, 16, -1, -1)], dim=-1
    ).flatten(1, 2)  # (heads, 256, key_dim)
    brute = torch.einsum("thc,hnc->thn", queries, full_keys).topk(5, dim=-1)
    torch.testing.assert_close(scores, brute.values)
    assert torch.equal(index.sort(-1).values, brute.indices.sort(-1).values)


def test_peer_output_matches_its_definition():
    peer = _peer()
    tokens = torch.randn(7, TINY["d_model"])
    with torch.no_grad():
        output = peer(tokens[None])[0]
        scores, index = peer.retrieve(peer.queries(tokens))
    expected = torch.zeros_like(tokens)
    for t in range(7):
        for head in range(SPEC["num_heads"]):
            weights = scores[t, head].softmax(-1)
            for weight, expert in zip(weights, index[t, head]):
                neuron = F.gelu(peer.down.weight[expert] @ tokens[t])
                expected[t] += weight * neuron * peer.up.weight[expert]
    torch.testing.assert_close(output, expected)


def test_query_statistics_train_on_batches_and_stay_fixed_in_eval():
    peer = _peer().train()
    tokens = torch.randn(1, 6, TINY["d_model"]) * 3 + 1
    peer(tokens)
    assert peer.query_norm.num_batches_tracked == 1 and not torch.equal(
        peer.query_norm.running_mean, torch.zeros_like(peer.query_norm.running_mean)
    )
    statistics = peer.query_norm.running_mean.clone()
    peer(tokens[:, :1])  # one token has no batch variance: the running statistics answer, and stay as they were
    assert torch.equal(peer.query_norm.running_mean, statistics)
    peer.eval()
    with torch.no_grad():  # in eval a token's output does not depend on the rest of its batch
        torch.testing.assert_close(peer(tokens)[:, 2], peer(tokens[:, 2:3])[:, 0])
    peer.train()
    peer.frozen_statistics = True
    peer(tokens)
    assert torch.equal(peer.query_norm.running_mean, statistics)


def _grown_with_peer() -> WhisperMoEForConditionalGeneration:
    model = _perturbed(tiny_moe())
    grow_peer(model, **SPEC, encoder_layers=[], decoder_layers=[0, 1])
    return model


def _train(model, steps: int = 3, lr: float = 1e-2) -> None:
    frozen = apply_lifelong_mode(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        model(**tiny_batch(seed=step)).loss.backward()
        optimizer.step()
        frozen.restore()
    model.eval()


def test_lifelong_trains_only_the_peer_blocks_and_the_previous_model_is_the_source():
    model = _grown_with_peer()
    batch = tiny_batch(seed=9)
    source_logits = _logits(model, batch)
    old = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    _train(model)
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, old[name])}
    statistics = ("query_norm.running_mean", "query_norm.running_var", "query_norm.num_batches_tracked")
    expected = {f"model.decoder.layers.{i}.peers.0.{name}" for i in (0, 1) for name in PEER_PARAMETERS + statistics}
    assert changed == expected
    assert not torch.equal(_logits(model, batch), source_logits)
    with previous_model(model):
        torch.testing.assert_close(_logits(model, batch), source_logits, atol=0, rtol=0)
    assert all(peer.enabled for peer in model.modules() if isinstance(peer, PEER))  # switched back on


def test_a_second_phase_leaves_the_first_peer_bit_identical():
    model = _grown_with_peer()
    _train(model)
    first_phase = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    batch = tiny_batch(seed=9)
    after_first = _logits(model, batch)
    grow_peer(model, **SPEC, encoder_layers=[1], decoder_layers=[1], seed=1)
    _train(model)
    for name, tensor in first_phase.items():  # parameters and running statistics of phase 0 alike
        assert torch.equal(model.state_dict()[name], tensor), name
    assert {peer.phase for peer in model.model.decoder.layers[1].peers} == {0, 1}
    with previous_model(model):
        torch.testing.assert_close(_logits(model, batch), after_first, atol=0, rtol=0)


def test_experts_and_peer_grown_in_one_phase_train_together():
    model = _perturbed(tiny_moe())
    batch = tiny_batch()
    before = _logits(model, batch)
    grow_experts(model, num_new=2, encoder_layers=[], decoder_layers=[1], peer=SPEC)
    torch.testing.assert_close(_logits(model, batch), before, atol=0, rtol=0)
    assert model.config.expert_groups("decoder", 1) == [(4, 2), (2, 1)]
    old = {name: tensor.detach().clone() for name, tensor in model.named_parameters()}
    _train(model)
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, old[name])}
    experts = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    assert changed == {
        *(f"model.decoder.layers.1.mlp.experts.{name}" for name in experts),
        *(f"model.decoder.layers.1.mlp.router.{name}" for name in ("weight", "null_logits")),
        *(f"model.decoder.layers.1.peers.0.{name}" for name in PEER_PARAMETERS),
    }
    with previous_model(model):
        torch.testing.assert_close(_logits(model, batch), before, atol=0, rtol=0)


def test_lifelong_arguments_grow_peer_and_anchoring_is_skipped(caplog, tmp_path):
    from transformers import Seq2SeqTrainingArguments

    from processing.lifelong import LifelongTrainer

    model = _perturbed(tiny_moe())
    args = LifelongArguments(grow_peer_keys=8, grow_peer_heads=2, grow_peer_experts_per_head=3, grow_peer_key_dim=8,
                             grow_encoder_layers="none", grow_decoder_layers="0")  # fmt: skip
    assert args.grows and args.peer_spec == SPEC
    grow_for_phase(model, args, seed=0)
    assert model.config.expert_growth[-1]["peer"] == SPEC and model.config.expert_growth[-1]["num_experts"] == 0
    apply_lifelong_mode(model)
    model.train()
    batch = tiny_batch()
    outputs = model(**batch)
    losses = lifelong_losses(model, batch, outputs, torch.tensor([1, 1, 0, 0]), args)
    assert set(losses) == {"distill_loss"}  # no router to anchor; the block adds 0 yet, so student == teacher
    assert abs(losses["distill_loss"].item()) < 1e-6
    with caplog.at_level(logging.WARNING, logger="processing.lifelong"):
        training = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
        LifelongTrainer(model=model, args=training, lifelong=args)
    assert "nothing to anchor" in caplog.text


def test_training_modes_count_peer_blocks_as_experts():
    from processing.training import apply_training_mode

    model = _grown_with_peer()
    for mode, trains in (("experts", True), ("attention", False), ("freeze_encoder", True)):
        apply_training_mode(model, mode)
        assert {p.requires_grad for name, p in model.named_parameters() if ".peers." in name} == {trains}, mode


@pytest.mark.parametrize(
    "peer, message",
    [
        ({**SPEC, "num_experts_per_head": 9}, "num_experts_per_head=9 is more than its num_keys=8"),
        ({**SPEC, "key_dim": 7}, "key_dim must be even"),
        ({**SPEC, "num_heads": 0}, "positive integers"),
        ({"num_keys": 8}, "exactly the keys"),
    ],
)
def test_impossible_peer_configs_raise(peer, message):
    phase = {"num_experts": 0, "num_experts_per_tok": 0, "encoder_layers": [], "decoder_layers": [0], "peer": peer}
    with pytest.raises(ValueError, match=message):
        WhisperMoEConfig(**{**TINY, "expert_growth": [phase]})


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"grow_peer_keys": 4, "grow_peer_experts_per_head": 8}, "num_experts_per_head=8 is more than its num_keys=4"),
        ({"grow_peer_keys": 32, "grow_peer_key_dim": 7}, "key_dim must be even"),
        ({"grow_peer_keys": -1}, "grow_peer_keys must be 0"),
    ],
)
def test_impossible_peer_flags_raise_before_any_model_loads(flags, message):
    with pytest.raises(ValueError, match=message):
        LifelongArguments(**flags)


def test_impossible_peer_growth_leaves_the_model_as_it_was():
    with pytest.raises(ValueError, match="both 0 when it adds only a PEER block"):
        WhisperMoEConfig(**{**TINY, "expert_growth": [
            {"num_experts": 0, "num_experts_per_tok": 1, "encoder_layers": [], "decoder_layers": [0], "peer": SPEC}
        ]})  # fmt: skip
    with pytest.raises(ValueError, match="num_experts >= 1"):  # no PEER entry: a phase must grow experts
        WhisperMoEConfig(**{**TINY, "expert_growth": [
            {"num_experts": 0, "num_experts_per_tok": 0, "encoder_layers": [], "decoder_layers": [0]}
        ]})  # fmt: skip
    model = tiny_moe()
    with pytest.raises(ValueError, match="num_keys=2"):
        model.add_peer(num_keys=2, num_experts_per_head=4)
    with pytest.raises(ValueError, match="nothing to grow"):
        grow_experts(model, num_new=0)
    with pytest.raises(ValueError, match="decoder layers \\[7\\]"):
        grow_peer(model, **SPEC, decoder_layers=[7])
    assert model.config.expert_growth is None
    assert not any(isinstance(module, PEER) for module in model.modules())


# Runs where the package cannot be imported (see conftest.run_without_package): only the folder's code can answer.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForSpeechSeq2Seq

    batch = torch.load(sys.argv[1])
    result = {}
    for folder in sys.argv[2:]:
        model, info = AutoModelForSpeechSeq2Seq.from_pretrained(folder, trust_remote_code=True,
                                                                output_loading_info=True)
        with torch.no_grad():
            torch.save(model.eval()(**batch).logits, folder + "/remote_logits.pt")
        result[folder] = {"module": type(model).__module__, "missing": sorted(info["missing_keys"]),
                          "unexpected": sorted(info["unexpected_keys"]),
                          "peers": sorted({type(m).__module__ for m in model.modules() if type(m).__name__ == "PEER"})}
    """
)


def test_saved_folders_reload_without_the_package(tmp_path):
    model = _perturbed(tiny_moe())
    batch = tiny_batch()
    source_logits = _logits(model, batch)
    grow_peer(model, **SPEC, decoder_layers=[0, 1])
    model.save_pretrained(tmp_path / "step0")
    _perturbed(model, fragment=".peers.", seed=2)  # as after training: the up vectors are no longer zero
    model.train()
    model(**batch)  # and the query statistics are no longer their initial ones
    model.eval()
    trained_logits = _logits(model, batch)
    model.save_pretrained(tmp_path / "trained")
    assert (tmp_path / "trained" / "peer.py").is_file()
    torch.save(batch, tmp_path / "batch.pt")
    folders = [str(tmp_path / "step0"), str(tmp_path / "trained")]
    remote = run_without_package(RELOAD_SCRIPT, tmp_path / "batch.pt", *folders, tmp_path=tmp_path)
    assert remote.pop("leaked") == []
    for folder, expected in zip(folders, (source_logits, trained_logits)):
        assert remote[folder]["missing"] == [] and remote[folder]["unexpected"] == []
        assert remote[folder]["peers"] and remote[folder]["peers"][0].startswith("transformers_modules")
        # another process may split the matmuls over a different number of threads: float32 round-off, not exact
        torch.testing.assert_close(torch.load(f"{folder}/remote_logits.pt"), expected)


@pytest.mark.slow
def test_peer_grown_into_real_tiny_en_keeps_its_transcript(tiny_en_moe):
    model = WhisperMoEForConditionalGeneration.from_pretrained(tiny_en_moe).eval()
    processor = WhisperMoEProcessor.from_pretrained(tiny_en_moe)
    features = processor(load_audio(REPO_ROOT / "examples" / "jfk.flac"), return_tensors="pt").input_features
    prompt = torch.tensor([[model.generation_config.decoder_start_token_id, 50362, 400, 523]])
    with torch.no_grad():
        logits, ids = model(features, decoder_input_ids=prompt).logits, model.generate(features)
        model.add_peer(num_keys=128, num_heads=4, num_experts_per_head=16, key_dim=128, encoder_layers=[])
        assert sum(len(layer.peers) for layer in model.model.decoder.layers) == model.config.decoder_layers
        torch.testing.assert_close(model(features, decoder_input_ids=prompt).logits, logits, atol=0, rtol=0)
        assert processor.batch_decode(model.generate(features)) == processor.batch_decode(ids)
