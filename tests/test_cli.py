"""The `whisper-moe` command line, end to end on the bundled tiny.en checkpoint."""

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from modeling_whisper_moe import WhisperMoEForConditionalGeneration
from processing.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cli_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["convert-ct2", "tiny.en", str(root / "dense")]) == 0
    assert (
        main(["upcycle", str(root / "dense"), str(root / "moe"), "--num-experts", "4", "--num-experts-per-tok", "2"])
        == 0
    )
    return root / "moe"


def test_upcycle_writes_a_hub_folder(cli_moe):
    config = json.loads((cli_moe / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert (cli_moe / "tokenizer.json").is_file() and (cli_moe / "processor_config.json").is_file()


def test_transcribe_as_a_module(cli_moe, data_dir):
    command = [sys.executable, "-m", "processing", "transcribe", str(cli_moe), "--json", "--timestamps"]
    proc = subprocess.run([*command, str(data_dir / "misc/jfk.flac")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "ask not what your country can do for you" in result["text"].lower()
    assert result["chunks"] and result["chunks"][0]["timestamp"][0] == 0.0


def test_preset_and_flags(cli_moe, tmp_path):
    preset = REPO_ROOT / "configuration" / "presets" / "moe-8x2-decoder.json"
    dense = cli_moe.parent / "dense"
    assert (
        main(["upcycle", str(dense), str(tmp_path / "moe"), "--preset", str(preset), "--num-experts-per-tok", "1"])
        == 0
    )
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["encoder_sparse_layers"] == [] and config["decoder_sparse_layers"] is None
    assert (config["num_experts"], config["num_experts_per_tok"]) == (8, 1)


def test_prune_experts_keeps_the_most_used(cli_moe, data_dir, tmp_path):
    manifest = str(data_dir / "fsdd" / "manifest.csv")
    command = ["prune-experts", str(cli_moe), str(tmp_path / "pruned"), "--keep", "2", "--manifest", manifest]
    assert main([*command, "--split", "train", "--limit", "4"]) == 0
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["num_experts"] == 2 and config["num_experts_per_tok"] == 2
    pruned = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path / "pruned")
    assert pruned.model.encoder.layers[0].mlp.experts.fc1_weight.shape[0] == 2
    assert main([*command, "--keep", "1"]) == 1  # fewer experts than top-k is impossible


def test_errors_are_plain_words(cli_moe, tmp_path, capsys):
    assert main(["transcribe", str(cli_moe), str(tmp_path / "missing.wav")]) == 1
    assert "missing.wav" in capsys.readouterr().err
    assert main(["upcycle", str(tmp_path), str(tmp_path / "out")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert main(["convert-ct2", "large-v9", str(tmp_path / "out")]) == 1
    assert "large-v9" in capsys.readouterr().err
    dense = cli_moe.parent / "dense"
    assert (
        main(["upcycle", str(dense), str(tmp_path / "bad"), "--num-experts", "2", "--num-experts-per-tok", "3"]) == 1
    )
    assert "num_experts_per_tok" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
