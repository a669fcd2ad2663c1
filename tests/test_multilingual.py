"""Whisper's language and task handling survives upcycling: OpenAI's multilingual base, upcycled to 8x2."""

import pytest
from conftest import JFK_TEXT, run_without_package

from modeling_whisper_moe import WhisperMoEForConditionalGeneration, WhisperMoEProcessor

pytestmark = pytest.mark.slow


def _words(text: str) -> list[str]:
    return "".join(c for c in text.lower() if c.isalpha() or c == " ").split()


# Every check runs in the folder alone: in process the model is the same code, imported from the package
LANGUAGE_SCRIPT = """
from transformers import pipeline

folder, jfk = sys.argv[1], sys.argv[2]
asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
result = {
    "detected": [chunk["language"] for chunk in asr(jfk, return_language=True, return_timestamps=True)["chunks"]],
    "english": asr(jfk, generate_kwargs={"language": "en", "task": "transcribe"})["text"],
    "translated": asr(jfk, generate_kwargs={"task": "translate"})["text"],
    "french": asr(jfk, generate_kwargs={"language": "fr", "task": "transcribe"})["text"],
}
"""


def test_language_and_task_from_the_folder_alone(base_moe, data_dir, tmp_path):
    result = run_without_package(LANGUAGE_SCRIPT, base_moe, data_dir / "misc/jfk.flac", tmp_path=tmp_path)
    assert result["leaked"] == [] and set(result["detected"]) == {"english"}
    assert _words(result["english"]) == _words(JFK_TEXT)
    assert "your country" in result["translated"].lower()
    # forcing French makes Whisper write French: the language token reaches the decoder
    assert _words(result["french"]) != _words(result["english"])


def test_unknown_language_is_rejected_with_a_clear_error(base_moe, data_dir):
    processor = WhisperMoEProcessor.from_pretrained(base_moe)
    model = WhisperMoEForConditionalGeneration.from_pretrained(base_moe).eval()
    features = processor(str(data_dir / "misc/jfk.flac"), return_tensors="pt").input_features
    with pytest.raises(ValueError, match="klingon"):
        model.generate(features, language="klingon", max_new_tokens=5)
