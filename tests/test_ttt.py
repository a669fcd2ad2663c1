"""TTT-Linear and TTT-MLP (modeling_whisper_moe/ttt.py) against an independent reading of the reference.

The oracle below is the paper's primal form as written, token by token, with the inner gradients taken by autograd
rather than by the closed forms the layer uses, and RoPE by complex rotation: it shares no code with ttt.py. (The
layer was also checked against test-time-training/ttt-lm-pytorch itself, outside this repository: docs/RESULTS.md.)
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, run_without_package, tiny_batch, tiny_moe, tiny_moe_config

from modeling_whisper_moe import WhisperMoEForConditionalGeneration
from modeling_whisper_moe.ttt import TTT_CACHE_ATTRIBUTE, TTTMLP, TTTLinear

HIDDEN, HEADS, MINI_BATCH = 32, 4, 8
REFERENCE_NAMES = {
    "q_proj.weight": (HIDDEN, HIDDEN),
    "k_proj.weight": (HIDDEN, HIDDEN),
    "v_proj.weight": (HIDDEN, HIDDEN),
    "o_proj.weight": (HIDDEN, HIDDEN),
    "learnable_ttt_lr_weight": (HEADS, 1, HIDDEN),
    "learnable_ttt_lr_bias": (HEADS, 1),
    "learnable_token_idx": (MINI_BATCH,),
    "ttt_norm_weight": (HEADS, HIDDEN // HEADS),
    "ttt_norm_bias": (HEADS, HIDDEN // HEADS),
    "post_norm.weight": (HIDDEN,),
    "post_norm.bias": (HIDDEN,),
}
HEAD = HIDDEN // HEADS
INNER_SHAPES = {
    "linear": {"W1": (HEADS, HEAD, HEAD), "b1": (HEADS, 1, HEAD)},
    "mlp": {
        "W1": (HEADS, HEAD, 4 * HEAD),
        "b1": (HEADS, 1, 4 * HEAD),
        "W2": (HEADS, 4 * HEAD, HEAD),
        "b2": (HEADS, 1, HEAD),
    },
}
CLASSES = {"linear": TTTLinear, "mlp": TTTMLP}


def _layer(kind: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A layer whose every parameter is moved off its initial value (learnt token scales, norms, biases)."""
    torch.manual_seed(seed)
    layer = CLASSES[kind](HIDDEN, HEADS, MINI_BATCH, **kwargs).double()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return layer


