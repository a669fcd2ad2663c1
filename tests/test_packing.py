"""Variable-length encoder input and Patch-n-Pack: packed, padded and one-clip-alone give the same outputs."""

import textwrap

import pytest
import torch
from conftest import TINY, run_without_package, tiny_moe

from modeling_whisper_moe import WhisperMoEForConditionalGeneration, WhisperMoEProcessor
from modeling_whisper_moe.packing import block_diagonal_mask, pack, plan_packing, unpack

FRAMES = 2 * TINY["max_source_positions"]  # 24 mel frames: the tiny encoder's 30 s window


def _batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features (batch, mels, FRAMES) with garbage past each clip's end, and the matching frame mask."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), TINY["num_mel_bins"], FRAMES, generator=generator)
    mask = (torch.arange(FRAMES)[None] < torch.tensor(lengths)[:, None]).long()
    return features, mask


def _variable_length_moe(pack_audio: bool):
    return tiny_moe(variable_length_audio=True, pack_audio=pack_audio)


def test_plan_packing_places_every_clip_once_within_capacity():
    lengths = torch.tensor([5, 12, 3, 7, 9, 1, 12])
    packing = plan_packing(lengths, seq_len=12, capacity=12)
    placed = packing.source[packing.real]
    expected = torch.cat([clip * 12 + torch.arange(n) for clip, n in enumerate(lengths.tolist())])
    assert sorted(placed.tolist()) == sorted(expected.tolist())
    assert packing.real.sum(-1).max() <= 12
    assert packing.source.shape[0] == 5  # 49 positions need >= 5 rows of 12; first-fit decreasing finds 5
    with pytest.raises(ValueError, match="more than the 12"):
        plan_packing(torch.tensor([13]), seq_len=13, capacity=12)


