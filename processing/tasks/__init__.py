"""One `Task` per capability, in a registry that `scripts/train.py` (and `scripts/evaluate.py`) look names up in.

A task says how to build its training (and evaluation) data from the run's arguments, how to batch it, and what to
score during training; `evaluator_name` names the scorer `scripts/evaluate.py` runs on a saved folder. Each module
of this package registers one task when imported:

    asr                 speech -> text (a manifest, a datasets source, espeak-ng digit sequences)
    translation         text -> text through the encoder's text front-end (a CSV of sentence pairs)
    tts                 text -> log-mel (espeak-ng digits, or LJSpeech sentences)
    speech_translation  speech -> English text (Whisper's translate task on a manifest of translations)
    video_to_text       sign-language keypoints -> text (fingerspelled words, or INCLUDE / WLASL glosses; the
                        encoder's pose front-end)
    modular_arithmetic  "a + b" -> "(a + b) mod p" as text, the grokking task (exact-match accuracy on held-out pairs)
    distillation        speech -> text, a Distil-Whisper student trained on its teacher's pseudo-labels
"""

# importing a task's module registers it
from processing.tasks import asr, distillation, modular_arithmetic, speech_translation, translation, tts, video_to_text
from processing.tasks.base import Task, TaskContext, TaskData, get_task, register_task, task_names

__all__ = ["Task", "TaskContext", "TaskData", "asr", "distillation", "get_task", "modular_arithmetic", "register_task",
           "speech_translation", "task_names", "translation", "tts", "video_to_text"]  # fmt: skip