def _rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE as complex multiplication of channel pairs (2i, 2i + 1) by exp(i * position * 10000^(-2i/d))."""
    freqs = 10000.0 ** (-torch.arange(0, x.shape[-1], 2, dtype=torch.float64) / x.shape[-1])
    turn = torch.polar(torch.ones(len(positions), len(freqs), dtype=torch.float64), positions[:, None] * freqs)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * turn).flatten(-2)


def _inner(kind: str, params: dict, x: torch.Tensor) -> torch.Tensor:
    if kind == "linear":
        return x @ params["W1"] + params["b1"]
    return F.gelu(x @ params["W1"] + params["b1"], approximate="tanh") @ params["W2"] + params["b2"]


def _norm(layer, z: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(z, z.shape[-1:], eps=1e-6) * layer.ttt_norm_weight[:, None] + layer.ttt_norm_bias[:, None]


def _oracle_pass(layer, kind: str, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """One pass of the layer over x (batch, L, hidden), token by token, before any gate."""
    batch, length, _ = x.shape
    positions = (torch.arange(length) % MINI_BATCH).double()
    heads = lambda t: t.reshape(batch, length, HEADS, HEAD).transpose(1, 2)  # noqa: E731
    q = _rope(heads(layer.q_proj(x)), positions)
    k = _rope(heads(layer.k_proj(x)), positions)
    target = heads(layer.v_proj(x)) - k
    rate = torch.sigmoid(
        torch.einsum("blc,hc->bhl", x, layer.learnable_ttt_lr_weight[:, 0]) + layer.learnable_ttt_lr_bias
    )
    rate = layer.ttt_base_lr * rate / HEAD
    params = {name: getattr(layer, name).expand(batch, -1, -1, -1) for name in INNER_SHAPES[kind]}
    outputs = []
    for start in range(0, length, MINI_BATCH):
        stop = min(start + MINI_BATCH, length)
        grads = []  # per token j: d l_j / d params at the mini-batch's starting weights
        for j in range(start, stop):
            loss = (
                0.5 * (_norm(layer, _inner(kind, params, k[:, :, j : j + 1])) - target[:, :, j : j + 1]).pow(2).sum()
            )
            grads.append(torch.autograd.grad(loss, list(params.values()), create_graph=True))
        for i in range(start, stop):
            if causal:
                scale = (1.0 / (i - start + 1) + layer.learnable_token_idx[i - start]).clamp(min=0)
                seen = range(start, i + 1)
            else:
                scale, seen = 1.0 / (stop - start), range(start, stop)
            weights = {
                name: value - scale * sum(rate[:, :, j, None, None] * grads[j - start][n] for j in seen)
                for n, (name, value) in enumerate(params.items())
            }
            outputs.append(q[:, :, i : i + 1] + _norm(layer, _inner(kind, weights, q[:, :, i : i + 1])))
        params = weights
    output = torch.cat(outputs, dim=2).transpose(1, 2).reshape(batch, length, HIDDEN)
    return layer.o_proj(layer.post_norm(output))


def _oracle(layer, kind: str, x: torch.Tensor) -> torch.Tensor:
    if layer.causal:
        return _oracle_pass(layer, kind, x, causal=True)
    forward = torch.tanh(layer.forward_gate) * _oracle_pass(layer, kind, x, causal=False)
    backward = _oracle_pass(layer, kind, (x + forward).flip(1), causal=False).flip(1)
    return forward + torch.tanh(layer.backward_gate) * backward


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_state_dict_has_the_reference_names_and_shapes(kind):
    layer = CLASSES[kind](HIDDEN, HEADS, MINI_BATCH)
    shapes = {name: tuple(tensor.shape) for name, tensor in layer.state_dict().items()}
    assert shapes == {**REFERENCE_NAMES, **INNER_SHAPES[kind]}
    assert layer.ttt_base_lr == {"linear": 1.0, "mlp": 0.1}[kind]  # the reference's base rates


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("length", [MINI_BATCH, 2 * MINI_BATCH + 5, 3])  # whole mini-batches, a remainder, only one
@pytest.mark.parametrize("causal", [True, False])
def test_output_and_gradients_equal_the_token_by_token_oracle(kind, length, causal):
    layer = _layer(kind, causal=causal)
    x = torch.randn(2, length, HIDDEN, dtype=torch.float64)
    ours, expected = layer(x), _oracle(layer, kind, x)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
    weights = torch.randn_like(ours)
    # a bidirectional layer never reads learnable_token_idx: both must agree that it gets no gradient
    ours_grads = torch.autograd.grad((ours * weights).sum(), list(layer.parameters()), allow_unused=True)
    oracle_grads = torch.autograd.grad((expected * weights).sum(), list(layer.parameters()), allow_unused=True)
    for (name, _), mine, theirs in zip(layer.named_parameters(), ours_grads, oracle_grads):
        assert (mine is None) == (theirs is None) == (name == "learnable_token_idx" and not causal), name
        if mine is not None:
            torch.testing.assert_close(mine, theirs, rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_reading_in_pieces_with_a_state_equals_reading_at_once(kind):
    layer = _layer(kind)
    x = torch.randn(3, 29, HIDDEN, dtype=torch.float64)
    state = layer.initial_state(3)
    pieces, start = [], 0
    for size in (4, 1, 1, 10, 1, 12):  # a prompt, single tokens, pieces across mini-batch boundaries
        pieces.append(layer(x[:, start : start + size], state))
        start += size
    assert state.seen == 29
    torch.testing.assert_close(torch.cat(pieces, dim=1), layer(x), rtol=1e-10, atol=1e-10)


def test_a_state_follows_its_rows_when_beams_are_reordered():
    layer = _layer("linear")
    x = torch.randn(3, 11, HIDDEN, dtype=torch.float64)
    state = layer.initial_state(3)
    layer(x[:, :10], state)
    order = torch.tensor([2, 2, 0])
    step = layer(x[order, 10:], state.select(order))
    torch.testing.assert_close(step, layer(x[order])[:, 10:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_zero_gates_add_exactly_nothing(kind):
    x = torch.randn(2, 20, HIDDEN)
    for layer in (CLASSES[kind](HIDDEN, HEADS, MINI_BATCH, causal=False, gate_init=0.0),
                  CLASSES[kind](HIDDEN, HEADS, MINI_BATCH, gate_init=0.0)):  # fmt: skip
        assert torch.equal(layer(x), torch.zeros_like(x))
        # the gates still learn: their gradient is the ungated output, not zero
        (layer(x) * torch.randn_like(x)).sum().backward()
        gates = [p for n, p in layer.named_parameters() if "gate" in n and "lr" not in n]
        assert gates and all(gate.grad.abs().sum() > 0 for gate in gates)


def test_impossible_shapes_and_stateful_bidirectional_calls_are_refused():
    with pytest.raises(ValueError, match="num_heads=5"):
        TTTLinear(32, 5)
    with pytest.raises(ValueError, match="even"):
        TTTLinear(12, 4)  # head width 3
    with pytest.raises(ValueError, match="mini_batch_size=0"):
        TTTMLP(32, 4, mini_batch_size=0)
    layer = TTTLinear(HIDDEN, HEADS, causal=False)
    with pytest.raises(ValueError, match="bidirectional"):
        layer(torch.randn(1, 4, HIDDEN), layer.initial_state(1))


# ---------------------------------------------------------------------------------------------------------------------
# In the model
# ---------------------------------------------------------------------------------------------------------------------


def _open_gates(model: torch.nn.Module, value: float = 0.5) -> None:
    """What training does first: the closed gates open, so the TTT sub-layers change the outputs."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate"):
                parameter.fill_(value)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_adding_ttt_keeps_every_output_and_the_folder_reloads_it(kind, tmp_path):
    model = tiny_moe()
    batch = tiny_batch()
    with torch.no_grad():
        before = model(**batch).logits
    model.add_ttt(ttt_type=kind, mini_batch_size=4)
    assert model.config.encoder_ttt_layers == [0, 1] and model.config.decoder_ttt_layers == [0, 1]
    assert {type(layer.ttt).__name__ for layer in model.model.encoder.layers} == {type(_layer(kind)).__name__}
    assert [layer.ttt.causal for layer in model.model.decoder.layers] == [True, True]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    _open_gates(model)
    model.save_pretrained(tmp_path)
    reloaded, info = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, model(**batch).logits)
        assert not torch.allclose(model(**batch).logits, before)  # open gates do change the outputs


