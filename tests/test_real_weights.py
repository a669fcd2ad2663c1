"""Behaviour on OpenAI's real tiny.en weights and real speech: upcycling is exact, transcripts are right."""

import csv

import pytest
import torch
from conftest import JFK_TEXT
from transformers import WhisperForConditionalGeneration
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from modeling_whisper_moe import WhisperMoEForConditionalGeneration, WhisperMoEProcessor, load_audio
from modeling_whisper_moe.generation_whisper_moe import LOOP_WINDOW, LoopStop, looping_rows

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


def test_a_decoding_loop_ends_but_speech_does_not(models, data_dir):
    # the loop tiny.en wrote at beam 5 in a 30 s window of LibriSpeech 367-130732 cut mid-word, against the real
    # transcripts of long LibriSpeech recordings, every 48-token window of them
    tokenizer = models[2].tokenizer
    loop = tokenizer(" It was here that loves to" + " f**k" * 8 + " f**king" * 9, add_special_tokens=False).input_ids
    with open(data_dir / "librispeech/longform/manifest.csv", newline="") as manifest:
        speech = [tokenizer(" " + row["text"].capitalize(), add_special_tokens=False).input_ids
                  for row in csv.DictReader(manifest)]  # fmt: skip
    windows = torch.cat([torch.tensor(ids).unfold(0, LOOP_WINDOW, 1) for ids in speech])
    assert len(windows) > 900 and not looping_rows(windows).any()
    rows = torch.tensor([loop[-LOOP_WINDOW - 6 :], speech[0][: LOOP_WINDOW + 6]])
    assert looping_rows(rows).tolist() == [True, False]
    eos = tokenizer.eos_token_id
    scores = torch.randn(2, len(tokenizer))
    stopped = LoopStop(begin_index=2, eos_token_id=eos)(rows, scores.clone())
    assert stopped[0].argmax() == eos and torch.isinf(stopped[0]).sum() == len(tokenizer) - 1
    assert torch.equal(stopped[1], scores[1])  # speech decodes on untouched
    assert not looping_rows(rows[:, : LOOP_WINDOW - 1]).any()  # too short to tell


def test_beam_search_decodes_as_with_every_cache_reordered(models, data_dir, monkeypatch):
    # WhisperMoE's beam search leaves the cross-attention caches in place (each input's beams share them)
    _, moe, processor = models
    features = _features(processor, data_dir)
    options = dict(num_beams=4, max_new_tokens=24, return_dict_in_generate=True)
    ours = moe.generate(features, **options)
    cache_class = type(ours.past_key_values)

    def reorder_everything(self, cache, beam_idx):  # transformers' own: self- and cross-attention caches alike
        assert isinstance(cache, cache_class)
        cache.reorder_cache(beam_idx)
        return cache

    monkeypatch.setattr(type(moe), "_reorder_cache", reorder_everything)
    everything = moe.generate(features, **options)
    assert torch.equal(ours.sequences, everything.sequences)
    torch.testing.assert_close(ours.sequences_scores, everything.sequences_scores)
    assert processor.batch_decode(ours.sequences, skip_special_tokens=True)[0].strip().startswith("And so")
