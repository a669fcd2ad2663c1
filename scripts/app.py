#!/usr/bin/env python
"""Gradio demo of a WhisperMoE model: speech -> transcript or English translation with timestamps, text -> speech.

Needs only gradio, transformers and torch: the models come from saved folders (or Hub ids) through `pipeline(...,
trust_remote_code=True)`, so the same file runs as the `app.py` of a Hugging Face Space (see spaces/README.md) and
locally:

    python scripts/app.py --model checkpoints/whisper-moe-tiny.en [--tts-model outputs/tts-digits] [--port 7860]

`--model` (or the WHISPER_MOE_MODEL environment variable) is a WhisperMoE ASR folder, e.g. one written by
`whisper-moe upcycle`; `--tts-model` (or WHISPER_MOE_TTS_MODEL) an optional folder whose `text-to-audio` pipeline
returns `{"audio", "sampling_rate"}`. Without it the text-to-speech tab says how to enable it. The app never
contacts the internet: analytics are off and no share link is made.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry, no update check

import numpy as np  # noqa: E402

DEFAULT_MODEL = "checkpoints/whisper-moe-tiny.en"  # what scripts/quickstart.sh makes with `whisper-moe upcycle`
MODEL_ENV, TTS_MODEL_ENV = "WHISPER_MOE_MODEL", "WHISPER_MOE_TTS_MODEL"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
CHUNK_LENGTH_S = 30  # long recordings are transcribed in Whisper's 30 s windows
TASKS = {"Transcribe": "transcribe", "Translate to English": "translate"}
AUTO_LANGUAGE = "auto-detect"
# Local fonts only: the default theme would fetch Google Fonts, which an offline browser cannot reach.
FONTS = (["ui-sans-serif", "system-ui", "sans-serif"], ["ui-monospace", "monospace"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get(MODEL_ENV, DEFAULT_MODEL), help="ASR folder or Hub id")
    parser.add_argument("--tts-model", default=os.environ.get(TTS_MODEL_ENV), help="text-to-audio folder or Hub id")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", DEFAULT_HOST))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)))
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: the pipeline's choice)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Model calls (plain functions: the UI only wires them)
# ---------------------------------------------------------------------------------------------------------------


def load_pipeline(task: str, model: str, device: str | None = None) -> Any:
    """`pipeline(task, model, trust_remote_code=True)`; a local path that does not exist is named in the error."""
    from transformers import pipeline

    looks_local = model.startswith((".", "/", "~")) or Path(model).expanduser().exists()
    if looks_local and not (Path(model).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"No model folder at {model} (no config.json); make one with `whisper-moe upcycle`")
    return pipeline(task, model=model, trust_remote_code=True, device=device)


def is_multilingual(asr: Any) -> bool:
    return bool(getattr(asr.model.generation_config, "is_multilingual", False))


def format_segments(chunks: list[dict]) -> str:
    """One `[start -> end] text` line per segment; an open end (cut-off last segment) shows as `...`."""
    lines = []
    for chunk in chunks:
        start, end = chunk["timestamp"]
        end_text = f"{end:6.2f}" if end is not None else "   ..."
        lines.append(f"[{start:6.2f} -> {end_text}] {chunk['text'].strip()}")
    return "\n".join(lines)


def speech_to_text(asr: Any, audio_path: str | None, task: str, language: str) -> tuple[str, str, str]:
    """Transcribe or translate `audio_path`; returns (text, timestamped segments, detected language)."""
    if not audio_path:
        raise ValueError("Upload or record some audio first.")
    if task not in TASKS.values():
        raise ValueError(f"Unknown task {task!r}; expected one of {sorted(TASKS.values())}")
    multilingual = is_multilingual(asr)
    if not multilingual and (task == "translate" or language not in ("", AUTO_LANGUAGE, "en", "english")):
        raise ValueError("This model is English-only: it transcribes English and cannot translate.")
    generate_kwargs = {"task": task} if multilingual else {}
    if multilingual and language and language != AUTO_LANGUAGE:
        generate_kwargs["language"] = language
    result = asr(
        audio_path,
        return_timestamps=True,
        return_language=multilingual,
        chunk_length_s=CHUNK_LENGTH_S,
        ignore_warning=True,  # chunking is how Whisper's pipeline handles recordings longer than 30 s
        generate_kwargs=generate_kwargs,
    )
    chunks = result.get("chunks", [])
    detected = next((chunk.get("language") for chunk in chunks if chunk.get("language")), None)
    return result["text"].strip(), format_segments(chunks), detected or ("english" if not multilingual else "")


def text_to_speech(tts: Any, text: str) -> tuple[int, np.ndarray]:
    """Speak `text`; returns `(sampling_rate, waveform (time,))` as gradio's Audio output takes it."""
    if not text or not text.strip():
        raise ValueError("Type some text to speak first.")
    output = tts(text.strip())
    waveform = np.asarray(output["audio"], dtype=np.float32).squeeze()
    if waveform.ndim != 1:
        raise ValueError(f"Expected mono audio from the text-to-audio pipeline, got shape {waveform.shape}")
    return int(output["sampling_rate"]), waveform