def test_a_fresh_model_with_ttt_starts_with_closed_gates_and_they_learn():
    model = tiny_moe(encoder_ttt_layers=[1], decoder_ttt_layers=[0], ttt_type="linear", ttt_mini_batch_size=4).train()
    gates = {name: parameter for name, parameter in model.named_parameters() if name.endswith("gate")}
    assert sorted(gates) == [
        "model.decoder.layers.0.ttt.gate",
        "model.encoder.layers.1.ttt.backward_gate",
        "model.encoder.layers.1.ttt.forward_gate",
    ]
    assert all(torch.equal(gate, torch.zeros_like(gate)) for gate in gates.values())
    model(**tiny_batch()).loss.backward()
    assert all(gate.grad.abs().sum() > 0 for gate in gates.values())


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generation_equals_recomputing_the_prefix(num_beams):
    model = tiny_moe(max_target_positions=40)
    model.add_ttt(ttt_type="mlp", mini_batch_size=4)
    _open_gates(model, 2.0)
    features = tiny_batch(batch=2)["input_features"]
    options = dict(max_new_tokens=25, min_new_tokens=25, num_beams=num_beams, do_sample=False)
    with torch.no_grad():
        cached = model.generate(features, use_cache=True, **options)
        recomputed = model.generate(features, use_cache=False, **options)
    assert cached.shape[-1] >= 25
    assert torch.equal(cached, recomputed)


