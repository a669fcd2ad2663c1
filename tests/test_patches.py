"""The patch front-end (patches.py): tubelets, fractional positions, token dropping, clips of different sizes in one
batch, and the errors for inputs it cannot read."""

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_moe, tiny_moe_config
from transformers import GenerationConfig

from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration
from modeling_whisper_moe.patches import fit_clip, kept_tokens

PATCH = 4  # pixels per patch side in these tests
VIDEO = dict(max_source_positions=64, video_patch_size=PATCH, video_size=16, video_position_buckets=8)


def video_model(**overrides) -> WhisperMoEForConditionalGeneration:
    return tiny_moe(**{**VIDEO, **overrides}).add_patch_frontend()


def clip(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (frames, height, width, 3), generator=torch.Generator().manual_seed(seed))


def test_positions_are_fractional_so_the_same_relative_place_gets_the_same_embedding_at_any_resolution():
    frontend = video_model().get_encoder().embed_patches
    with torch.no_grad():  # black frames: every token's content is the same, what differs is its position
        small = frontend.embed_clip(torch.zeros(2, 2 * PATCH, 2 * PATCH, 3)).reshape(2, 2, -1)  # 2 x 2 patches
        large = frontend.embed_clip(torch.zeros(2, 4 * PATCH, 4 * PATCH, 3)).reshape(4, 4, -1)  # 4 x 4 patches
    for row, column in [(0, 0), (0, 1), (1, 0), (1, 1)]:  # fractions 0 and 1/2 of each axis
        torch.testing.assert_close(small[row, column], large[2 * row, 2 * column])
    assert not torch.allclose(large[0, 1], large[0, 0])  # 1/4 is a place of its own
    assert frontend.buckets(4, "cpu").tolist() == [0, 2, 4, 6]  # index / patches x 8 buckets
    longer = frontend.embed_clip(torch.zeros(4, 2 * PATCH, 2 * PATCH, 3)).reshape(2, 4, -1)
    torch.testing.assert_close(longer[0], small.flatten(0, 1))  # time is the tubelet's index: the start is the same
    assert not torch.allclose(longer[1], longer[0])


def test_token_dropping_happens_only_while_training_and_keeps_the_order():
    model = video_model(video_token_dropout=0.5)
    frontend = model.get_encoder().embed_patches
    video = clip(4, 4 * PATCH, 4 * PATCH)  # 2 tubelets x 16 patches
    with torch.no_grad():
        full = frontend.embed_clip(video)
        evaluated, mask = frontend([video])
        assert torch.equal(evaluated[0], full) and mask.sum() == 32  # nothing dropped in evaluation
        frontend.train()
        torch.manual_seed(0)
        kept, kept_mask = frontend([video, video[:2]])
        again, _ = frontend([video, video[:2]])
    assert kept_mask.sum(1).tolist() == [kept_tokens(32, 0.5), kept_tokens(16, 0.5)] == [16, 8]
    places = [int((full - token).abs().sum(-1).argmin()) for token in kept[0, :16]]
    torch.testing.assert_close(kept[0, :16], full[places])
    assert places == sorted(places) and len(set(places)) == 16  # a subset, in order
    assert not torch.equal(kept, again)  # a new draw each step


