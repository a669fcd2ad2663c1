"""Text input and text translation: the encoder's text front-end, generation from text, the translation pipeline
from a saved folder, the text-pair data path and train.py on text pairs."""

import csv
import json

import pytest
import torch
from conftest import REPO_ROOT, TINY, TINY_FRAMES, run_without_package, tiny_moe, tiny_random_dense
from transformers import GenerationConfig
from transformers.masking_utils import create_bidirectional_mask

from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration, WhisperMoEProcessor
from processing.text_data import (
    TextPairCollator,
    copy_pairs,
    prepare_text_pairs,
    read_held_out_pairs,
    read_text_pairs,
    split_held_out,
)

# Language and task tokens for the tiny random vocabulary (ids below TINY's vocab_size of 96).
TINY_LANGUAGES = {"<|en|>": 80, "<|de|>": 81}
TINY_TASKS = {"transcribe": 82, "translate": 83}
TINY_NO_TIMESTAMPS = 84
TEXT_LEN = 7


def tiny_text_moe(seed: int = 0, **overrides) -> WhisperMoEForConditionalGeneration:
    model = tiny_moe(seed, text_frontend=True, max_text_positions=10, **overrides)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=TINY["decoder_start_token_id"],
        eos_token_id=TINY["eos_token_id"],
        pad_token_id=TINY["pad_token_id"],
        lang_to_id=TINY_LANGUAGES,
        task_to_id=TINY_TASKS,
        no_timestamps_token_id=TINY_NO_TIMESTAMPS,
        suppress_tokens=[],
    )
    return model


def _text_batch(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (batch, TEXT_LEN) and their mask; row i has TEXT_LEN - i real tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 80, (batch, TEXT_LEN), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, TEXT_LEN - row :] = 0
        ids[row, TEXT_LEN - row :] = TINY["pad_token_id"]
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------
# Model: text front-end, padding, generation
# ---------------------------------------------------------------------------------------------------------------


def test_text_encoder_output_has_the_encoder_width():
    model = tiny_text_moe()
    ids, mask = _text_batch()
    out = model.get_encoder()(input_ids=ids, attention_mask=mask, output_router_logits=True)
    assert out.last_hidden_state.shape == (3, TEXT_LEN, TINY["d_model"])
    assert torch.equal(out.attention_mask, mask)
    assert len(out.router_logits) == TINY["encoder_layers"]
    assert out.router_logits[0].shape == (3 * TEXT_LEN, model.config.num_experts)


def test_padding_changes_no_real_token_and_no_logit():
    model = tiny_text_moe()
    ids, mask = _text_batch()
    decoder_input_ids = torch.tensor([[3, 81, 82, 84, 10, 11]] * 3)
    batched = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input_ids)
    for row in range(3):
        length = int(mask[row].sum())
        alone = model(input_ids=ids[row : row + 1, :length], decoder_input_ids=decoder_input_ids[:1])
        torch.testing.assert_close(batched.logits[row], alone.logits[0], atol=1e-5, rtol=1e-5)
        encoder_row = batched.encoder_last_hidden_state[row, :length]
        torch.testing.assert_close(encoder_row, alone.encoder_last_hidden_state[0], atol=1e-5, rtol=1e-5)


def test_left_padding_equals_right_padding():
    encoder = tiny_text_moe().get_encoder()
    ids = torch.tensor([[5, 6, 7, 8]])
    right = encoder(input_ids=torch.tensor([[5, 6, 7, 8, 0, 0]]), attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]))
    left = encoder(input_ids=torch.tensor([[0, 0, 5, 6, 7, 8]]), attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]))
    alone = encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(right.last_hidden_state[:, :4], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left.last_hidden_state[:, 2:], alone, atol=1e-5, rtol=1e-5)


