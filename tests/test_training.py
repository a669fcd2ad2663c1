"""Fine-tuning: training modes, LoRA adapters, router logging, accumulation, resume, the script, 2-process DDP."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, TINY, TINY_FRAMES, tiny_moe
from transformers import Seq2SeqTrainingArguments, TrainerCallback

from modeling_whisper_moe import WhisperMoEForConditionalGeneration
from processing.training import WhisperMoETrainer, apply_training_mode

FSDD = "fsdd/manifest.csv"


class _Synthetic(torch.utils.data.Dataset):
    """Fixed random (features, labels) pairs for the tiny config: Trainer mechanics without audio."""

    def __init__(self, size: int = 8, tgt_len: int = 5):
        generator = torch.Generator().manual_seed(0)
        self.features = torch.randn(size, TINY["num_mel_bins"], TINY_FRAMES, generator=generator)
        self.labels = torch.randint(4, TINY["vocab_size"], (size, tgt_len), generator=generator)
        self.labels[::3, 3:] = -100  # uneven lengths

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> dict:
        return {"input_features": self.features[idx], "labels": self.labels[idx]}


def _trainer(tmp_path, steps: int, **overrides) -> WhisperMoETrainer:
    args = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=1, save_steps=2, report_to="none", seed=0, dataloader_num_workers=0,
                use_cpu=True)  # fmt: skip
    args.update(overrides)
    return WhisperMoETrainer(
        model=tiny_moe().train(), args=Seq2SeqTrainingArguments(**args), train_dataset=_Synthetic()
    )


class _StopAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def _trainable(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_training_modes_choose_what_trains():
    frozen = _trainable(apply_training_mode(tiny_moe(), "freeze_encoder"))
    assert frozen and not any(name.startswith("model.encoder.") for name in frozen)
    assert any(name.startswith("model.decoder.") for name in frozen)
    experts = _trainable(apply_training_mode(tiny_moe(), "experts"))
    assert experts and all(".mlp.experts." in name or ".mlp.router." in name for name in experts)
    full = _trainable(apply_training_mode(tiny_moe(), "full"))
    assert "model.encoder.conv1.weight" in full and "model.encoder.embed_positions.weight" not in full
    with pytest.raises(ValueError, match="Unknown training mode 'everything'"):
        apply_training_mode(tiny_moe(), "everything")


def test_lora_adapters_on_attention_and_experts_save_load_and_merge(tmp_path):
    from peft import PeftModel

    peft_model = apply_training_mode(tiny_moe(), "lora", lora_r=4, lora_alpha=8)
    trainable = _trainable(peft_model)
    assert any("experts" in name and "lora" in name for name in trainable)
    assert any("q_proj.lora_A" in name for name in trainable)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters do something
            torch.nn.init.normal_(parameter, std=0.1)
    features, labels = _Synthetic()[0]["input_features"][None], _Synthetic()[0]["labels"][None]
    expected = peft_model(input_features=features, labels=labels).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_moe(), tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(input_features=features, labels=labels).logits, expected)
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, WhisperMoEForConditionalGeneration)
    torch.testing.assert_close(merged(input_features=features, labels=labels).logits, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(tiny_moe()(input_features=features, labels=labels).logits, expected)


def test_trainer_logs_loss_parts_and_router_statistics(tmp_path):
    trainer = _trainer(tmp_path, steps=2)
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("ce", "encoder_aux_loss", "decoder_aux_loss", "encoder_z_loss", "decoder_z_loss"):
        assert key in logged
    assert 1.0 <= logged["router/decoder.1/max_load"] <= 4.0
    assert 0.0 < logged["router/encoder.0/entropy"] <= 1.0
    assert logged["ce"] < logged["loss"]  # the router losses are part of the loss


def test_gradient_accumulation_gives_the_same_update(tmp_path):
    one_batch = _trainer(tmp_path / "a", steps=1, optim="sgd", per_device_train_batch_size=8)
    one_batch.train()
    accumulated = _trainer(tmp_path / "b", steps=1, optim="sgd", per_device_train_batch_size=4,
                           gradient_accumulation_steps=2)  # fmt: skip
    accumulated.train()
    for (name, a), b in zip(one_batch.model.named_parameters(), accumulated.model.parameters()):
        if "router" not in name:  # router losses are a weighted mean of micro-batch losses, not the same function
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4, msg=name)


def test_resume_from_checkpoint_reproduces_an_uninterrupted_run(tmp_path):
    straight = _trainer(tmp_path / "straight", steps=4)
    straight.train()
    interrupted = _trainer(tmp_path / "resumed", steps=4)
    interrupted.add_callback(_StopAfter(2))  # the same run, killed after its step-2 checkpoint
    interrupted.train()
    resumed = _trainer(tmp_path / "resumed", steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b)
    assert straight.state.log_history[-2]["loss"] == pytest.approx(resumed.state.log_history[-2]["loss"])


def _train_command(folder, data_dir, output_dir) -> list[str]:
    return [
        str(REPO_ROOT / "scripts" / "train.py"),
        "--model_name_or_path", str(folder),
        "--train_manifest", str(data_dir / FSDD),
        "--output_dir", str(output_dir),
        "--max_steps", "2",
        "--per_device_train_batch_size", "2",
        "--max_train_samples", "8",
        "--max_eval_samples", "4",
        "--exclude_speakers", "yweweler",
        "--save_steps", "2",
        "--generation_max_length", "8",
    ]  # fmt: skip


def test_ttt_parameters_train_at_their_own_rate(tmp_path):
    trainer = _trainer(tmp_path, steps=2)
    trainer.model.add_ttt(ttt_type="linear", mini_batch_size=4)
    trainer.ttt_lr_multiplier = 10.0
    optimizer = trainer.create_optimizer()
    names = {id(parameter): name for name, parameter in trainer.model.named_parameters()}
    rates = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(rates) == sum(p.requires_grad for p in trainer.model.parameters())  # every trained one, once
    ttt = {name for name in rates if ".ttt." in name or ".ttt_layer_norm." in name}
    assert ttt and {rates[name] for name in ttt} == {1e-2} and set(rates.values()) - {1e-2} == {1e-3}
    trainer.train()
    gates = [p for name, p in trainer.model.named_parameters() if name.endswith("gate")]
    assert gates and all(gate.abs().sum() > 0 for gate in gates)  # the closed gates opened


def test_train_script_writes_a_hub_folder_with_a_model_card(tiny_random_moe, data_dir, tmp_path):
    # with TTT sub-layers added by flags: the saved folder keeps them
    ttt = ["--ttt_decoder_layers", "all", "--ttt_encoder_layers", "1", "--ttt_mini_batch_size", "4"]
    proc = subprocess.run([sys.executable, *_train_command(tiny_random_moe, data_dir, tmp_path / "out"), *ttt],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    record = json.loads((out / "training_record.json").read_text())
    assert record["data"]["exclude_speakers"] == ["yweweler"] and record["recipe"]["adam_beta2"] == 0.98
    assert record["hyperparameters"]["max_steps"] == 2 and record["hyperparameters"]["adam_beta2"] == 0.98
    assert 0.0 <= record["metrics"]["eval_wer"]
    card = (out / "README.md").read_text()
    assert "## Training" in card and "eval_wer" in card and "yweweler" in card
    assert "text-to-audio" not in card  # an ASR model: no speech-output example
    assert (out / "checkpoint-2").is_dir() and (out / "modeling_whisper_moe.py").is_file()
    loaded = WhisperMoEForConditionalGeneration.from_pretrained(out)
    assert loaded.config.num_experts == 4
    assert loaded.config.encoder_ttt_layers == [1] and loaded.config.decoder_ttt_layers == [0, 1]
    assert loaded.model.decoder.layers[1].ttt.gate.abs().sum() > 0  # trained


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def test_two_process_ddp_on_cpu(tiny_random_moe, data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
               *_train_command(tiny_random_moe, data_dir, tmp_path / "ddp")]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((tmp_path / "ddp" / "checkpoint-2" / "trainer_state.json").read_text())
    # 2 steps x 2 processes x 2 examples: the 8 training clips exactly once (a single process would be at 0.5)
    assert state["global_step"] == 2 and state["epoch"] == pytest.approx(1.0)


def test_train_script_upcycles_dense_checkpoints_unless_told_not_to(tiny_en_dense, tmp_path):
    from processing.arguments import parse_arguments
    from processing.models import load_model

    common = ["--model_name_or_path", str(tiny_en_dense), "--output_dir", str(tmp_path)]
    run = parse_arguments([*common, "--num_experts", "4"])
    model_args, training_args, recipe = run.model, run.training, run.recipe
    assert recipe["path"].endswith("asr-finetune.json") and training_args.adam_beta2 == 0.98
    upcycled, _ = load_model(model_args, run.data, ["asr"])
    assert isinstance(upcycled, WhisperMoEForConditionalGeneration) and upcycled.config.num_experts == 4
    dense_run = parse_arguments([*common, "--upcycle", "false"])
    dense, _ = load_model(dense_run.model, dense_run.data, ["asr"])
    assert type(dense).__name__ == "WhisperForConditionalGeneration"
    with pytest.raises(ValueError, match="not used by the HfArgumentParser"):
        parse_arguments([*common, "--no_such_flag", "1"])
