"""Speech translation: speech in any language -> English text, Whisper's `translate` decoder task.

The data is the asr task's (a manifest whose `text` is the English translation of each clip), with the decoder
prompted `<|lang|><|translate|>`; `--language` names the spoken language.
"""

from __future__ import annotations

from processing.tasks import asr
from processing.tasks.base import Task, TaskContext, TaskData, register_task

DECODER_TASK = "translate"


def build_data(context: TaskContext) -> TaskData:
    return asr.build_data(context, decoder_task=DECODER_TASK)


SPEECH_TRANSLATION = register_task(
    Task(
        "speech_translation",
        build_data,
        asr.build_collator,
        build_metrics=asr.build_metrics,
        evaluator_name="speech_translation",
    )
)