def test_padding_is_kept_out_of_the_encoder_router_losses():
    model = tiny_text_moe()
    ids, mask = _text_batch(batch=1)
    labels = torch.tensor([[81, 82, 84, 10, 11, 2]])
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    plain = model(input_ids=ids, attention_mask=mask, labels=labels)
    with_padding = model(input_ids=padded, attention_mask=padded_mask, labels=labels)
    torch.testing.assert_close(plain.encoder_aux_loss, with_padding.encoder_aux_loss)
    torch.testing.assert_close(plain.encoder_z_loss, with_padding.encoder_z_loss)
    torch.testing.assert_close(plain.loss, with_padding.loss)


def test_text_training_step_reaches_the_front_end():
    model = tiny_text_moe().train()
    ids, mask = _text_batch()
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([[81, 82, 84, 10, 2]] * 3)).loss.backward()
    encoder = model.model.encoder
    assert encoder.embed_text_tokens.weight.grad[ids[0, 0]].abs().sum() > 0
    assert encoder.embed_text_positions.weight.grad[0].abs().sum() > 0
    assert encoder.conv1.weight.grad is None  # the audio front-end takes no part


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_from_text_starts_with_the_target_prompt_and_ignores_padding(num_beams):
    model = tiny_text_moe()
    ids, mask = _text_batch()
    out = model.generate(input_ids=ids, attention_mask=mask, language="german", max_new_tokens=4, num_beams=num_beams)
    prompt = [TINY["decoder_start_token_id"], TINY_LANGUAGES["<|de|>"], TINY_TASKS["transcribe"], TINY_NO_TIMESTAMPS]
    assert out[:, :4].tolist() == [prompt] * 3
    assert out.shape[1] > 4
    assert not (out[:, 4:] > TINY_NO_TIMESTAMPS).any()  # timestamp tokens are suppressed for text
    for row in range(3):
        length = int(mask[row].sum())
        alone = model.generate(
            input_ids=ids[row : row + 1, :length], language="de", max_new_tokens=4, num_beams=num_beams
        )
        assert out[row, : alone.shape[1]].tolist() == alone[0].tolist()


def test_audio_generation_is_unchanged_by_a_text_front_end():
    plain = tiny_moe()
    with_text = tiny_moe().add_text_frontend(max_text_positions=8)
    features = torch.randn(2, TINY["num_mel_bins"], 2 * TINY["max_source_positions"])
    decoder_input_ids = torch.tensor([[3, 10, 11]] * 2)
    expected = plain(features, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(with_text(features, decoder_input_ids=decoder_input_ids).logits, expected)


def test_add_text_frontend_starts_from_rescaled_decoder_tokens_and_the_encoder_positions():
    model = tiny_moe().add_text_frontend(max_text_positions=8)
    encoder, decoder = model.model.encoder, model.model.decoder
    assert model.config.text_frontend and model.config.max_text_positions == 8
    tokens, source = encoder.embed_text_tokens.weight, decoder.embed_tokens.weight
    scale = tokens.norm() / source.norm()
    torch.testing.assert_close(tokens, source * scale)  # the decoder's embeddings, one factor apart
    positions = encoder.embed_text_positions.weight
    assert torch.equal(positions, encoder.embed_positions.weight[:8])  # the sinusoids the encoder layers read
    rms = lambda weight: weight.pow(2).mean().sqrt()  # noqa: E731
    torch.testing.assert_close(rms(tokens), rms(positions))  # token identity as loud as position
    assert tokens.data_ptr() != source.data_ptr()  # a copy, not tied


def test_text_runs_through_the_first_text_encoder_layers_only():
    model = tiny_text_moe(text_encoder_layers=1).eval()
    encoder = model.get_encoder()
    ids, mask = _text_batch()
    hidden = encoder.embed_text(ids, mask)
    bidirectional = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)
    expected = encoder.layer_norm(encoder.layers[0](hidden, bidirectional))
    output = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(output, expected)
    with torch.no_grad():  # the later layers no longer touch text ...
        for parameter in encoder.layers[1].parameters():
            parameter.add_(1.0)
    torch.testing.assert_close(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, output)
    all_layers = tiny_text_moe().eval()  # ... which they do by default
    assert not torch.allclose(all_layers.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state, output)


