"""processing.metrics on known strings and real token ids, and scripts/evaluate.py --tasks asr on real FSDD clips."""

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA_DIR, REPO_ROOT
from transformers import EvalPrediction

from processing.evaluation import asr
from processing.metrics import IGNORE_INDEX, english_normalizer, error_rates, make_compute_metrics

FSDD_MANIFEST = DATA_DIR / "fsdd" / "manifest.csv"
FSDD_TEST_CLIPS_PER_SPEAKER = 50  # 10 digits x indices 0-4


def _load_script() -> ModuleType:
    """scripts/evaluate.py as a module (scripts/ is not a package; the name avoids HF's `evaluate`)."""
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO_ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


evaluate = _load_script()


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------


def test_normalizer_maps_titles_numbers_and_punctuation():
    normalize = english_normalizer()
    assert normalize("Mr. Smith paid twenty-five dollars!") == "mister smith paid $25"
    assert normalize("Zero.") == normalize("0") == "0"
    assert normalize("Hello, World!") == "hello world"


def test_normalizer_reads_a_model_folders_spelling_map(tmp_path: Path):
    (tmp_path / "normalizer.json").write_text(json.dumps({"colour": "color"}), encoding="utf-8")
    normalize = english_normalizer(tmp_path)
    assert normalize("The Colour") == "the color"
    assert normalize.spelling_mapping_source == str(tmp_path / "normalizer.json")


def test_error_rates_of_a_known_substitution():
    rates = error_rates(["The cat sat on the mat."], ["the dog sat on the mat"], english_normalizer())
    assert rates["wer"] == pytest.approx(100 / 6)  # 1 of 6 words
    assert rates["cer"] == pytest.approx(100 * 3 / len("the cat sat on the mat"))


def test_error_rates_leave_out_empty_references_and_refuse_when_all_are():
    normalize = english_normalizer()
    assert error_rates(["hello world", "(laughs)"], ["hello world", "anything"], normalize)["wer"] == 0.0
    with pytest.raises(ValueError, match="empty after normalisation"):
        error_rates(["", "[noise] uh"], ["a", "b"], normalize)
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        error_rates(["a", "b"], ["a"], normalize)


def _padded(rows: list[list[int]]) -> np.ndarray:
    width = max(map(len, rows))
    return np.array([row + [IGNORE_INDEX] * (width - len(row)) for row in rows])


def test_compute_metrics_decodes_ids_padded_with_minus_100(tiny_en_dense: Path):
    from modeling_whisper_moe import WhisperMoEProcessor

    processor = WhisperMoEProcessor.from_pretrained(tiny_en_dense)
    tokenizer = processor.tokenizer
    labels = [tokenizer(text).input_ids for text in ["Mr. Smith paid twenty-five dollars.", "the cat sat on the mat"]]
    generated = [tokenizer(text).input_ids for text in ["mister smith paid $25", "the dog sat on the mat"]]
    prediction = EvalPrediction(predictions=_padded(generated), label_ids=_padded(labels))
    metrics = make_compute_metrics(tokenizer, english_normalizer(tiny_en_dense))(prediction)
    assert set(metrics) == {"wer", "cer"}
    assert metrics["wer"] == pytest.approx(100 / 10)  # one substitution in 4 + 6 reference words
    assert make_compute_metrics(processor, english_normalizer())(prediction) == metrics  # a processor works too


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py --tasks asr: data sources and errors
# ---------------------------------------------------------------------------------------------------------------


def test_manifest_filters_by_split_and_speaker():
    rows = asr.read_manifest(FSDD_MANIFEST)
    source = str(FSDD_MANIFEST)
    test_rows = asr.filter_rows(rows, source, "test", None, None)
    speakers = {row["speaker"] for row in test_rows}
    assert {row["split"] for row in test_rows} == {"test"}
    assert len(test_rows) == FSDD_TEST_CLIPS_PER_SPEAKER * len(speakers)
    jackson = asr.filter_rows(rows, source, "test", ["jackson"], None)
    assert len(jackson) == FSDD_TEST_CLIPS_PER_SPEAKER and {row["speaker"] for row in jackson} == {"jackson"}
    others = asr.filter_rows(rows, source, "test", None, ["jackson", "george"])
    assert len(others) == FSDD_TEST_CLIPS_PER_SPEAKER * (len(speakers) - 2)
    with pytest.raises(SystemExit, match="--split: validation not in .*available: test, train"):
        asr.filter_rows(rows, source, "validation", None, None)
    with pytest.raises(SystemExit, match="--speakers: nobody not in"):
        asr.filter_rows(rows, source, None, ["nobody"], None)


