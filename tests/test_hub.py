"""The saved folder is a self-contained Hub repo: it loads and transcribes in a fresh interpreter that cannot import
this package, through `pipeline(..., trust_remote_code=True)` and the Auto classes."""

import csv
import json
import shutil
import sys
import textwrap

import pytest
from conftest import JFK_TEXT, run_without_package, tiny_moe

from processing.metrics import english_normalizer, error_rates

pytestmark = pytest.mark.slow

# Runs where the package cannot be imported (see conftest.run_without_package): only the folder's code can answer.
REMOTE_SCRIPT = textwrap.dedent(
    """
    from transformers import AutoModel, AutoModelForSpeechSeq2Seq, AutoProcessor, pipeline

    folder, data = sys.argv[1], sys.argv[2]
    asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
    jfk = data + "/misc/jfk.flac"
    result = {
        "pipeline": type(asr).__name__,
        "model_module": type(asr.model).__module__,
        "text": asr(jfk)["text"],
        "m4a": asr(data + "/misc/jfk.m4a")["text"],
        "chunks": asr(jfk, return_timestamps=True)["chunks"],
        "batch": [r["text"] for r in asr([jfk, data + "/librispeech/test-clean/1089-134686-0002.wav"], batch_size=2)],
        "long": asr(data + "/librispeech/longform/367-130732_concat.flac", chunk_length_s=30, batch_size=2,
                    ignore_warning=True),
    }
    # over 30 s with no options: long-form decoding picked by itself; whole windows of silence are skipped
    import numpy as np
    import soundfile

    speech, rate = soundfile.read(jfk)  # (frames, 2) at 44.1 kHz
    rng = np.random.default_rng(0)
    hiss = rng.normal(0.0, 1e-3, (95 * rate, 2))
    result["silence"] = [asr({"raw": np.zeros(95 * 16000), "sampling_rate": 16000})["text"],
                         asr({"raw": hiss, "sampling_rate": rate})["text"]]
    then_speech = asr({"raw": np.concatenate([hiss[: 32 * rate], speech]), "sampling_rate": rate},
                      return_timestamps=True)
    result["silence_then_speech"] = [then_speech["text"], then_speech["chunks"][0]["timestamp"][0]]
    errors = {}
    for name, bad in (("missing", data + "/misc/no-such-file.wav"), ("corrupt", b"RIFF0000WAVEnot audio at all")):
        try:
            asr(bad)
        except Exception as error:
            errors[name] = [type(error).__name__, str(error)]
    result["errors"] = errors
    model = AutoModelForSpeechSeq2Seq.from_pretrained(folder, trust_remote_code=True)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    result["auto"] = [type(model).__name__, type(base).__name__, type(processor).__name__]
    """
)


@pytest.fixture(scope="module")
def remote(tiny_en_moe, data_dir, tmp_path_factory) -> dict:
    return run_without_package(REMOTE_SCRIPT, tiny_en_moe, data_dir, tmp_path=tmp_path_factory.mktemp("remote"))