def test_bad_text_inputs_and_settings_raise_clearly():
    with pytest.raises(ValueError, match="max_text_positions"):
        WhisperMoEConfig(**TINY, max_text_positions=0)
    ids, mask = _text_batch()
    with pytest.raises(ValueError, match="text front-end"):
        tiny_moe().get_encoder()(input_ids=ids)
    model = tiny_text_moe()
    with pytest.raises(ValueError, match="not both"):
        model.get_encoder()(input_features=torch.zeros(1, TINY["num_mel_bins"], 24), input_ids=ids)
    with pytest.raises(ValueError, match="max_text_positions=10"):
        model.get_encoder()(input_ids=torch.ones(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="already has a text front-end"):
        model.add_text_frontend()
    with pytest.raises(ValueError, match="between 1 and the encoder's 12"):
        tiny_moe().add_text_frontend(max_text_positions=13)
    with pytest.raises(ValueError, match="text_encoder_layers must be between 1 and encoder_layers=2, got 3"):
        tiny_moe().add_text_frontend(max_text_positions=8, text_encoder_layers=3)
    with pytest.raises(ValueError, match="text_encoder_layers must be between 1 and encoder_layers=2, got 0"):
        WhisperMoEConfig(**TINY, text_encoder_layers=0)
    with pytest.raises(ValueError, match="Unknown language 'klingon'.*de, en"):
        model.generate(input_ids=ids, attention_mask=mask, language="klingon")
    with pytest.raises(ValueError, match="language='de'"):
        model.generate(input_ids=ids, attention_mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Saved folder: the translation pipeline with the package not importable
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_translation_folder(tiny_en_dense, tmp_path_factory):
    """Random 2-layer weights of width 32 with tiny.en's tokenizer, German and English language tokens, and a text
    front-end: the real text path at unit-test speed."""
    processor = WhisperMoEProcessor.from_pretrained(tiny_en_dense)
    dense = tiny_random_dense(tiny_en_dense)
    tokens = ("<|en|>", "<|de|>")
    dense.generation_config.lang_to_id = dict(zip(tokens, processor.tokenizer.convert_tokens_to_ids(tokens)))
    model = WhisperMoEForConditionalGeneration.from_dense(
        dense, num_experts=4, num_experts_per_tok=2, text_frontend=True, max_text_positions=32
    )
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-translation"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


TRANSLATE_SCRIPT = """
from transformers import pipeline

folder = sys.argv[1]
translator = pipeline("translation", model=folder, trust_remote_code=True)
one = translator("Hello world", src_lang="en", tgt_lang="de", max_new_tokens=4)
many = translator(["Hello world", "How are you today?"], src_lang="english", tgt_lang="de", max_new_tokens=4,
                  batch_size=2)
errors = {}
for name, call in (("language", lambda: translator("Hi", src_lang="en", tgt_lang="xx")),
                   ("missing_target", lambda: translator("Hi", src_lang="en")),
                   ("empty", lambda: translator("  ", src_lang="en", tgt_lang="de"))):
    try:
        call()
    except ValueError as error:
        errors[name] = str(error)
asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
result = {"pipeline": type(translator).__name__, "one": one, "many": many, "errors": errors,
          "asr": type(asr).__name__}
"""


@pytest.fixture(scope="module")
def remote_translation(tiny_translation_folder, tmp_path_factory):
    return run_without_package(TRANSLATE_SCRIPT, tiny_translation_folder, tmp_path=tmp_path_factory.mktemp("remote"))


def test_translation_pipeline_runs_from_the_folder_alone(remote_translation, tiny_translation_folder):
    assert remote_translation["leaked"] == []
    assert remote_translation["pipeline"] == "WhisperMoETranslationPipeline"
    assert remote_translation["asr"] == "WhisperMoEASRPipeline"  # both custom pipelines were saved
    config = json.loads((tiny_translation_folder / "config.json").read_text())
    assert set(config["custom_pipelines"]) >= {"translation", "automatic-speech-recognition"}
    assert (tiny_translation_folder / "pipeline_translation.py").is_file()


def test_remote_translation_matches_generate_in_process(remote_translation, tiny_translation_folder):
    from transformers import pipeline

    model = WhisperMoEForConditionalGeneration.from_pretrained(tiny_translation_folder).eval()
    tokenizer = WhisperMoEProcessor.from_pretrained(tiny_translation_folder).tokenizer
    source = [
        tokenizer.convert_tokens_to_ids("<|en|>"),
        *tokenizer(" Hello world", add_special_tokens=False).input_ids,
    ]
    ids = model.generate(input_ids=torch.tensor([source]), language="de", max_new_tokens=4)
    expected = tokenizer.decode(ids[0], skip_special_tokens=True).strip()
    assert remote_translation["one"] == [{"translation_text": expected}]
    assert remote_translation["many"][0] == {"translation_text": expected}  # batched with a longer sentence
    assert len(remote_translation["many"]) == 2
    local = pipeline("translation", model=str(tiny_translation_folder), trust_remote_code=True)
    assert local("Hello world", src_lang="en", tgt_lang="de", max_new_tokens=4) == remote_translation["one"]


def test_remote_translation_errors_name_the_problem(remote_translation):
    errors = remote_translation["errors"]
    assert "Unknown language 'xx'" in errors["language"] and "de, en" in errors["language"]
    assert "tgt_lang" in errors["missing_target"]
    assert "non-empty" in errors["empty"]


def test_translation_pipeline_refuses_a_model_without_text_frontend(tiny_random_moe):
    from transformers import pipeline

    with pytest.raises(ValueError, match="no text front-end"):
        pipeline("translation", model=str(tiny_random_moe), trust_remote_code=True)


# ---------------------------------------------------------------------------------------------------------------
# Data and training
# ---------------------------------------------------------------------------------------------------------------


def _write_pairs(path, count: int, duplicate_of: int | None = None) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "en", "de"])
        for index in range(count):
            writer.writerow([f"pair-{index:03d}", f"Tom has {index} apples.", f"Tom hat {index} Äpfel."])
        if duplicate_of is not None:  # a second translation of an existing English sentence
            writer.writerow(["pair-dup", f"Tom has {duplicate_of} apples.", f"Tom besitzt {duplicate_of} Äpfel."])