def test_bad_inputs_fail_naming_the_flag_and_file(tmp_path: Path):
    with pytest.raises(SystemExit, match=f"--manifest {tmp_path / 'missing.csv'}: file not found"):
        evaluate.main(["--tasks", "asr", "--model", str(tmp_path), "--manifest", str(tmp_path / "missing.csv")])
    with pytest.raises(SystemExit, match=f"--model {tmp_path}: no config.json"):
        evaluate.main(["--tasks", "asr", "--model", str(tmp_path), "--manifest", str(FSDD_MANIFEST)])


def test_dataset_source_reads_encoded_audio_columns(tmp_path: Path):
    """A Hub-style parquet folder; the audio column stays encoded and goes through the package's loader."""
    import datasets

    clips = ["0_george_0.wav", "1_jackson_0.wav", "2_lucas_0.wav"]
    features = datasets.Features(
        {"audio": datasets.Audio(), "transcription": datasets.Value("string"), "speaker": datasets.Value("string")}
    )
    table = pa.table(
        {
            "audio": [{"bytes": (DATA_DIR / "fsdd" / "recordings" / c).read_bytes(), "path": c} for c in clips],
            "transcription": ["zero", "one", "two"],
            "speaker": [c.split("_")[1] for c in clips],
        }
    ).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features.to_dict()}})})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet")
    args = evaluate.parse_args(
        [
            "--model",
            "unused",
            "--dataset_name",
            "parquet",
            "--data_dir",
            str(tmp_path),
            "--text_column",
            "transcription",
        ]
        + ["--exclude_speakers", "george"]
    )
    utts = asr.load_utterances(args)
    assert [(u.id, u.text) for u in utts] == [("1_jackson_0.wav", "one"), ("2_lucas_0.wav", "two")]
    assert all(u.audio.dtype == np.float32 and 0 < u.duration < 2 for u in utts)
    args.dataset_split = "validation"
    with pytest.raises(SystemExit, match="--dataset_split validation"):
        asr.load_utterances(args)


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py --tasks asr end to end
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_end_to_end_on_fsdd(tiny_en_dense: Path, tmp_path: Path, capsys):
    report_json, report_md = tmp_path / "out" / "fsdd.json", tmp_path / "out" / "fsdd.md"
    argv = ["--tasks", "asr", "--model", str(tiny_en_dense), "--manifest", str(FSDD_MANIFEST), "--split", "test"]
    argv += ["--limit", "5", "--latency_samples", "2"]
    argv += ["--output_json", str(report_json), "--output_md", str(report_md)]
    assert evaluate.main(argv) == 0

    report = json.loads(report_json.read_text(encoding="utf-8"))["reports"]["asr"]
    assert report["utterances"] == 5 and len(report["references"]) == 5
    assert report["filters"]["split"] == "test" and report["normalizer"]["spelling_mapping"]
    (result,) = report["results"]
    assert 0 <= result["wer"] <= 100 and result["cer"] >= 0
    assert result["scored_utterances"] == 5 and len(result["hypotheses"]) == 5
    assert result["rtf"] > 0 and result["throughput"] > 0 and result["audio_s"] > 0
    assert result["latency"]["samples"] == 2 and result["latency"]["mean_ms"] > 0 and result["latency"]["p90_ms"] > 0
    assert result["parameters"]["total"] == result["parameters"]["active"] > 0  # dense: every parameter is active
    flops = result["flops"]
    assert flops["encoder_gflops_per_window"] > 0 and flops["decoder_gflops_per_utterance"] > 0
    assert flops["gflops_per_audio_s"] > 0 and flops["mean_decoder_tokens"] >= 2  # prefix + end-of-text at least

    table = report_md.read_text(encoding="utf-8")
    assert table.startswith("| system | WER % |") and str(tiny_en_dense) in table
    assert table.strip() in capsys.readouterr().out
    assert not list(report_json.parent.glob("*.tmp"))  # the atomic writes left no temporary files behind


def test_a_lifelong_phase_is_scored_on_what_its_base_learnt_too(tmp_path):
    from processing.evaluation.common import TRAINING_RECORD, ModelRef

    def folder(name: str, tasks: dict, base: Path | None = None, mode: str = "lifelong") -> Path:
        path = tmp_path / name
        path.mkdir()
        record = {"tasks": tasks, "base": str(base) if base else None, "model": {"training_mode": mode}}
        (path / TRAINING_RECORD).write_text(json.dumps(record))
        return path

    digits = folder("digits", {"asr": {}}, base=tmp_path / "no-record", mode="full")
    text = folder("text", {"translation": {}}, base=digits)
    assert ModelRef(str(text), str(text)).trained_tasks() == ["asr", "translation"]
    plain = folder("plain", {"translation": {}}, base=digits, mode="attention")
    assert ModelRef(str(plain), str(plain)).trained_tasks() == ["translation"]
    unknown = folder("unknown", {"translation": {}}, base=tmp_path / "no-record")
    assert ModelRef(str(unknown), str(unknown)).trained_tasks() is None
