"""Echo's elements (modeling_whisper_moe/echo.py) as config switches: each builds, changes the outputs (or starts as
the identity and changes them once its zero-initialised parameters move), keeps the decoder causal, generates the
same with and without the cache, and round-trips through a saved folder loaded where the package is not importable.
"""

import warnings

import pytest
import torch
from conftest import TINY, run_without_package, tiny_dense_config, tiny_moe, tiny_moe_config
from transformers import DynamicCache, EncoderDecoderCache, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import sinusoids

from modeling_whisper_moe import WhisperMoEForConditionalGeneration
from modeling_whisper_moe.echo import ECHO_MODULES, EchoSelfAttention, RotaryEmbedding
from processing.training import apply_training_mode

LONG = dict(max_source_positions=40, max_target_positions=48)  # sequences longer than the window of 16 below
FRAMES = 2 * LONG["max_source_positions"]
TOKENS = 30  # decoder positions in a forward pass
SETTINGS = {
    "rotary": {"position_embedding_type": "rotary"},
    "rotary_givens": {"position_embedding_type": "rotary_givens"},
    "learned_sinusoidal": {"position_embedding_type": "learned_sinusoidal"},
    "dynamic_position_bias": {"dynamic_position_bias": True},
    "local_window": {"local_attention_window": 16, "global_tokens": 4},
    "conv_module": {"conv_module": True},
}
IDENTITY_AT_INIT = {"dynamic_position_bias", "conv_module"}  # zero-initialised outputs


def _inputs(batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, TINY["num_mel_bins"], FRAMES, generator=generator)
    ids = torch.randint(4, TINY["vocab_size"], (batch, TOKENS), generator=generator)
    ids[:, 0] = TINY["decoder_start_token_id"]
    return {"input_features": features, "decoder_input_ids": ids}


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _echo_parameters(model) -> dict[str, torch.nn.Parameter]:
    prefixes = [name for name, module in model.named_modules() if isinstance(module, ECHO_MODULES)]
    return {name: p for name, p in model.named_parameters() if any(name.startswith(f"{x}.") for x in prefixes)}


def _echo_parts(module) -> list[str]:
    """Names of the Echo modules (and Echo self-attentions) inside `module`."""
    return [name for name, part in module.named_modules() if isinstance(part, (*ECHO_MODULES, EchoSelfAttention))]


def _with_weights_of(baseline, **fields) -> WhisperMoEForConditionalGeneration:
    """A model with `fields` whose every other parameter is `baseline`'s; its Echo parameters keep their init."""
    model = tiny_moe(seed=1, **LONG, **fields)
    missing, unexpected = model.load_state_dict(baseline.state_dict(), strict=False)
    assert set(missing) <= set(_echo_parameters(model))  # a learned_sinusoidal table loads Whisper's
    assert set(unexpected) <= {"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"}
    return model


def _perturb(model, scale: float = 0.5, seed: int = 0) -> None:
    """What training does first: the Echo parameters move off their initial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in _echo_parameters(model).values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def _trained(setting: str) -> WhisperMoEForConditionalGeneration:
    model = tiny_moe(seed=2, **LONG, **SETTINGS[setting])
    _perturb(model)
    return model


@pytest.fixture(scope="module")
def baseline():
    """A tiny model whose encoder positions are Whisper's sinusoids, as in every pretrained Whisper. (A fresh
    WhisperMoE's are random: transformers skips `_init_weights` of a custom-code module without parameters of its
    own, such as the encoder, so WhisperPreTrainedModel's copy of the sinusoids never runs.)"""
    model = tiny_moe(**LONG)
    with torch.no_grad():
        model.model.encoder.embed_positions.weight.copy_(sinusoids(LONG["max_source_positions"], TINY["d_model"]))
    return model