def test_pack_unpack_round_trip_and_mask_is_block_diagonal():
    lengths = torch.tensor([3, 5, 2])
    hidden = torch.randn(3, 5, 4)
    packing = plan_packing(lengths, seq_len=5, capacity=6)
    restored = unpack(pack(hidden, packing), packing, batch_size=3, seq_len=5)
    real = torch.arange(5)[None] < lengths[:, None]
    torch.testing.assert_close(restored[real], hidden[real])
    assert restored[~real].abs().sum() == 0
    mask = block_diagonal_mask(packing)[:, 0]
    segment = packing.segment
    for row in range(segment.shape[0]):
        for q in range(segment.shape[1]):
            for k in range(segment.shape[1]):
                assert bool(mask[row, q, k]) == bool(segment[row, q] == segment[row, k])


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_padded_and_alone_give_the_same_encoder_output(attn_implementation):
    lengths = [24, 7, 16, 3, 11]
    features, mask = _batch(lengths)
    packed, padded = _variable_length_moe(True), _variable_length_moe(False)
    padded.load_state_dict(packed.state_dict())
    for model in (packed, padded):
        model.config._attn_implementation = attn_implementation
    with torch.no_grad():
        out_packed = packed.model.encoder(features, attention_mask=mask)
        out_padded = padded.model.encoder(features, attention_mask=mask)
        torch.testing.assert_close(out_packed.last_hidden_state, out_padded.last_hidden_state, atol=1e-5, rtol=1e-5)
        assert out_packed.attention_mask.sum(-1).tolist() == [(n + 1) // 2 for n in lengths]
        for clip, n in enumerate(lengths):
            alone = packed.model.encoder(features[clip : clip + 1, :, :n], attention_mask=mask[clip : clip + 1, :n])
            positions = (n + 1) // 2
            torch.testing.assert_close(
                out_packed.last_hidden_state[clip, :positions], alone.last_hidden_state[0], atol=1e-5, rtol=1e-5
            )
            assert out_packed.last_hidden_state[clip, positions:].abs().sum() == 0


def test_loss_and_router_losses_do_not_depend_on_packing_or_padding():
    lengths = [24, 5, 13]
    features, mask = _batch(lengths, seed=1)
    labels = torch.randint(4, TINY["vocab_size"], (3, 6), generator=torch.Generator().manual_seed(2))
    packed, padded = _variable_length_moe(True), _variable_length_moe(False)
    padded.load_state_dict(packed.state_dict())
    out_packed = packed(features, attention_mask=mask, labels=labels)
    out_padded = padded(features, attention_mask=mask, labels=labels)
    for name in ("loss", "encoder_aux_loss", "encoder_z_loss", "decoder_aux_loss"):
        torch.testing.assert_close(getattr(out_packed, name), getattr(out_padded, name), atol=1e-5, rtol=1e-5)
    out_packed.loss.backward()
    assert packed.model.encoder.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_generation_of_a_batch_equals_each_clip_alone():
    lengths = [20, 6, 13]
    features, mask = _batch(lengths, seed=3)
    model = _variable_length_moe(True)
    model.generation_config.decoder_start_token_id = TINY["decoder_start_token_id"]
    model.generation_config.no_timestamps_token_id = TINY["vocab_size"] - 1
    model.generation_config.eos_token_id = TINY["eos_token_id"]
    model.generation_config.pad_token_id = TINY["pad_token_id"]
    batch = model.generate(features, attention_mask=mask, max_new_tokens=6)
    assert batch.shape[0] == 3
    for clip, n in enumerate(lengths):
        alone = model.generate(
            features[clip : clip + 1, :, :n], attention_mask=mask[clip : clip + 1, :n], max_new_tokens=6
        )
        assert batch[clip, : alone.shape[1]].tolist() == alone[0].tolist()
    with pytest.raises(ValueError, match="return_timestamps"):
        model.generate(features, attention_mask=mask, return_timestamps=True)


def test_variable_length_errors_name_the_problem():
    model = _variable_length_moe(True)
    features, mask = _batch([24, 5])
    mask[1] = 0
    with pytest.raises(ValueError, match="no real mel frames"):
        model.model.encoder(features, attention_mask=mask)
    long = torch.randn(1, TINY["num_mel_bins"], FRAMES + 4)
    with pytest.raises(ValueError, match="max_source_positions"):
        model.model.encoder(long)


VARIABLE_LENGTH_PIPELINE = textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, pipeline

    folder, clips = sys.argv[1], sys.argv[2:]
    asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
    outputs = asr(clips, batch_size=len(clips), generate_kwargs={"max_new_tokens": 8, "num_beams": 2})
    result = {"batched": [out["text"] for out in outputs]}
    model = AutoModelForSpeechSeq2Seq.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    alone = []
    for clip in clips:
        inputs = processor(clip, padding="longest", return_attention_mask=True, return_tensors="pt")
        ids = model.generate(inputs.input_features, attention_mask=inputs.attention_mask, max_new_tokens=8,
                             num_beams=2)
        alone.append(processor.batch_decode(ids, skip_special_tokens=True)[0])
    result["alone"] = alone
    result["frames"] = int(inputs.input_features.shape[-1])
    """
)


def test_pipeline_encodes_real_frames_of_a_batch_without_the_package(tiny_random_moe, data_dir, tmp_path):
    """A variable-length folder transcribes a batch of real short clips through the pipeline (no 30 s padding), each
    clip as it would alone, with only the folder's code."""
    model = WhisperMoEForConditionalGeneration.from_pretrained(tiny_random_moe)
    model.config.variable_length_audio = True
    folder = tmp_path / "variable-length"
    model.save_pretrained(folder)
    WhisperMoEProcessor.from_pretrained(tiny_random_moe).save_pretrained(folder)
    clips = [data_dir / "fsdd/recordings/3_george_10.wav", data_dir / "fsdd/recordings/7_jackson_0.wav"]
    result = run_without_package(VARIABLE_LENGTH_PIPELINE, folder, *clips, tmp_path=tmp_path)
    assert result["leaked"] == []
    assert result["frames"] < 3000  # the processor did not pad to 30 s
    assert result["batched"] == result["alone"]
    assert all(text.strip() for text in result["batched"])
