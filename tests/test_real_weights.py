"""Behaviour on OpenAI's real tiny.en weights and real speech: upcycling is exact, transcripts are right."""

import pytest
import torch
from conftest import JFK_TEXT
from transformers import WhisperForConditionalGeneration
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from modeling_whisper_moe import WhisperMoEForConditionalGeneration, WhisperMoEProcessor, load_audio

pytestmark = pytest.mark.slow
CLIPS = ("misc/jfk.flac", "librispeech/test-clean/1089-134686-0002.wav", "misc/2412-153948-0000.flac")


@pytest.fixture(scope="module")
def models(tiny_en_dense, tiny_en_moe):
    dense = WhisperForConditionalGeneration.from_pretrained(tiny_en_dense).eval()
    moe = WhisperMoEForConditionalGeneration.from_pretrained(tiny_en_moe).eval()
    return dense, moe, WhisperMoEProcessor.from_pretrained(tiny_en_moe)


def _features(processor, data_dir, clips=CLIPS):
    return processor([load_audio(data_dir / clip) for clip in clips], return_tensors="pt").input_features


def test_upcycled_logits_equal_dense_logits(models, data_dir):
    dense, moe, processor = models
    features = _features(processor, data_dir)
    prompt = torch.tensor([dense.generation_config.decoder_start_token_id, 50362, 400, 523]).repeat(len(CLIPS), 1)
    with torch.no_grad():
        expected = dense(features, decoder_input_ids=prompt).logits
        actual = moe(features, decoder_input_ids=prompt).logits
    assert (actual - expected).abs().max().item() <= 1e-4


def test_upcycled_transcripts_equal_dense_and_reference(models, data_dir):
    dense, moe, processor = models
    features = _features(processor, data_dir)
    with torch.no_grad():
        dense_text = processor.batch_decode(dense.generate(features), skip_special_tokens=True)
        moe_text = processor.batch_decode(moe.generate(features), skip_special_tokens=True)
    assert moe_text == dense_text
    normalize = EnglishTextNormalizer({})  # no British spellings in this clip
    assert normalize(moe_text[0]) == normalize(JFK_TEXT)


def test_upcycled_model_has_eight_experts_top_two(models):
    _, moe, _ = models
    block = moe.model.decoder.layers[0].mlp
    assert block.experts.fc1_weight.shape[0] == 8 and block.router.top_k == 2
    torch.testing.assert_close(block.experts.fc1_weight[0], block.experts.fc1_weight[7])


def test_timestamps_and_long_form_generation(models, data_dir):
    _, moe, processor = models
    audio = load_audio(data_dir / "librispeech/longform/2033-164914_concat.flac")
    inputs = processor(audio, return_tensors="pt", truncation=False, padding="longest", return_attention_mask=True)
    assert inputs.input_features.shape[-1] > 3000  # longer than one 30 s window: sequential long-form decoding
    with torch.no_grad():
        out = moe.generate(**inputs, return_segments=True)  # no return_timestamps: long-form turns it on itself
    segments = out["segments"][0]
    assert len(segments) >= 4
    starts = [float(segment["start"]) for segment in segments]
    assert starts == sorted(starts) and float(segments[-1]["end"]) > 60.0
    text = processor.batch_decode(out["sequences"], skip_special_tokens=True)[0]
    assert len(text.split()) > 100


def test_prompt_ids_steer_decoding(models, data_dir):
    _, moe, processor = models
    features = _features(processor, data_dir, CLIPS[:1])
    prompt_ids = processor.get_prompt_ids("Kennedy's inaugural address.", return_tensors="pt")
    with torch.no_grad():
        ids = moe.generate(features, prompt_ids=prompt_ids)
    text = processor.batch_decode(ids, skip_special_tokens=True)[0]
    assert "country" in text and "inaugural" not in text.lower()  # the prompt conditions, it is not transcribed