def test_held_out_split_is_deterministic_and_shares_no_sentence_with_training(tmp_path):
    _write_pairs(tmp_path / "pairs.csv", 40, duplicate_of=7)
    pairs = read_text_pairs(tmp_path / "pairs.csv", "en", "de")
    train, held_out = split_held_out(pairs, 10, seed=3)
    shuffled = pairs.shuffle(seed=1)
    assert sorted(split_held_out(shuffled, 10, seed=3)[1]["id"]) == sorted(held_out["id"])  # order-independent
    assert sorted(split_held_out(pairs, 10, seed=4)[1]["id"]) != sorted(held_out["id"])
    assert len(held_out) == 10 and not set(train["id"]) & set(held_out["id"])
    assert not (set(train["source"]) | set(train["target"])) & (set(held_out["source"]) | set(held_out["target"]))
    assert len(train) + len(held_out) in (40, 41)  # the duplicate goes only when its twin is held out


def test_copy_pairs_copy_a_share_of_the_training_sources(tmp_path):
    _write_pairs(tmp_path / "pairs.csv", 40)
    train, held_out = split_held_out(read_text_pairs(tmp_path / "pairs.csv", "en", "de"), 10, seed=3)
    copies = copy_pairs(train, 0.25, seed=0)
    assert len(copies) == round(0.25 * len(train)) and copies["source"] == copies["target"]
    assert set(copies["source"]) <= set(train["source"]) and not set(copies["source"]) & set(held_out["source"])
    assert all(pair_id.endswith("#copy") for pair_id in copies["id"])
    assert copies["id"] == copy_pairs(train, 0.25, seed=0)["id"] != copy_pairs(train, 0.25, seed=1)["id"]
    with pytest.raises(ValueError, match="copy fraction must be in"):
        copy_pairs(train, 1.5, seed=0)


