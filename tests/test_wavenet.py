"""The WaveNet branch beside the decoder (modeling_whisper_moe/wavenet.py): causal with the receptive field it
claims, exact at alpha 0 (random and real weights), cached generation equal to recomputation, a saved folder that
reloads without the package."""

import textwrap

import pytest
import torch
from conftest import REPO_ROOT, TINY, run_without_package, tiny_batch, tiny_moe, tiny_moe_config

from modeling_whisper_moe import WhisperMoEForConditionalGeneration, WhisperMoEProcessor, load_audio
from modeling_whisper_moe.wavenet import WaveNetBranch

BRANCH = {"layers": 4, "channels": 64}  # the setting: dilations 1, 2, 4, 8, receptive field 16 tokens
WIDTH = TINY["d_model"]


def _opened(model: WhisperMoEForConditionalGeneration, alpha: float = 0.5) -> WhisperMoEForConditionalGeneration:
    """As after training: alpha off 0, so the branch changes the logits, and its weights off their initial values."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.wavenet_branch.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
        model.wavenet_branch.alpha.fill_(alpha)
    return model


def _logits(model, **batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_the_default_config_has_no_branch():
    model = tiny_moe()
    assert model.config.wavenet_branch is None and model.wavenet_branch is None
    assert not [name for name in model.state_dict() if "wavenet" in name]


def test_settings_fill_wavenets_dilations_and_the_receptive_field_follows():
    settings = tiny_moe_config(wavenet_branch={"layers": 12, "channels": 8}).wavenet_settings()
    assert settings["dilations"] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1, 2]
    assert settings["kernel_size"] == 2 and settings["alpha"] == 0.0
    branch = WaveNetBranch(WIDTH, tiny_moe_config(wavenet_branch={**BRANCH, "kernel_size": 3}).wavenet_settings())
    assert branch.receptive_field == 1 + 2 * (1 + 2 + 4 + 8)


@pytest.mark.parametrize("spec", [BRANCH, {"layers": 3, "channels": 16, "dilations": [1, 3, 9], "kernel_size": 3}])
def test_output_t_reads_exactly_the_receptive_field_ending_at_t(spec):
    torch.manual_seed(0)
    branch = WaveNetBranch(WIDTH, tiny_moe_config(wavenet_branch=spec).wavenet_settings()).double()
    field, length = branch.receptive_field, branch.receptive_field + 12
    embeddings = torch.randn(1, length, WIDTH, dtype=torch.float64, requires_grad=True)
    t = length - 3
    direction = torch.randn(WIDTH, dtype=torch.float64)  # not .sum(): a LayerNorm's outputs sum to its bias
    (branch(embeddings)[0, t] @ direction).backward()
    reads = embeddings.grad[0].abs().sum(dim=-1) > 0
    assert reads.nonzero().squeeze(1).tolist() == list(range(t - field + 1, t + 1))


def test_changing_token_t_plus_1_never_changes_the_logits_up_to_t():
    model = _opened(tiny_moe(max_target_positions=20, wavenet_branch=BRANCH))  # longer than its receptive field
    batch = tiny_batch(batch=1)
    ids = torch.randint(4, TINY["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(1))
    features = batch["input_features"]
    logits = _logits(model, input_features=features, decoder_input_ids=ids)
    for t in range(19):
        changed = ids.clone()
        changed[0, t + 1 :] = (changed[0, t + 1 :] + 7) % TINY["vocab_size"]
        after = _logits(model, input_features=features, decoder_input_ids=changed)
        # float32 round-off only: the experts group other tokens together when later tokens change
        torch.testing.assert_close(after[:, : t + 1], logits[:, : t + 1])
        assert not torch.allclose(after[:, t + 1], logits[:, t + 1])


def test_a_branch_at_alpha_0_changes_no_logit_and_then_learns():
    base = tiny_moe()
    model = tiny_moe(wavenet_branch=BRANCH).train()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(name.startswith("wavenet_branch.") for name in missing)
    assert model.wavenet_branch.alpha.item() == 0.0
    batch = tiny_batch()
    assert torch.equal(_logits(model.eval(), **batch), _logits(base, **batch))
    model.train()
    model(**batch).loss.backward()
    assert model.wavenet_branch.alpha.grad.abs() > 0  # alpha learns first; the convolutions once it has moved
    _opened(model, 0.3)
    assert not torch.allclose(_logits(model.eval(), **batch), _logits(base, **batch))


def test_adding_a_branch_keeps_every_logit_and_the_folder_reloads_it(tmp_path):
    model = tiny_moe()
    batch = tiny_batch()
    before = _logits(model, **batch)
    with pytest.raises(ValueError, match="dilations must be 2 positive ints"):
        model.add_wavenet_branch(2, 16, dilations=[1])
    assert model.config.wavenet_branch is None and model.wavenet_branch is None  # nothing changed
    model.add_wavenet_branch(2, 16, dilations=[1, 4])
    assert model.config.wavenet_settings()["dilations"] == [1, 4] and model.wavenet_branch.receptive_field == 6
    assert torch.equal(_logits(model, **batch), before)
    with pytest.raises(ValueError, match="has a WaveNet branch already"):
        model.add_wavenet_branch(2, 16)
    _opened(model)
    model.save_pretrained(tmp_path)
    reloaded, info = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(_logits(reloaded.eval(), **batch), _logits(model, **batch))
    assert not torch.allclose(_logits(model, **batch), before)


def test_train_script_adds_and_trains_a_branch(tmp_path):
    from processing import train

    recipe = REPO_ROOT / "configuration" / "recipes" / "grokking-modular.json"
    tiny = ["--d_model", "32", "--ffn_dim", "64", "--attention_heads", "2", "--arithmetic_modulus", "7",
            "--per_device_train_batch_size", "16", "--max_steps", "3", "--eval_steps", "3", "--warmup_steps", "0",
            "--wavenet_layers", "2", "--wavenet_channels", "8"]  # fmt: skip
    train.main([str(recipe), "--output_dir", str(tmp_path), *tiny])
    model = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config.wavenet_branch == {"layers": 2, "channels": 8, "kernel_size": 2}
    assert model.wavenet_branch.alpha.item() != 0.0  # alpha learns from its exact start


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generation_equals_recomputing_the_prefix(num_beams):
    model = _opened(tiny_moe(max_target_positions=40, wavenet_branch=BRANCH), 0.9)
    features = tiny_batch(batch=2)["input_features"]
    options = dict(max_new_tokens=25, min_new_tokens=25, num_beams=num_beams, do_sample=False)
    with torch.no_grad():
        cached = model.generate(features, use_cache=True, **options)
        recomputed = model.generate(features, use_cache=False, **options)
        model.wavenet_branch.alpha.fill_(0.0)
        without_branch = model.generate(features, use_cache=True, **options)
    assert cached.shape[-1] > model.wavenet_branch.receptive_field  # the window, not the whole prefix, was read
    assert torch.equal(cached, recomputed)
    assert not torch.equal(cached, without_branch)


RELOAD_SCRIPT = textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForSpeechSeq2Seq

    batch = torch.load(sys.argv[1])
    model, info = AutoModelForSpeechSeq2Seq.from_pretrained(sys.argv[2], trust_remote_code=True,
                                                            output_loading_info=True)
    with torch.no_grad():
        torch.save(model.eval()(**batch).logits, sys.argv[2] + "/remote_logits.pt")
    result = {"missing": sorted(info["missing_keys"]), "module": type(model.wavenet_branch).__module__,
              "alpha": model.wavenet_branch.alpha.item()}
    """
)


