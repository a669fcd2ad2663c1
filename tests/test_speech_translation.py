"""Speech translation and language identification of the upcycled multilingual base, from its saved folder alone,
checked against faster-whisper running the same weights (the measurement on 80 sentences is
scripts/evaluate.py --tasks speech_translation)."""

import numpy as np
import pytest
from conftest import REPO_ROOT, run_without_package

pytestmark = pytest.mark.slow

FIXTURES = REPO_ROOT / "tests" / "fixtures"
# espeak-ng speech (see tests/fixtures/README.md): file, language code, language name, source words, English words
CLIPS = [
    ("espeak_de_guten_morgen.flac", "de", "german", "guten morgen", "good morning"),
    ("espeak_fr_cafe.flac", "fr", "french", "café", "coffee"),
]
WINDOW_SAMPLES = 30 * 16_000  # Whisper's 30 s window at 16 kHz
MIN_CHRF_AGREEMENT = 80.0  # identical outputs score 100; a punctuation or one-letter difference stays above 80

TRANSLATE_SCRIPT = """
from transformers import pipeline

folder, paths = sys.argv[1], sys.argv[2:]
asr = pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)
result = {"clips": []}
for path in paths:
    translated = asr(path, return_language=True, generate_kwargs={"task": "translate"})
    transcribed = asr(path, generate_kwargs={"task": "transcribe"})
    result["clips"].append(
        {"language": translated["chunks"][0]["language"], "translated": translated["text"],
         "transcribed": transcribed["text"]}
    )
"""


@pytest.fixture(scope="module")
def remote(base_moe, tmp_path_factory) -> dict:
    paths = [FIXTURES / name for name, *_ in CLIPS]
    return run_without_package(TRANSLATE_SCRIPT, base_moe, *paths, tmp_path=tmp_path_factory.mktemp("translate"))


@pytest.fixture(scope="module")
def faster_whisper_outputs() -> list[dict]:
    """faster-whisper's transcripts with the same weights and samples; the audio is padded to 30 s as transformers does
    (faster-whisper would otherwise pad the log-mel with zeros), so both encoders see the same input."""
    from faster_whisper import WhisperModel

    from modeling_whisper_moe.audio import load_audio
    from processing.convert_ct2 import bundled_checkpoint

    model = WhisperModel(str(bundled_checkpoint("base")), device="cpu", compute_type="float32")
    options = dict(beam_size=1, temperature=0.0, without_timestamps=True, vad_filter=False)
    outputs = []
    for name, *_ in CLIPS:
        audio = load_audio(FIXTURES / name)
        audio = np.pad(audio, (0, WINDOW_SAMPLES - len(audio)))
        segments, info = model.transcribe(audio, task="transcribe", **options)
        outputs.append({"language": info.language, "transcribed": "".join(s.text for s in segments)})
    return outputs


@pytest.mark.parametrize("index", range(len(CLIPS)), ids=[clip[1] for clip in CLIPS])
def test_folder_alone_detects_transcribes_and_translates(remote, index):
    _, _, language, source_words, english_words = CLIPS[index]
    clip = remote["clips"][index]
    assert remote["leaked"] == []
    assert clip["language"] == language
    assert source_words in clip["transcribed"].lower()
    assert english_words in clip["translated"].lower() and source_words not in clip["translated"].lower()


@pytest.mark.parametrize("index", range(len(CLIPS)), ids=[clip[1] for clip in CLIPS])
def test_language_and_transcript_agree_with_faster_whisper(remote, faster_whisper_outputs, index):
    """Compared where Whisper is confident (the spoken language and its transcript). Its translations of synthetic
    speech are low-confidence near-ties where float rounding picks a different word; the script measures those."""
    import sacrebleu

    ours, theirs = remote["clips"][index], faster_whisper_outputs[index]
    assert theirs["language"] == CLIPS[index][1]
    chrf = sacrebleu.sentence_chrf(ours["transcribed"].strip(), [theirs["transcribed"].strip()]).score
    assert chrf >= MIN_CHRF_AGREEMENT, (ours["transcribed"], theirs["transcribed"])
