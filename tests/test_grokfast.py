"""Grokfast (processing/grokfast.py): the EMA / MA filters against hand computations, parameters without a gradient
left alone, once per optimizer step before clipping in the trainer, and the modular-arithmetic task through
processing.train."""

import json

import numpy as np
import pytest
import test_multitask
import torch
from conftest import REPO_ROOT, tiny_moe
from test_training import _Synthetic
from transformers import EvalPrediction, Seq2SeqTrainingArguments

from processing.arguments import parse_arguments
from processing.grokfast import GradientFilter
from processing.tasks.modular_arithmetic import equations, exact_match, split_equations
from processing.training import WhisperMoETrainer

ALPHA, LAMB = 0.9, 2.0


def _parameter(*rows: list[float]) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(len(rows), len(rows[0])))


def _step(grok: GradientFilter, parameters: dict, grads: dict) -> dict:
    """One filter call with these gradients (None: no gradient); returns the filtered gradients as nested lists."""
    for name, parameter in parameters.items():
        parameter.grad = None if grads[name] is None else torch.tensor(grads[name])
    grok(parameters.items())
    return {name: None if p.grad is None else p.grad.tolist() for name, p in parameters.items()}


def _close(actual: list, expected: list) -> None:
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected))


def test_ema_filter_matches_the_hand_computation():
    grok = GradientFilter("ema", alpha=ALPHA, lamb=LAMB)
    parameters = {"w": _parameter([0.0, 0.0])}
    first = _step(grok, parameters, {"w": [[1.0, -2.0]]})
    _close(first["w"], [[1.0 + LAMB * 1.0, -2.0 + LAMB * -2.0]])  # the average starts at g
    second = _step(grok, parameters, {"w": [[3.0, 0.5]]})
    mu = [ALPHA * 1.0 + (1 - ALPHA) * 3.0, ALPHA * -2.0 + (1 - ALPHA) * 0.5]
    _close(second["w"], [[3.0 + LAMB * mu[0], 0.5 + LAMB * mu[1]]])


def test_ma_filter_matches_the_hand_computation():
    grok = GradientFilter("ma", lamb=LAMB, window=2)
    parameters = {"w": _parameter([0.0])}
    assert _step(grok, parameters, {"w": [[4.0]]})["w"] == [[4.0]]  # the window is not full yet
    _close(_step(grok, parameters, {"w": [[2.0]]})["w"], [[2.0 + LAMB * (4.0 + 2.0) / 2]])
    _close(_step(grok, parameters, {"w": [[-1.0]]})["w"], [[-1.0 + LAMB * (2.0 - 1.0) / 2]])


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_a_parameter_without_gradient_stays_none_and_its_average_waits(kind):
    grok = GradientFilter(kind, alpha=ALPHA, lamb=LAMB, window=1)
    parameters = {"used": _parameter([0.0]), "unrouted": _parameter([0.0])}
    _step(grok, parameters, {"used": [[1.0]], "unrouted": [[5.0]]})
    state = grok.average["unrouted"].clone()
    filtered = _step(grok, parameters, {"used": [[1.0]], "unrouted": None})
    assert filtered["unrouted"] is None  # not zeros: AdamW skips a None gradient entirely
    assert torch.equal(grok.average["unrouted"], state)
    later = _step(grok, parameters, {"used": [[1.0]], "unrouted": [[1.0]]})
    if kind == "ema":  # the average resumes from step 1, as if the step without gradient had not happened
        _close(later["unrouted"], [[1.0 + LAMB * (ALPHA * 5.0 + (1 - ALPHA) * 1.0)]])
    else:
        _close(later["unrouted"], [[1.0 + LAMB * 1.0]])