def test_folder_holds_code_auto_map_pipeline_and_card(tiny_en_moe):
    config = json.loads((tiny_en_moe / "config.json").read_text())
    assert config["model_type"] == "whisper_moe"
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForSpeechSeq2Seq", "AutoProcessor"}
    impl = config["custom_pipelines"]["automatic-speech-recognition"]["impl"]
    assert (tiny_en_moe / f"{impl.split('.')[0]}.py").is_file()
    for module in {entry.split(".")[0] for entry in config["auto_map"].values()}:
        assert (tiny_en_moe / f"{module}.py").is_file()
    card = (tiny_en_moe / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: automatic-speech-recognition" in card
    assert "2 of 8 experts" in card and "trust_remote_code=True" in card
    assert not [p.name for p in tiny_en_moe.parent.iterdir() if p.name.endswith(".tmp")]


def test_pipeline_runs_from_the_folder_alone(remote):
    assert remote["leaked"] == []
    assert remote["pipeline"] == "WhisperMoEASRPipeline"
    assert remote["model_module"].startswith("transformers_modules")
    assert remote["auto"] == ["WhisperMoEForConditionalGeneration", "WhisperMoEModel", "WhisperMoEProcessor"]


def test_remote_pipeline_transcribes(remote, data_dir):
    words = lambda text: "".join(c for c in text.lower() if c.isalpha() or c == " ").split()  # noqa: E731
    assert words(remote["text"]) == words(JFK_TEXT)
    assert words(remote["m4a"]) == words(JFK_TEXT)
    assert remote["batch"][0] == remote["text"]
    assert "yellow lamps" in remote["batch"][1].lower()
    # 78 s of speech, chunked into 30 s windows and stitched by their timestamps, which the call did not ask for (by
    # overlapping token runs instead, a third of the words went missing: WER 39.6)
    assert set(remote["long"]) == {"text"}
    with open(data_dir / "librispeech/longform/manifest.csv", newline="") as manifest:
        reference = next(row["text"] for row in csv.DictReader(manifest) if row["path"] == "367-130732_concat.flac")
    assert error_rates([reference], [remote["long"]["text"]], english_normalizer())["wer"] < 30


def test_remote_pipeline_takes_long_audio_and_silence_without_options(remote):
    words = lambda text: "".join(c for c in text.lower() if c.isalpha() or c == " ").split()  # noqa: E731
    zeros, hiss = remote["silence"]  # 95 s of digital silence, and of hiss
    assert zeros == "" and words(hiss) == []  # no "you you you": at most punctuation
    text, first_start = remote["silence_then_speech"]
    assert words(text) == words(JFK_TEXT)  # 32 s of hiss, then the 11 s clip: only the speech is transcribed
    assert 30.0 <= first_start <= 33.0


def test_remote_pipeline_timestamps(remote):
    chunks = remote["chunks"]
    assert len(chunks) >= 1
    starts = [chunk["timestamp"][0] for chunk in chunks]
    assert starts[0] == 0.0 and starts == sorted(starts)
    assert 9.0 < chunks[-1]["timestamp"][1] <= 11.5  # the clip is 11 s long


def test_remote_pipeline_bad_audio_raises_clearly(remote):
    missing_type, missing_message = remote["errors"]["missing"]
    assert missing_type == "FileNotFoundError" and "no-such-file.wav" in missing_message
    corrupt_type, corrupt_message = remote["errors"]["corrupt"]
    assert corrupt_type == "AudioDecodeError" and "decode" in corrupt_message.lower()


# Files of any lengths in one batch: short clips beside long recordings (five consecutive LJSpeech sentences, 34.5 s,
# and 32 s of hiss before the JFK clip), each file's text as at batch 1.
MIXED_BATCH_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import soundfile
    from transformers import pipeline

    folder, data = sys.argv[1], sys.argv[2]
    asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
    sentences = [soundfile.read(data + f"/ljspeech/wavs/LJ001-000{index}.wav") for index in range(1, 6)]
    speech, speech_rate = np.concatenate([samples for samples, _ in sentences]), sentences[0][1]
    jfk, rate = soundfile.read(data + "/misc/jfk.flac")
    hiss = np.random.default_rng(0).normal(0.0, 1e-3, (32 * rate, 2))
    files = [
        lambda: data + "/librispeech/test-other/1688/142285/1688-142285-0002.flac",
        lambda: {"raw": speech, "sampling_rate": speech_rate},
        lambda: data + "/misc/jfk.flac",
        lambda: {"raw": np.concatenate([hiss, jfk]), "sampling_rate": rate},
    ]
    result = {
        "seconds": [len(speech) / speech_rate, len(hiss) / rate + len(jfk) / rate],
        "one_by_one": [asr(file())["text"] for file in files],
        "batched": [output["text"] for output in asr([file() for file in files], batch_size=len(files))],
    }
    """
)


@pytest.fixture(scope="module")
def mixed_batch(tiny_en_moe, data_dir, tmp_path_factory) -> dict:
    return run_without_package(MIXED_BATCH_SCRIPT, tiny_en_moe, data_dir, tmp_path=tmp_path_factory.mktemp("mixed"))


def test_remote_pipeline_batches_clips_with_long_files(mixed_batch):
    assert all(seconds > 30 for seconds in mixed_batch["seconds"])  # two files need long-form decoding
    assert mixed_batch["leaked"] == []
    one_by_one = mixed_batch["one_by_one"]
    assert "silly" in one_by_one[0].lower() and "printing" in one_by_one[1].lower() and "country" in one_by_one[3]
    assert mixed_batch["batched"] == one_by_one


# A custom pipeline of someone else's, registered and saved into the same folder the transformers way.
TOKEN_COUNT_PIPELINE = textwrap.dedent(
    """
    from transformers import Pipeline


    class TokenCountPipeline(Pipeline):
        _load_tokenizer = True
        _load_processor = _load_feature_extractor = _load_image_processor = False

        def _sanitize_parameters(self, **kwargs):
            return {}, {}, {}

        def preprocess(self, text):
            return {"input_ids": self.tokenizer(text, return_tensors="pt").input_ids}

        def _forward(self, model_inputs):
            return model_inputs

        def postprocess(self, model_outputs):
            return {"tokens": int(model_outputs["input_ids"].shape[-1])}
    """
)

BOTH_PIPELINES_SCRIPT = textwrap.dedent(
    """
    from transformers import pipeline

    folder, jfk = sys.argv[1], sys.argv[2]
    asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
    counter = pipeline("token-count", model=folder, trust_remote_code=True)
    result = {
        "asr": [type(asr).__name__, len(asr(jfk)["text"]) > 0],
        "token-count": [type(counter).__name__, counter("hello world")["tokens"]],
    }
    """
)


@pytest.fixture()
def token_count_pipeline(tmp_path, monkeypatch):
    """A pipeline class defined in its own module file and registered as task "token-count" for this test only."""
    import importlib

    from transformers import AutoModelForSpeechSeq2Seq
    from transformers.pipelines import PIPELINE_REGISTRY

    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "token_count_pipeline.py").write_text(TOKEN_COUNT_PIPELINE)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    module = importlib.import_module("token_count_pipeline")
    PIPELINE_REGISTRY.register_pipeline(
        "token-count", pipeline_class=module.TokenCountPipeline, pt_model=AutoModelForSpeechSeq2Seq
    )
    yield module.TokenCountPipeline
    PIPELINE_REGISTRY.supported_tasks.pop("token-count")
    monkeypatch.delitem(sys.modules, "token_count_pipeline")


def test_custom_pipelines_are_merged_across_saves(tiny_random_moe, token_count_pipeline, data_dir, tmp_path):
    from transformers import AutoTokenizer

    from modeling_whisper_moe import WhisperMoEForConditionalGeneration

    folder = tmp_path / "folder"
    shutil.copytree(tiny_random_moe, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # transformers' Pipeline.save_pretrained replaces config.custom_pipelines with its own task before saving
    model = WhisperMoEForConditionalGeneration.from_pretrained(folder)
    counter = token_count_pipeline(model=model, tokenizer=tokenizer)
    counter.save_pretrained(folder)
    after_pipeline = json.loads((folder / "config.json").read_text())["custom_pipelines"]
    # a model that never heard of "token-count" is saved into the same folder twice
    for _ in range(2):
        WhisperMoEForConditionalGeneration.from_pretrained(tiny_random_moe).save_pretrained(folder)
    after_model = json.loads((folder / "config.json").read_text())["custom_pipelines"]

    assert set(after_pipeline) >= {"automatic-speech-recognition", "token-count"}
    assert after_model == after_pipeline
    assert after_model["token-count"]["impl"] == "token_count_pipeline.TokenCountPipeline"
    assert (folder / "token_count_pipeline.py").is_file()

    remote = run_without_package(BOTH_PIPELINES_SCRIPT, folder, data_dir / "misc/jfk.flac", tmp_path=tmp_path)
    assert remote["leaked"] == []
    assert remote["asr"] == ["WhisperMoEASRPipeline", True]
    assert remote["token-count"] == ["TokenCountPipeline", len(tokenizer("hello world").input_ids)]


def test_saving_into_a_folder_with_a_corrupt_config_names_it(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        tiny_moe().save_pretrained(tmp_path)
    assert (tmp_path / "config.json").read_text() == "{not json"


def test_a_new_folder_gets_the_usual_permissions_not_the_staging_ones(tmp_path):
    import os

    from modeling_whisper_moe.hub import atomic_directory

    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "new") as staging:
            (staging / "file.txt").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o755
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new.")]  # no staging folder left behind


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_gives_the_umask_permissions_and_cleans_up_on_error(tmp_path, umask):
    import os

    import numpy as np

    from modeling_whisper_moe.hub import atomic_write
    from modeling_whisper_moe.pipeline_text_to_audio import write_audio

    previous = os.umask(umask)
    try:
        with atomic_write(tmp_path / "sub" / "report.json") as temporary:
            assert temporary.parent == tmp_path / "sub" and temporary.suffix == ".json"
            temporary.write_text("{}")
        # the text-to-speech pipeline's writer once left files 0600 (mkstemp's mode)
        speech = write_audio(tmp_path / "speech.wav", np.zeros(160, dtype=np.float32))
    finally:
        os.umask(previous)
    for path in (tmp_path / "sub" / "report.json", speech):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(tmp_path / "sub" / "report.json") as temporary:
            temporary.write_text("half")
            raise RuntimeError("disk full")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["report.json"]
    assert (tmp_path / "sub" / "report.json").read_text() == "{}"
