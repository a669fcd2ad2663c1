"""The Gradio demo (scripts/app.py) in a real browser: headless Debian Chromium driven by Playwright uploads jfk.flac
and reads the transcript back. The app runs where this package cannot be imported, as it would in a Hub Space."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import JFK_TEXT, REPO_ROOT

from processing.isolation import blocking_preamble

pytestmark = pytest.mark.slow

APP = REPO_ROOT / "scripts" / "app.py"
CHROMIUM = "/usr/bin/chromium"  # Debian's chromium package; Playwright downloads no browser
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Waits (not assertions on speed): a busy 2-core CI runner may take minutes to load the model and decode.
STARTUP_WAIT_S = 600
RESULT_WAIT_MS = 600_000


def _words(text: str) -> list[str]:
    return "".join(c for c in text.lower() if c.isalpha() or c == " ").split()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_WAIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the app exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    pytest.fail(f"the app did not serve {url} within {STARTUP_WAIT_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def app_url(tiny_en_moe, tmp_path_factory):
    """scripts/app.py serving the upcycled tiny.en on a free localhost port, the package blocked from import."""
    workdir = tmp_path_factory.mktemp("app")
    port = _free_port()
    launch = "import runpy\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    command = [sys.executable, "-c", blocking_preamble() + launch, str(APP), "--model", str(tiny_en_moe)]
    command += ["--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env["HF_MODULES_CACHE"] = str(workdir / "modules")
    log = workdir / "app.log"
    with open(log, "w") as output:
        server = subprocess.Popen(command, cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_serving(url, server, log)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh profile
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def test_browser_transcribes_an_uploaded_file(app_url, page, data_dir):
    from playwright.sync_api import expect

    page.goto(app_url)
    page.locator("#audio-input input[type=file]").set_input_files(str(data_dir / "misc/jfk.flac"))
    page.locator("#submit").click()
    transcript = page.locator("#transcript textarea")
    expect(transcript).to_have_value(re.compile("your country", re.IGNORECASE), timeout=RESULT_WAIT_MS)
    assert _words(transcript.input_value()) == _words(JFK_TEXT)
    segments = page.locator("#segments textarea").input_value().splitlines()
    assert segments[0].startswith("[  0.00 ->") and "your country" in segments[-1]
    assert page.locator("#detected-language textarea").input_value() == "english"
    page.get_by_role("tab", name="Text to speech").click()
    expect(page.get_by_text("No text-to-speech model loaded")).to_be_visible()


def test_submitting_without_audio_shows_the_error(app_url, page):
    from playwright.sync_api import expect

    page.goto(app_url)
    page.locator("#submit").click()
    expect(page.get_by_text("Upload or record some audio first.")).to_be_visible(timeout=RESULT_WAIT_MS)


# ---------------------------------------------------------------------------------------------------------------
# The app's functions without a browser
# ---------------------------------------------------------------------------------------------------------------


def _app_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("whisper_moe_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_segments_are_formatted_with_open_ends():
    app = _app_module()
    chunks = [{"timestamp": (0.0, 8.0), "text": " ask not"}, {"timestamp": (8.0, None), "text": " what"}]
    assert app.format_segments(chunks) == "[  0.00 ->   8.00] ask not\n[  8.00 ->    ...] what"


def test_english_only_model_refuses_translation_clearly(data_dir):
    app = _app_module()
    english_only = SimpleNamespace(model=SimpleNamespace(generation_config=SimpleNamespace(is_multilingual=False)))
    with pytest.raises(ValueError, match="English-only"):
        app.speech_to_text(english_only, str(data_dir / "misc/jfk.flac"), "translate", "auto-detect")
    with pytest.raises(ValueError, match="Upload or record"):
        app.speech_to_text(english_only, None, "transcribe", "auto-detect")
    with pytest.raises(ValueError, match="Unknown task 'summarise'"):
        app.speech_to_text(english_only, str(data_dir / "misc/jfk.flac"), "summarise", "auto-detect")


def test_missing_model_folder_is_named(tmp_path):
    app = _app_module()
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        app.load_pipeline("automatic-speech-recognition", str(tmp_path / "no-such-model"))


def test_text_to_speech_returns_rate_and_mono_waveform():
    import numpy as np

    app = _app_module()
    fake_tts = lambda text: {"audio": np.ones((1, 160), dtype=np.float64) * len(text), "sampling_rate": 16_000}  # noqa: E731
    rate, waveform = app.text_to_speech(fake_tts, "  three one  ")
    assert rate == 16_000 and waveform.shape == (160,) and waveform.dtype == np.float32 and waveform[0] == 9
    with pytest.raises(ValueError, match="Type some text"):
        app.text_to_speech(fake_tts, "   ")