def test_held_out_pairs_come_back_in_record_order_from_a_relative_csv(tmp_path):
    _write_pairs(tmp_path / "pairs.csv", 10)
    record = {"csv": "pairs.csv", "source_column": "en", "target_column": "de", "ids": ["pair-007", "pair-002"]}
    pairs = read_held_out_pairs(record, base_dir=tmp_path)  # "pairs.csv" is not in the working directory
    assert list(pairs["id"]) == ["pair-007", "pair-002"] and pairs[0]["source"] == "Tom has 7 apples."
    assert list(read_held_out_pairs(record, base_dir=tmp_path, limit=1)["id"]) == ["pair-007"]
    with pytest.raises(ValueError, match="1 held-out ids are not in .*'pair-404'"):
        read_held_out_pairs({**record, "ids": ["pair-001", "pair-404"]}, base_dir=tmp_path)


def test_text_pair_errors_name_the_problem(tmp_path):
    _write_pairs(tmp_path / "pairs.csv", 5)
    with pytest.raises(ValueError, match=r"no column \['fr'\]"):
        read_text_pairs(tmp_path / "pairs.csv", "en", "fr")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_text_pairs(tmp_path / "missing.csv", "en", "de")
    with pytest.raises(ValueError, match="held_out_size must be between 1 and 4"):
        split_held_out(read_text_pairs(tmp_path / "pairs.csv", "en", "de"), 5, seed=0)


def test_prepared_pairs_and_collator(tiny_translation_folder, tmp_path):
    _write_pairs(tmp_path / "pairs.csv", 3)
    model = WhisperMoEForConditionalGeneration.from_pretrained(tiny_translation_folder)
    tokenizer = WhisperMoEProcessor.from_pretrained(tiny_translation_folder).tokenizer
    pairs = read_text_pairs(tmp_path / "pairs.csv", "en", "de")
    prepared = prepare_text_pairs(pairs, tokenizer, model.generation_config, "en", "de", 32, 32)
    first = prepared[0]
    assert tokenizer.decode(first["input_ids"]) == "<|en|> Tom has 0 apples."
    assert tokenizer.decode(first["labels"]) == "<|de|><|transcribe|><|notimestamps|> Tom hat 0 Äpfel.<|endoftext|>"
    batch = TextPairCollator(model.config.pad_token_id)([prepared[0], prepared[2]])
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["labels"].shape[0] == 2
    assert model(**batch).loss.isfinite()
    with pytest.raises(ValueError, match="No pair fits"):
        prepare_text_pairs(pairs, tokenizer, model.generation_config, "en", "de", 3, 32)


def test_train_script_on_text_pairs_writes_a_translating_folder(tiny_translation_folder, tmp_path):
    from processing import train

    _write_pairs(tmp_path / "pairs.csv", 24)
    out = tmp_path / "out"
    recipe = REPO_ROOT / "configuration" / "recipes" / "text-translation-en-de.json"
    metrics = train.main([str(recipe), "--model_name_or_path", str(tiny_translation_folder),
                          "--text_pairs_csv", str(tmp_path / "pairs.csv"), "--held_out_size", "4",
                          "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
                          "--max_eval_samples", "4"])  # fmt: skip
    assert "eval_loss" in metrics
    held_out = json.loads((out / "held_out_ids.json").read_text())
    assert len(held_out["ids"]) == 4 and held_out["src_lang"] == "en" and held_out["tgt_lang"] == "de"
    config = json.loads((out / "config.json").read_text())
    assert config["text_frontend"] and "translation" in config["custom_pipelines"]
    assert config["text_encoder_layers"] == 2  # the recipe's depth, set on the folder's trained front-end
    record = json.loads((out / "training_record.json").read_text())
    assert record["hyperparameters"]["training_mode"] == "attention"
    from transformers import pipeline

    translated = pipeline("translation", model=str(out), trust_remote_code=True)(
        "Tom has 3 apples.", src_lang="en", tgt_lang="de", max_new_tokens=3
    )
    assert isinstance(translated[0]["translation_text"], str)