@pytest.mark.parametrize("setting", SETTINGS)
def test_each_setting_changes_the_outputs_or_starts_as_the_identity(setting, baseline):
    inputs = _inputs()
    before = _logits(baseline, inputs)
    model = _with_weights_of(baseline, **SETTINGS[setting])
    if setting in IDENTITY_AT_INIT:
        torch.testing.assert_close(_logits(model, inputs), before, rtol=1e-5, atol=1e-5)
        _perturb(model)
    assert (_logits(model, inputs) - before).abs().max() > 1e-3


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_decoder_stays_causal(setting):
    model = _trained(setting)
    inputs = _inputs(batch=1)
    reference = _logits(model, inputs)
    for t in (0, 12, 20, TOKENS - 2):  # inside the window, past it, and the last position
        changed = {**inputs, "decoder_input_ids": inputs["decoder_input_ids"].clone()}
        changed["decoder_input_ids"][0, t + 1] = (changed["decoder_input_ids"][0, t + 1] + 1) % TINY["vocab_size"]
        logits = _logits(model, changed)
        torch.testing.assert_close(logits[:, : t + 1], reference[:, : t + 1], rtol=0, atol=1e-6)
        assert (logits[:, t + 1] - reference[:, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "setting, num_beams", [(setting, 1) for setting in SETTINGS] + [("conv_module", 3), ("local_window", 3)]
)
def test_cached_generation_equals_uncached(setting, num_beams):
    model = _trained(setting)
    features = _inputs()["input_features"]
    options = dict(max_new_tokens=24, min_new_tokens=24, num_beams=num_beams, do_sample=False)
    options.update(output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(features, use_cache=True, **options)
        uncached = model.generate(features, use_cache=False, **options)
    assert cached.sequences.shape[-1] >= 24  # past the window of 16 and its 4 global tokens
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-4, atol=1e-4)


def test_the_convolution_continues_a_cropped_cache():
    """Assisted decoding crops rejected draft tokens off the cache; the convolution inputs it keeps follow."""
    model = _trained("conv_module")
    inputs = _inputs(batch=1)
    ids = inputs["decoder_input_ids"][:, :12]
    full = _logits(model, {**inputs, "decoder_input_ids": ids})
    cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
    with torch.no_grad():
        model(**{**inputs, "decoder_input_ids": ids}, cache=cache, use_cache=True)
        cache.crop(-4)
        resumed = model(**{**inputs, "decoder_input_ids": ids[:, 8:]}, cache=cache, use_cache=True).logits
    torch.testing.assert_close(resumed, full[:, 8:], rtol=1e-5, atol=1e-5)


REMOTE_SCRIPT = """
import torch
from transformers import AutoModelForSpeechSeq2Seq

inputs, folders = torch.load(sys.argv[1]), sys.argv[2:]
result = {}
for folder in folders:
    model = AutoModelForSpeechSeq2Seq.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        result[folder] = {"logits": model(**inputs).logits.tolist(), "module": type(model).__module__}
"""


def test_every_setting_round_trips_through_a_folder_loaded_without_the_package(tmp_path):
    inputs = _inputs()
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = {}
    for setting in SETTINGS:
        model = _trained(setting)
        model.save_pretrained(tmp_path / setting)
        expected[str(tmp_path / setting)] = _logits(model, inputs)
    remote = run_without_package(REMOTE_SCRIPT, tmp_path / "inputs.pt", *expected, tmp_path=tmp_path)
    assert remote["leaked"] == []
    for folder, logits in expected.items():
        assert remote[folder]["module"].startswith("transformers_modules")
        torch.testing.assert_close(torch.tensor(remote[folder]["logits"]), logits, rtol=1e-5, atol=1e-5)


def test_rotary_givens_starts_as_rotary_and_its_mixing_stays_orthogonal(baseline):
    inputs = _inputs()
    rotary = _with_weights_of(baseline, position_embedding_type="rotary")
    givens = _with_weights_of(baseline, position_embedding_type="rotary_givens")
    assert torch.equal(_logits(givens, inputs), _logits(rotary, inputs))
    _perturb(givens)
    assert (_logits(givens, inputs) - _logits(rotary, inputs)).abs().max() > 1e-3
    mixing = givens.model.decoder.layers[0].self_attn.rotary.mixing()
    eye = torch.eye(mixing.shape[-1]).expand_as(mixing)
    torch.testing.assert_close(mixing @ mixing.transpose(-1, -2), eye, rtol=0, atol=1e-5)
    assert (mixing - eye).abs().max() > 0.1


def test_rotary_mixing_after_rope_would_cancel_in_the_logits():
    """Why rotary_givens mixes before RoPE: the same orthogonal map on queries and keys after it changes no logit."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(num_heads=2, head_dim=8, theta=10000.0, givens=True)
    rope.init_weights()
    with torch.no_grad():
        rope.givens_angles.normal_()
        rope.rotation_generator.normal_()
    query, key, positions = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.arange(5)
    plain = RotaryEmbedding(2, 8, 10000.0, givens=False)
    q, k = plain(query, key, positions)
    mixing = rope.mixing()
    after = (q @ mixing) @ (k @ mixing).transpose(-1, -2)
    torch.testing.assert_close(after, q @ k.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    q_mixed, k_mixed = rope(query, key, positions)
    assert (q_mixed @ k_mixed.transpose(-1, -2) - q @ k.transpose(-1, -2)).abs().max() > 1e-2


def test_a_window_covering_the_sequence_is_full_attention(baseline):
    inputs = _inputs()
    model = _with_weights_of(baseline, local_attention_window=LONG["max_target_positions"])
    torch.testing.assert_close(_logits(model, inputs), _logits(baseline, inputs), rtol=1e-5, atol=1e-5)


def test_the_encoder_attends_within_the_window_and_to_the_global_tokens():
    window, global_tokens = SETTINGS["local_window"]["local_attention_window"], 4
    model = _trained("local_window")
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = model.model.encoder(_inputs()["input_features"], output_attentions=True).attentions
    positions = torch.arange(LONG["max_source_positions"])
    near = (positions[:, None] - positions[None, :]).abs() < window
    allowed = near | (positions[:, None] < global_tokens) | (positions[None, :] < global_tokens)
    for layer in attentions:  # (batch, heads, 40, 40)
        assert torch.all(layer[..., ~allowed] == 0)
        assert torch.all(layer[..., allowed] > 0)


def test_eager_and_sdpa_agree_on_bias_and_window():
    model = tiny_moe(seed=2, **LONG, dynamic_position_bias=True, local_attention_window=16, global_tokens=4)
    _perturb(model)
    inputs = _inputs()
    sdpa = _logits(model, inputs)
    model.config._attn_implementation = "eager"
    torch.testing.assert_close(_logits(model, inputs), sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["encoder", "decoder"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_each_setting_works_on_one_side_alone(setting, side, baseline):
    fields = {name: {side: value} for name, value in SETTINGS[setting].items()}
    model = _with_weights_of(baseline, **fields)
    other = "decoder" if side == "encoder" else "encoder"
    assert _echo_parts(getattr(model.model, side)) and not _echo_parts(getattr(model.model, other))
    inputs = _inputs()
    _perturb(model)
    if side == "encoder":  # what the encoder hands the cross-attentions
        with torch.no_grad():
            before = baseline.model.encoder(inputs["input_features"]).last_hidden_state
            after = model.model.encoder(inputs["input_features"]).last_hidden_state
    else:
        before, after = _logits(baseline, inputs), _logits(model, inputs)
    assert (after - before).abs().max() > 1e-3


def test_a_given_mask_decides_whether_the_decoders_self_attention_is_causal():
    """Whisper's decoder passes its causal mask (or none, for sdpa to apply its causal flag); the mel decoder of the
    text-to-speech model passes a mask that hides only padding, and must see every frame."""
    model = _trained("dynamic_position_bias")
    attention = model.model.decoder.layers[0].self_attn
    hidden = torch.randn(1, 6, TINY["d_model"])
    changed = hidden.clone()
    changed[0, -1] += 1.0
    full_view = torch.zeros(1, 1, 6, 6)
    with torch.no_grad():
        causal, causal_changed = attention(hidden)[0], attention(changed)[0]
        full, full_changed = (
            attention(hidden, attention_mask=full_view)[0],
            attention(changed, attention_mask=full_view)[0],
        )
    torch.testing.assert_close(causal_changed[:, :-1], causal[:, :-1], rtol=0, atol=1e-6)
    assert (full_changed[:, 0] - full[:, 0]).abs().max() > 1e-4


def test_bias_and_window_refuse_an_attention_that_cannot_add_them():
    model = tiny_moe(**LONG, dynamic_position_bias=True)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="need attn_implementation in .*'sdpa'.* not 'flash_attention_2'"):
        _logits(model, _inputs())


def test_elements_apply_to_the_side_a_dict_names():
    model = tiny_moe(**LONG, position_embedding_type={"decoder": "rotary"}, conv_module={"encoder": True})
    encoder, decoder = model.model.encoder, model.model.decoder
    assert type(encoder.embed_positions).__name__ == "EncoderSinusoids"  # Whisper's table
    assert type(decoder.embed_positions).__name__ == "NoPositionalEmbedding"
    assert type(encoder.layers[0].self_attn).__name__ == "WhisperAttention"
    assert decoder.layers[0].self_attn.rotary is not None
    assert encoder.layers[0].conv_module is not None and decoder.layers[0].conv_module is None


def test_from_dense_keeps_the_exact_elements_exact_and_warns_about_the_others():
    torch.manual_seed(0)
    dense = WhisperForConditionalGeneration(tiny_dense_config(**LONG)).eval()
    inputs = _inputs()
    exact = dict(
        conv_module=True, dynamic_position_bias=True, position_embedding_type={"encoder": "learned_sinusoidal"}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        upcycled = WhisperMoEForConditionalGeneration.from_dense(dense, num_experts=4, **exact).eval()
    assert not [w for w in caught if "from_dense" in str(w.message)]
    assert _echo_parameters(upcycled)  # the elements are there
    torch.testing.assert_close(_logits(upcycled, inputs), _logits(dense, inputs), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="decoder position_embedding_type='rotary'.*local_attention_window=16"):
        changed = WhisperMoEForConditionalGeneration.from_dense(
            dense, num_experts=4, position_embedding_type={"decoder": "rotary"}, local_attention_window=16
        )
    assert (_logits(changed.eval(), inputs) - _logits(dense, inputs)).abs().max() > 1e-3


def test_exact_elements_added_to_a_saved_folder_keep_its_outputs(baseline, tmp_path):
    baseline.save_pretrained(tmp_path)
    fields = dict(
        conv_module=True, dynamic_position_bias=True, position_embedding_type={"encoder": "learned_sinusoidal"}
    )
    model = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path, **fields).eval()
    assert model.config.conv_module is True and _echo_parameters(model)
    inputs = _inputs()
    torch.testing.assert_close(_logits(model, inputs), _logits(baseline, inputs), rtol=1e-5, atol=1e-5)


def test_a_learned_sinusoid_table_trains_and_whispers_stays_fixed(baseline):
    model = apply_training_mode(tiny_moe(**LONG, position_embedding_type="learned_sinusoidal"), "full")
    assert model.model.encoder.embed_positions.weight.requires_grad
    assert not apply_training_mode(baseline, "full").model.encoder.embed_positions.weight.requires_grad


def test_a_text_frontend_is_not_added_to_a_rotary_encoder():
    with pytest.raises(ValueError, match="rotary encoder"):
        tiny_moe(position_embedding_type="rotary").add_text_frontend()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"position_embedding_type": "alibi"}, "position_embedding_type must be one of .* got 'alibi'"),
        ({"position_embedding_type": {"middle": "rotary"}}, "keys among"),
        ({"position_embedding_type": "rotary", "d_model": 12, "encoder_attention_heads": 4}, "even width"),
        (
            {"local_attention_window": 4, "global_tokens": 5},
            "global_tokens=5 must be at most local_attention_window=4",
        ),
        ({"global_tokens": 2}, "global_tokens=2 needs a local_attention_window"),
        ({"local_attention_window": 0}, "local_attention_window must be a positive integer or None, got 0"),
        ({"dynamic_position_bias": {"decoder": 1}}, "decoder dynamic_position_bias must be True or False"),
        ({"dynamic_position_bias_log_base": 1.0}, "dynamic_position_bias_log_base must be above 1"),
        ({"conv_module": True, "conv_kernel_size": 4}, "conv_kernel_size must be odd"),
        ({"conv_module": {"decoder": True}, "conv_kernel_size": 0}, "conv_kernel_size must be at least 1, got 0"),
        ({"conv_module": True, "variable_length_audio": True}, "variable_length_audio"),
        ({"local_attention_window": 8, "global_tokens": 2, "variable_length_audio": True}, "packed"),
        ({"rotary_theta": 0}, "rotary_theta must be positive"),
    ],
)
def test_impossible_echo_configs_raise(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_moe_config(**fields)


def test_exact_elements_on_real_tiny_en_keep_its_transcript_of_a_real_clip(tiny_en_dense, data_dir):
    """Real weights, real speech: tiny.en upcycled with every element that claims to start as the identity (on
    both sides where it can) transcribes the JFK clip exactly as the dense model, with the scores of the same
    upcycling without them."""
    from transformers import WhisperProcessor

    from modeling_whisper_moe import load_audio

    processor = WhisperProcessor.from_pretrained(tiny_en_dense)
    rate = processor.feature_extractor.sampling_rate
    features = processor(load_audio(data_dir / "misc" / "jfk.flac", rate), sampling_rate=rate, return_tensors="pt")
    dense = WhisperForConditionalGeneration.from_pretrained(tiny_en_dense).eval()
    plain = WhisperMoEForConditionalGeneration.from_dense(tiny_en_dense, num_experts=4).eval()
    exact = dict(
        conv_module=True, dynamic_position_bias=True, position_embedding_type={"encoder": "learned_sinusoidal"}
    )
    echo = WhisperMoEForConditionalGeneration.from_dense(tiny_en_dense, num_experts=4, **exact).eval()
    assert _echo_parts(echo.model.encoder) and _echo_parts(echo.model.decoder)
    options = dict(max_new_tokens=40, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected, upcycled, got = (
            model.generate(features.input_features, **options) for model in (dense, plain, echo)
        )
    assert "ask not what your country can do for you" in processor.batch_decode(got.sequences)[0]
    assert torch.equal(got.sequences, expected.sequences)
    # the learned sinusoid table renormalises tiny.en's stored one, whose row norms differ in the sixth digit
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(upcycled.scores), rtol=1e-4, atol=5e-4)