def test_an_unrouted_expert_row_keeps_a_zero_gradient_and_its_average():
    grok = GradientFilter("ema", alpha=ALPHA, lamb=LAMB)
    parameters = {"experts": _parameter([0.0, 0.0], [0.0, 0.0])}  # (experts, width), as a stacked expert tensor
    _step(grok, parameters, {"experts": [[1.0, 1.0], [2.0, -2.0]]})
    before = grok.average["experts"][1].clone()
    filtered = _step(grok, parameters, {"experts": [[1.0, 1.0], [0.0, 0.0]]})  # expert 1 got no token
    assert filtered["experts"][1] == [0.0, 0.0]
    _close(filtered["experts"][0], [1.0 + LAMB * 1.0] * 2)
    assert torch.equal(grok.average["experts"][1], before)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kind": "sma"}, "grokfast must be one of"),
        ({"kind": "ema", "alpha": 1.0}, "grokfast_alpha must be in \\[0, 1\\), got 1.0"),
        ({"kind": "ema", "lamb": -1.0}, "grokfast_lamb must be non-negative, got -1.0"),
        ({"kind": "ma", "window": 0}, "grokfast_window must be at least 1, got 0"),
    ],
)
def test_impossible_settings_raise(options, message):
    with pytest.raises(ValueError, match=message):
        GradientFilter(**options)


def test_the_flags_are_checked_when_read(tmp_path):
    with pytest.raises(ValueError, match="grokfast must be one of .* got 'sma'"):
        parse_arguments(["--output_dir", str(tmp_path), "--grokfast", "sma"])
    run = parse_arguments(["--output_dir", str(tmp_path), "--grokfast", "ma", "--grokfast_window", "7"])
    assert run.grokfast.gradient_filter().window == 7


# ---------------------------------------------------------------------------------------------------------------------
# In the trainer
# ---------------------------------------------------------------------------------------------------------------------


def _trained(tmp_path, grok: GradientFilter | None, model=None, steps: int = 1, **overrides) -> torch.nn.Module:
    args = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=0.1,
                optim="sgd", max_grad_norm=0.0, report_to="none", seed=0, dataloader_num_workers=0, use_cpu=True,
                save_strategy="no", lr_scheduler_type="constant")  # fmt: skip
    model = model if model is not None else tiny_moe().train()
    trainer = WhisperMoETrainer(model=model, args=Seq2SeqTrainingArguments(**{**args, **overrides}),
                                train_dataset=_Synthetic(), gradient_filter=grok)  # fmt: skip
    trainer.train()
    return trainer.model


def _update(model) -> dict[str, torch.Tensor]:
    """Each parameter's change in training; a tied weight (the decoder's embedding and output head) once."""
    start = dict(tiny_moe().named_parameters())
    return {name: (tensor - start[name]).detach() for name, tensor in model.named_parameters()}


def test_the_filter_runs_once_per_optimizer_step_on_the_accumulated_gradient(tmp_path):
    def no_router_loss():  # router losses are a mean over each micro-batch, so two halves would not add up to one
        return tiny_moe(router_aux_loss_coef=0.0, router_z_loss_coef=0.0).train()

    plain = _update(_trained(tmp_path / "plain", None, no_router_loss()))
    filtered = _update(_trained(tmp_path / "one", GradientFilter("ema", lamb=LAMB), no_router_loss()))
    accumulated = _update(_trained(tmp_path / "two", GradientFilter("ema", lamb=LAMB), no_router_loss(),
                                   per_device_train_batch_size=4, gradient_accumulation_steps=2))  # fmt: skip
    moved = [name for name, change in plain.items() if change.abs().sum()]
    assert "model.decoder.embed_tokens.weight" in moved
    for name in moved:
        # the first step's average is the gradient itself: SGD moves (1 + lamb) times as far
        torch.testing.assert_close(filtered[name], (1 + LAMB) * plain[name], atol=1e-6, rtol=1e-4, msg=name)
        torch.testing.assert_close(accumulated[name], filtered[name], atol=2e-6, rtol=1e-4, msg=name)


def test_gradients_are_clipped_after_the_filter(tmp_path):
    clip, rate = 1e-3, 0.1
    model = _trained(tmp_path, GradientFilter("ema", lamb=LAMB), learning_rate=rate, max_grad_norm=clip)
    moved = torch.sqrt(sum(change.pow(2).sum() for change in _update(model).values()))
    assert moved.item() == pytest.approx(rate * clip, rel=1e-3)  # clipped after filtering: not (1 + lamb) times it


