"""Lifelong training of a grown WhisperMoE: only the new phase trains, and the anti-forgetting losses behave."""

import csv

import pytest
import torch
from conftest import tiny_batch, tiny_moe
from datasets import Dataset

from modeling_whisper_moe.growth import grow_experts, previous_model
from processing.lifelong import (
    REPLAY_COLUMN,
    LifelongArguments,
    ReplayFlagCollator,
    anchoring_loss,
    apply_lifelong_mode,
    distillation_loss,
    lifelong_losses,
    mix_replay,
    parse_layers,
)


def _grown(**overrides):
    model = tiny_moe(**overrides)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mlp." in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)  # experts that differ, as after fine-tuning
    grow_experts(model, num_new=2, num_experts_per_tok=1, encoder_layers=[], decoder_layers=[0, 1])
    return model


def test_lifelong_mode_trains_only_the_new_phase_even_with_weight_decay():
    model = _grown()
    old = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    frozen = apply_lifelong_mode(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        optimizer.zero_grad()
        model(**tiny_batch(seed=step)).loss.backward()
        optimizer.step()
        frozen.restore()
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, old[name])}
    assert changed == {
        f"model.decoder.layers.{i}.mlp.{part}"
        for i in (0, 1)
        for part in (
            "experts.fc1_weight",
            "experts.fc1_bias",
            "experts.fc2_weight",
            "experts.fc2_bias",
            "router.weight",
            "router.null_logits",
        )
    }
    experts = model.model.decoder.layers[0].mlp.experts
    assert torch.equal(experts.fc2_weight[:4], old["model.decoder.layers.0.mlp.experts.fc2_weight"][:4])
    assert not torch.equal(experts.fc2_weight[4:], old["model.decoder.layers.0.mlp.experts.fc2_weight"][4:])
    # the previous model is still exactly the model before growth
    model.eval()
    with torch.no_grad(), previous_model(model):
        before = model(**tiny_batch(seed=9)).logits
    reference = tiny_moe()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            parameter.copy_(old[name][: parameter.shape[0]] if ".mlp." in name else old[name])
    assert torch.equal(reference(**tiny_batch(seed=9)).logits, before)


def test_distillation_is_zero_at_growth_and_grows_after_training():
    model = _grown()
    apply_lifelong_mode(model)
    batch = tiny_batch()
    model.train()
    model.config.router_jitter_noise = 0.0
    outputs = model(**batch)
    is_replay = torch.tensor([1, 1, 0, 0])
    args = LifelongArguments(anchor_coef=0.0, distill_coef=1.0)
    losses = lifelong_losses(model, batch, outputs, is_replay, args)
    assert abs(losses["distill_loss"].item()) < 1e-6  # the new experts output zero: student == teacher
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.mlp.experts.fc2_weight[4:].normal_(std=0.5)
    outputs = model(**batch)
    assert lifelong_losses(model, batch, outputs, is_replay, args)["distill_loss"] > 1e-3


def test_anchoring_pushes_replay_tokens_to_the_null_expert():
    model = _grown()
    apply_lifelong_mode(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    batch, is_replay = tiny_batch(), torch.tensor([1, 1, 1, 1])
    model.train()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        outputs = model(**batch)
        anchor = anchoring_loss(model, outputs, is_replay, batch["labels"])
        anchor.backward()
        optimizer.step()
        losses.append(anchor.item())
    assert losses[-1] < 0.5 * losses[0]
    assert anchoring_loss(model, outputs, torch.zeros(4, dtype=torch.long), batch["labels"]) is None


def test_distillation_loss_matches_definition():
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    t = 2.0
    p = (teacher / t).softmax(-1)
    kl = (p * (p.log() - (student / t).log_softmax(-1))).sum(-1)
    expected = (kl * mask).sum() / mask.sum() * t**2
    torch.testing.assert_close(distillation_loss(student, teacher, mask, t), expected)


def test_mix_replay_reaches_the_fraction_and_flags_rows():
    train = Dataset.from_dict({"labels": [[1]] * 30, "speaker": ["a"] * 30})
    replay = Dataset.from_dict({"labels": [[2]] * 4})
    mixed = mix_replay(train, replay, fraction=0.25, seed=0)
    assert len(mixed) == 40 and sum(mixed[REPLAY_COLUMN]) == 10
    assert all((row["labels"] == [2]) == bool(row[REPLAY_COLUMN]) for row in mixed)
    assert mixed.column_names == ["labels", REPLAY_COLUMN]


def test_replay_mixture_gives_replay_its_share_of_one_task_batches():
    from processing.lifelong import REPLAY_TASK, replay_mixture

    train = Dataset.from_dict({"input_ids": [[5, 6]] * 12})
    replay = Dataset.from_dict({"input_features": [[0.5]] * 5})
    mixture, collator, sampler = replay_mixture("translation", train, lambda rows: {"n": torch.tensor(len(rows))},
                                                replay, lambda rows: {"n": torch.tensor(-len(rows))}, fraction=0.25,
                                                steps=8, batch_size=3, seed=0)  # fmt: skip
    batches = [collator([mixture[index] for index in batch]) for batch in sampler]
    assert len(batches) == 8 and sum(batch["task"] == REPLAY_TASK for batch in batches) == 2
    for batch in batches:  # replay batches are flagged whole, new-task ones not at all
        assert batch[REPLAY_COLUMN].tolist() == [int(batch["task"] == REPLAY_TASK)] * 3
    with pytest.raises(ValueError, match="no replay or no new-task batch"):
        replay_mixture("translation", train, None, replay, None, fraction=0.01, steps=8, batch_size=3, seed=0)


def test_replay_never_takes_test_rows_or_held_out_speakers(data_dir):
    from processing.lifelong import replay_clips

    manifest = data_dir / "fsdd" / "manifest.csv"
    clips = replay_clips([str(manifest)], exclude_speakers=["yweweler"], max_per_manifest=40, seed=1)
    rows = {str((manifest.parent / row["path"]).resolve()): row for row in csv.DictReader(open(manifest))}
    assert len(clips) == len(set(clips)) == 40
    assert all(rows[clip]["split"] == "train" and rows[clip]["speaker"] != "yweweler" for clip in clips)
    assert clips == replay_clips([str(manifest)], exclude_speakers=["yweweler"], max_per_manifest=40, seed=1)


def test_replay_flag_collator_passes_flags():
    collator = ReplayFlagCollator(lambda rows: {"n": torch.tensor([len(row) for row in rows])})
    batch = collator([{"a": 1, REPLAY_COLUMN: 1}, {"a": 2, REPLAY_COLUMN: 0}])
    assert batch[REPLAY_COLUMN].tolist() == [1, 0] and batch["n"].tolist() == [1, 1]


def test_parse_layers_and_arguments_errors():
    assert parse_layers("all", 4) is None and parse_layers("none", 4) == [] and parse_layers("0,3", 4) == [0, 3]
    for spec in ("4", "a,b"):
        with pytest.raises(ValueError, match=spec):
            parse_layers(spec, 4)
    for bad in ({"replay_fraction": 1.0}, {"distill_temperature": 0.0}, {"anchor_coef": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LifelongArguments(**bad)