@pytest.mark.slow
def test_lifelong_translation_phase_trains_only_its_part_and_replays_no_held_out_audio(
    tiny_translation_folder, data_dir, tmp_path
):
    """The lifelong en->de recipe on a speech model: translation batches and batches of replayed speech
    pseudo-labelled by the model itself (no test-split clip, no held-out speaker); everything older is unchanged."""
    from safetensors.torch import load_file

    from processing import train

    _write_pairs(tmp_path / "pairs.csv", 24)
    out = tmp_path / "out"
    recipe = REPO_ROOT / "configuration" / "recipes" / "lifelong-translation-en-de.json"
    manifest = data_dir / "fsdd" / "manifest.csv"
    train.main([str(recipe), "--model_name_or_path", str(tiny_translation_folder), "--text_pairs_csv",
                str(tmp_path / "pairs.csv"), "--held_out_size", "4", "--output_dir", str(out), "--max_steps", "4",
                "--per_device_train_batch_size", "2", "--max_eval_samples", "4", "--replay_manifest", str(manifest),
                "--replay_max_per_manifest", "3", "--save_strategy", "no",
                "--generation_max_length", "8"])  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert [phase["num_experts"] for phase in config["expert_growth"]] == [2]
    rows = {str((manifest.parent / row["path"]).resolve()): row for row in csv.DictReader(open(manifest))}
    replayed = [row["path"] for row in csv.DictReader(open(out / "replay_pseudo_labels.csv"))]
    assert len(replayed) == 3 and all(
        rows[p]["split"] == "train" and rows[p]["speaker"] != "yweweler" for p in replayed
    )
    before, after = load_file(tiny_translation_folder / "model.safetensors"), load_file(out / "model.safetensors")
    changed = [name for name, tensor in before.items() if not torch.equal(after[name][: tensor.shape[0]], tensor)]
    assert changed and all("embed_text" in name for name in changed)  # old experts, routers, attention: as they were
    assert any(not torch.equal(after[n][4:], torch.zeros_like(after[n][4:])) for n in after if "fc2_weight" in n)


def test_an_english_only_checkpoint_learns_language_tokens_for_text_output_only(tiny_en_dense, base_moe, tmp_path):
    """tiny.en's vocabulary has <|de|> but its generation config lists no language (listing one would make
    audio generate() detect languages): a text task adds the ones it writes to text_lang_to_id, which survives
    saving; an English-only model still refuses languages for audio; multilingual configs are left alone."""
    from transformers import AutoTokenizer

    from modeling_whisper_moe.generation_whisper_moe import text_decoder_prompt
    from processing.tasks.translation import add_text_languages

    tokenizer = AutoTokenizer.from_pretrained(tiny_en_dense)
    config = GenerationConfig.from_pretrained(tiny_en_dense)
    with pytest.raises(ValueError, match="English-only"):
        text_decoder_prompt(config, "de")
    add_text_languages(config, tokenizer, ("en", "german"))
    config.save_pretrained(tmp_path)
    reloaded = GenerationConfig.from_pretrained(tmp_path)
    de, en = tokenizer.convert_tokens_to_ids(["<|de|>", "<|en|>"])
    assert reloaded.text_lang_to_id == {"<|de|>": de, "<|en|>": en} and not getattr(reloaded, "lang_to_id", None)
    assert text_decoder_prompt(reloaded, "de")[:2] == [reloaded.decoder_start_token_id, de]
    with pytest.raises(ValueError, match="no <\\|xx\\|> token"):
        add_text_languages(config, tokenizer, ("xx",))
    multilingual = GenerationConfig.from_pretrained(base_moe)
    before = multilingual.to_dict()
    add_text_languages(multilingual, AutoTokenizer.from_pretrained(base_moe), ("de",))
    assert multilingual.to_dict() == before
    with pytest.raises(ValueError, match="English-only"):
        features = torch.zeros(1, TINY["num_mel_bins"], TINY_FRAMES)
        tiny_moe().generate(features, generation_config=reloaded, language="de")