def test_a_parameter_no_batch_uses_is_not_moved_by_adamw(tmp_path):
    model = tiny_moe(text_frontend=True, max_text_positions=8).train()  # audio batches never read the text front-end
    text_embedding = model.model.encoder.embed_text_tokens.weight.detach().clone()
    grok = GradientFilter("ema", lamb=LAMB)
    trained = _trained(tmp_path, grok, model, steps=2, optim="adamw_torch", weight_decay=0.5)
    assert trained.model.encoder.embed_text_tokens.weight.grad is None
    assert torch.equal(trained.model.encoder.embed_text_tokens.weight, text_embedding)
    assert "model.encoder.embed_text_tokens.weight" not in grok.average
    assert "model.decoder.embed_tokens.weight" in grok.average


# ---------------------------------------------------------------------------------------------------------------------
# The grokking task
# ---------------------------------------------------------------------------------------------------------------------


def test_modular_equations_split_and_exact_match():
    rows = equations(7, "/")
    assert len(rows) == 7 * 6 and all((c * b) % 7 == a for a, b, c in rows)
    train, held_out = split_equations(equations(11, "+"), 0.4, seed=3)
    assert len(train) == round(0.4 * 121) and not set(train) & set(held_out) and len(train) + len(held_out) == 121
    assert split_equations(equations(11, "+"), 0.4, seed=3) == (train, held_out)
    labels = np.array([[5, 6, 7, -100], [5, 6, 7, 8], [5, 6, 7, 8]])
    predicted = np.array([[5, 6, 7, 1], [5, 6, 7, 8], [5, 6, 9, 8]])  # padding is not scored; one wrong token fails
    assert exact_match(EvalPrediction(predicted, labels)) == {"accuracy": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="prime arithmetic_modulus"):
        equations(12, "/")
    with pytest.raises(ValueError, match="arithmetic_train_fraction=0.0"):
        split_equations(rows, 0.0, seed=0)


def test_train_script_runs_modular_arithmetic_from_scratch_with_grokfast(tmp_path):
    from processing import train

    recipe = REPO_ROOT / "configuration" / "recipes" / "grokking-modular.json"
    tiny = ["--d_model", "32", "--ffn_dim", "64", "--attention_heads", "2", "--arithmetic_modulus", "11",
            "--per_device_train_batch_size", "16", "--max_steps", "4", "--eval_steps", "2",
            "--logging_steps", "2"]  # fmt: skip
    metrics = train.main([str(recipe), "--output_dir", str(tmp_path), *tiny, "--grokfast", "ema"])
    assert 0.0 <= metrics["eval_held_out_accuracy"] <= 1.0 and 0.0 <= metrics["eval_train_accuracy"] <= 1.0
    record = json.loads((tmp_path / "training_record.json").read_text())
    assert record["grokfast"]["grokfast"] == "ema" and record["grokfast"]["grokfast_lamb"] == 2.0
    curve = [entry["step"] for entry in record["log_history"] if "eval_held_out_accuracy" in entry]
    assert curve == [2, 4, 4]  # evaluated every 2 steps, then once more by train.main after training
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["d_model"] == 32 and config["text_frontend"]


recipe = test_multitask.recipe  # the multi-task recipe on the shared data (a fixture)


def test_every_task_of_the_mixture_is_filtered_at_every_step(recipe, tmp_path, monkeypatch):
    from processing import train

    calls = []
    original = GradientFilter.__call__

    def recording(self, named_parameters):
        named_parameters = list(named_parameters)
        calls.append({name for name, parameter in named_parameters if parameter.grad is not None})
        original(self, named_parameters)

    monkeypatch.setattr(GradientFilter, "__call__", recording)
    tiny = ["--d_model", "32", "--ffn_dim", "48", "--encoder_layers", "1", "--decoder_layers", "1",
            "--attention_heads", "2", "--task_steps", "2", "3", "2", "--task_batch_sizes", "2", "2", "2",
            "--asr_synthetic_examples", "4", "--voices", "en-us", "--speeds", "160", "--pitches", "50",
            "--tokenizer_name_or_path", "bundled:base", "--grokfast", "ema"]  # fmt: skip
    train.main([str(recipe), "--output_dir", str(tmp_path), *tiny])
    assert len(calls) == 2 + 3 + 2  # asr, translation and tts steps: once per optimizer step
    trained = set().union(*calls)
    assert any(name.startswith("speech.") for name in trained)  # the tts head's steps
    assert any("embed_text_tokens" in name for name in trained)  # the translation steps' text front-end
    assert any("conv1" in name for name in trained)  # the asr steps' audio front-end