def test_a_saved_folder_reloads_the_branch_without_the_package(tmp_path):
    model = _opened(tiny_moe(wavenet_branch={**BRANCH, "dilations": [1, 3, 9, 27]}), 0.25)
    batch = tiny_batch()
    model.save_pretrained(tmp_path / "folder")
    assert (tmp_path / "folder" / "wavenet.py").is_file()
    torch.save(batch, tmp_path / "batch.pt")
    remote = run_without_package(RELOAD_SCRIPT, tmp_path / "batch.pt", tmp_path / "folder", tmp_path=tmp_path)
    assert remote.pop("leaked") == []
    assert remote["missing"] == [] and remote["alpha"] == 0.25
    assert remote["module"].startswith("transformers_modules")
    # another process may split the matmuls over a different number of threads: float32 round-off, not exact
    torch.testing.assert_close(torch.load(tmp_path / "folder" / "remote_logits.pt"), _logits(model, **batch))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"layers": 4}, "must be a dict with 'layers' and 'channels'"),
        ({**BRANCH, "width": 3}, "must be a dict with 'layers' and 'channels'"),
        ({"layers": 0, "channels": 8}, "layers, channels and kernel_size must be positive ints"),
        ({**BRANCH, "dilations": [1, 2]}, "dilations must be 4 positive ints, one per layer, got \\[1, 2\\]"),
        ({**BRANCH, "dilations": [1, 2, 0, 4]}, "dilations must be 4 positive ints"),
        ({**BRANCH, "alpha": 1.5}, "alpha must be a number between 0 and 1, got 1.5"),
    ],
)
def test_impossible_branches_raise(spec, message):
    with pytest.raises(ValueError, match=message):
        tiny_moe_config(wavenet_branch=spec)


@pytest.mark.slow
def test_a_branch_added_to_real_tiny_en_keeps_its_logits_and_transcript(tiny_en_moe):
    processor = WhisperMoEProcessor.from_pretrained(tiny_en_moe)
    features = processor(load_audio(REPO_ROOT / "examples" / "jfk.flac"), return_tensors="pt").input_features
    base = WhisperMoEForConditionalGeneration.from_pretrained(tiny_en_moe).eval()
    model, info = WhisperMoEForConditionalGeneration.from_pretrained(
        tiny_en_moe, wavenet_branch=BRANCH, output_loading_info=True
    )
    model.eval()
    assert info["missing_keys"] and all(name.startswith("wavenet_branch.") for name in info["missing_keys"])
    prompt = torch.tensor([[base.generation_config.decoder_start_token_id, 50362, 400, 523]])
    assert torch.equal(_logits(model, input_features=features, decoder_input_ids=prompt),
                       _logits(base, input_features=features, decoder_input_ids=prompt))  # fmt: skip
    with torch.no_grad():
        transcript = processor.batch_decode(model.generate(features), skip_special_tokens=True)[0]
        expected = processor.batch_decode(base.generate(features), skip_special_tokens=True)[0]
    assert transcript == expected and "ask not what your country can do for you" in transcript.lower()