# ---------------------------------------------------------------------------------------------------------------
# Interface
# ---------------------------------------------------------------------------------------------------------------


def _shown_errors(function: Callable) -> Callable:
    """Bad input becomes a message in the page (gr.Error) instead of a generic "Error" badge."""
    import gradio as gr

    def wrapped(*args):
        try:
            return function(*args)
        except (ValueError, FileNotFoundError) as error:
            raise gr.Error(str(error)) from error

    return wrapped


def build_demo(asr: Any, tts: Any | None, model_name: str, tts_name: str | None) -> Any:
    import gradio as gr

    multilingual = is_multilingual(asr)
    with gr.Blocks(title="Whisper-MoE") as demo:
        gr.Markdown(f"# Whisper-MoE\nSpeech recognition model: `{model_name}`")
        with gr.Tab("Speech to text"):
            audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="audio-input")
            with gr.Row():
                task = gr.Radio(
                    list(TASKS.items()), value="transcribe", label="Task", interactive=multilingual, elem_id="task"
                )
                language = gr.Textbox(
                    value=AUTO_LANGUAGE if multilingual else "en",
                    label="Spoken language (e.g. de, fr)",
                    interactive=multilingual,
                    elem_id="language",
                )
            submit = gr.Button("Submit", variant="primary", elem_id="submit")
            text = gr.Textbox(label="Text", lines=3, elem_id="transcript")
            segments = gr.Textbox(label="Segments", lines=6, elem_id="segments")
            detected = gr.Textbox(label="Detected language", elem_id="detected-language")
            run = _shown_errors(lambda *inputs: speech_to_text(asr, *inputs))
            submit.click(run, inputs=[audio, task, language], outputs=[text, segments, detected])
        with gr.Tab("Text to speech"):
            if tts is None:
                gr.Markdown(
                    "No text-to-speech model loaded. Start the app with `--tts-model FOLDER` (or set "
                    f"`{TTS_MODEL_ENV}`) to a folder whose `text-to-audio` pipeline this package trained."
                )
            else:
                gr.Markdown(f"Text-to-speech model: `{tts_name}`")
                prompt = gr.Textbox(label="Text", value="three one four one", elem_id="tts-text")
                speak = gr.Button("Speak", variant="primary", elem_id="speak")
                speech = gr.Audio(label="Speech", type="numpy", elem_id="tts-audio")
                speak.click(_shown_errors(lambda value: text_to_speech(tts, value)), inputs=prompt, outputs=speech)
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    import gradio as gr

    args = parse_args(argv)
    asr = load_pipeline("automatic-speech-recognition", args.model, args.device)
    tts = load_pipeline("text-to-audio", args.tts_model, args.device) if args.tts_model else None
    demo = build_demo(asr, tts, args.model, args.tts_model)
    theme = gr.themes.Default(font=FONTS[0], font_mono=FONTS[1])
    demo.queue().launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False, theme=theme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