def test_a_cache_the_ttt_layer_did_not_read_is_refused():
    from transformers import DynamicCache, EncoderDecoderCache

    model = tiny_moe(decoder_ttt_layers=[0, 1], ttt_mini_batch_size=4)
    features = tiny_batch(batch=1)["input_features"]
    ids = torch.tensor([[TINY["decoder_start_token_id"], 5, 6, 7]])
    cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
    with torch.no_grad():
        model(input_features=features, decoder_input_ids=ids, cache=cache, use_cache=True)
        assert [state.seen for state in getattr(cache, TTT_CACHE_ATTRIBUTE).values()] == [4, 4]
        cache.crop(-2)  # what assisted decoding does after rejected draft tokens
        with pytest.raises(ValueError, match="cannot rewind"):
            model(input_features=features, decoder_input_ids=ids[:, 2:3], cache=cache, use_cache=True)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"ttt_type": "conv"}, "ttt_type"),
        ({"encoder_ttt_layers": [2]}, "encoder_ttt_layers names layers \\[2\\]"),
        ({"decoder_ttt_layers": [0], "ttt_mini_batch_size": 0}, "ttt_mini_batch_size"),
        ({"decoder_ttt_layers": [0], "ttt_base_lr": -1.0}, "ttt_base_lr"),
        ({"decoder_ttt_layers": [0], "ttt_num_heads": 3}, "even width"),
        ({"encoder_ttt_layers": [0], "variable_length_audio": True}, "packed rows"),
    ],
)
def test_impossible_ttt_configs_raise(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_moe_config(**fields)


def test_adding_ttt_with_other_settings_than_the_models_is_refused():
    model = tiny_moe()
    model.add_ttt(encoder_layers=[0], decoder_layers=[], ttt_type="linear", mini_batch_size=4)
    with pytest.raises(ValueError, match="ttt_type"):
        model.add_ttt(decoder_layers=[1], ttt_type="mlp", mini_batch_size=4)
    with pytest.raises(ValueError, match="encoder_ttt_layers names layers \\[5\\]"):
        model.add_ttt(encoder_layers=[5], ttt_type="linear", mini_batch_size=4)
    assert model.config.encoder_ttt_layers == [0] and model.config.decoder_ttt_layers == []
    model.add_ttt(encoder_layers=[], decoder_layers=[1], ttt_type="linear", mini_batch_size=4)
    assert model.config.decoder_ttt_layers == [1] and model.model.decoder.layers[1].ttt is not None


# 16 kHz mono arrays, not paths: transformers' own pipeline (the dense source's) needs ffmpeg to read a file
TTT_REMOTE_SCRIPT = """
import soundfile
from transformers import pipeline

data, folders = sys.argv[1], sys.argv[2:]
clips = [data + "/librispeech/test-other/1688/142285/1688-142285-0001.flac"]
audio = [dict(zip(("raw", "sampling_rate"), soundfile.read(clip, dtype="float32"))) for clip in clips]
result = {}
for folder in folders:
    asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
    kinds = sorted({type(m).__name__ for m in asr.model.modules() if type(m).__name__.startswith("TTT")})
    result[folder] = {"texts": [asr(dict(clip))["text"] for clip in audio], "module": type(asr.model).__module__,
                      "ttt": kinds}
"""


@pytest.mark.slow
def test_add_ttt_cli_keeps_real_transcripts_through_the_remote_pipeline(
    tiny_en_dense, tiny_en_moe, data_dir, tmp_path
):  # noqa: E501
    """`whisper-moe add-ttt` in every layer of real tiny.en, converted (dense) and upcycled 8x2: the new folders
    transcribe real speech exactly as their sources, from the folder's code alone."""
    from processing.cli import main as cli

    pairs = []
    for source, kind in ((tiny_en_dense, "linear"), (tiny_en_moe, "mlp")):
        with_ttt = tmp_path / f"{source.name}-ttt"
        assert cli(["add-ttt", str(source), str(with_ttt), "--type", kind]) == 0
        pairs.append((source, with_ttt))
    assert cli(["add-ttt", str(tiny_en_moe), str(tmp_path / "bad"), "--num-heads", "5"]) == 1
    assert not (tmp_path / "bad").exists()
    folders = [str(folder) for pair in pairs for folder in pair]
    remote = run_without_package(TTT_REMOTE_SCRIPT, data_dir, *folders, tmp_path=tmp_path)
    assert remote["leaked"] == []
    for (source, with_ttt), kind in zip(pairs, ("TTTLinear", "TTTMLP")):
        assert remote[str(with_ttt)]["texts"] == remote[str(source)]["texts"]
        assert remote[str(with_ttt)]["module"].startswith("transformers_modules")
        assert remote[str(with_ttt)]["ttt"] == [kind] and remote[str(source)]["ttt"] == []
    assert "Margaret said Mr. Hale" in remote[str(pairs[0][0])]["texts"][0]