def test_clips_of_different_sizes_share_a_batch_and_get_what_they_get_alone(tmp_path):
    model = tiny_moe(**VIDEO)
    labels = torch.randint(4, 90, (2, 5))
    batch = {
        "input_features": torch.randn(2, TINY["num_mel_bins"], 2 * VIDEO["max_source_positions"]),
        "labels": labels,
    }
    with torch.no_grad():
        audio_before = model(**batch).logits
    model.add_patch_frontend()
    assert model.config.patch_frontend
    clips = [clip(5, 3 * PATCH, 2 * PATCH + 1, seed=1), clip(2, 2 * PATCH, 4 * PATCH, seed=2)]
    padded = torch.zeros(2, 5, 3 * PATCH, 2 * PATCH, 3, dtype=torch.long)
    padded[0] = clips[0][..., : 2 * PATCH, :]  # its centre crop: the odd column goes
    padded[1, :3] = clip(3, 3 * PATCH, 2 * PATCH, seed=3)
    frames = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, audio_before)
        together = model(pixel_values=clips, labels=labels)
        alone = [model(pixel_values=[c], labels=labels[i : i + 1]).logits[0] for i, c in enumerate(clips)]
        masked = model(pixel_values=padded, attention_mask=frames, labels=labels).logits[1]
        short = model(pixel_values=padded[1:, :3], labels=labels[1:]).logits[0]
        encoded = model.get_encoder()(pixel_values=clips)
    for row in range(2):
        torch.testing.assert_close(together.logits[row], alone[row], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked, short, rtol=1e-5, atol=1e-5)
    assert encoded["modality"] == "video" and encoded["attention_mask"].sum(1).tolist() == [3 * 3 * 2, 1 * 2 * 4]
    model.save_pretrained(tmp_path)
    reloaded, info = WhisperMoEForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and reloaded.config.patch_frontend
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=clips, labels=labels).logits, together.logits)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_from_video_decodes_each_clip_as_alone(num_beams):
    model = video_model()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=TINY["decoder_start_token_id"], eos_token_id=TINY["eos_token_id"],
        pad_token_id=TINY["pad_token_id"], lang_to_id={"<|en|>": 80}, task_to_id={"transcribe": 82},
        no_timestamps_token_id=84,
    )  # fmt: skip
    clips = [clip(3, 8, 8, seed=1), clip(6, 12, 16, seed=2)]
    tokens = model.generate_from_video(clips, max_new_tokens=4, num_beams=num_beams)
    assert tokens[:, :4].tolist() == [[TINY["decoder_start_token_id"], 80, 82, 84]] * 2 and tokens.shape[1] > 4
    for row, one in enumerate(clips):
        alone = model.generate(pixel_values=[one], max_new_tokens=4, num_beams=num_beams)
        assert tokens[row, : alone.shape[1]].tolist() == alone[0].tolist()


def test_too_long_or_ill_shaped_video_is_refused_naming_the_problem():
    model = video_model()
    labels = torch.randint(4, 90, (1, 3))
    with pytest.raises(ValueError, match="more than max_source_positions=64"):
        model(pixel_values=[clip(10, 4 * PATCH, 4 * PATCH)], labels=labels)  # 5 tubelets x 16 patches
    with pytest.raises(ValueError, match="smaller than one patch"):
        model(pixel_values=[clip(2, PATCH - 1, 8)], labels=labels)
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, frames, height, width, 3\)"):
        model(pixel_values=torch.zeros(2, 8, 8, 3), labels=labels)
    with pytest.raises(ValueError, match="clip 0 must be"):
        model(pixel_values=[torch.zeros(2, 8, 8, 4)], labels=labels)
    with pytest.raises(ValueError, match="no patch front-end"):
        tiny_moe(**VIDEO)(pixel_values=[clip(2, 8, 8)], labels=labels)
    with pytest.raises(ValueError, match="one input"):
        model(pixel_values=[clip(2, 8, 8)], input_ids=labels, labels=labels)
    long = np.zeros((40, 16, 16, 3), np.uint8)  # 20 tubelets x 16 patches: 5 tubelets fit
    fitted = fit_clip(model.config, long)
    assert len(fitted) == 8 and len(fit_clip(model.config, long[:6])) == 6


def test_video_fields_are_checked():
    for field, value, message in [
        ("video_patch_size", 0, "video_patch_size must be a positive int"),
        ("video_token_dropout", 1.0, r"video_token_dropout must be in \[0, 1\)"),
        ("video_fps", 0, "video_fps must be a positive number"),
        ("video_size", 2, "smaller than one patch"),
    ]:
        with pytest.raises(ValueError, match=message):
            tiny_moe_config(**{**VIDEO, field: value})
    with pytest.raises(ValueError, match="more than max_source_positions=12"):
        WhisperMoEConfig(**{**tiny_moe_config().to_dict(), "patch_frontend": True, "video_size": 64})


@pytest.mark.parametrize("training", [False, True])
def test_router_masks_name_the_tubelets_the_encoder_routed(training):
    from processing.routing import router_token_masks

    model = video_model(video_token_dropout=0.5).train(training)
    clips, labels = [clip(4, 16, 16, seed=1), clip(2, 8, 12, seed=2)], torch.randint(4, 90, (2, 3))
    outputs = model.model(pixel_values=clips, decoder_input_ids=labels, output_router_logits=True)
    routed = outputs.encoder_attention_mask.bool()  # (batch, tubelets) the encoder kept
    mask = router_token_masks(model.config, {"pixel_values": clips, "labels": labels}, training=training)["encoder"]
    assert torch.equal(mask, routed) and outputs.encoder_router_logits[0].shape[0] == mask.numel()
    assert mask.sum(1).tolist() == ([16, 3] if training else [32, 6])  # 2 x 16 and 1 x 6 tubelets, half kept
