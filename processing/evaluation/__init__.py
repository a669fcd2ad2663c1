"""Evaluation: one module per task, each scoring saved folders and returning a report and its markdown table.

`EVALUATORS` maps a task name (`scripts/evaluate.py --tasks`) to its `Evaluator`:

- `asr`: WER / CER after Whisper's English normaliser, RTF, latency, parameters, FLOPs (`asr.py`);
- `asr_digits`: digit error rate on FSDD's test split and on an unseen espeak-ng voice (`asr_digits.py`);
- `translation`: BLEU / chrF on held-out Tatoeba pairs (`translation.py`);
- `tts`: Whisper base's digit WER on held-out sequences the folder speaks (`tts.py`);
- `speech_translation`: speech translation and language ID next to faster-whisper (`speech_translation.py`);
- `video_to_text`: CER / word error and letter confusions on held-out fingerspelled words, or top-1 gloss accuracy
  per split of an isolated-sign corpus (`video_to_text.py`).
"""

from processing.evaluation import asr, asr_digits, speech_translation, translation, tts, video_to_text
from processing.evaluation.common import Evaluator, ModelRef

EVALUATORS: dict[str, Evaluator] = {
    module.EVALUATOR.name: module.EVALUATOR
    for module in (asr, asr_digits, translation, tts, speech_translation, video_to_text)
}

__all__ = ["EVALUATORS", "Evaluator", "ModelRef"]
