#!/usr/bin/env python
"""Train WhisperMoE for any task or mixture of tasks, from a JSON recipe and/or flags (see processing/train.py).

python scripts/train.py [RECIPE.json] --output_dir OUT [flags]
python scripts/train.py configuration/recipes/tts-digits.json
python scripts/train.py configuration/recipes/multitask-digits.json --tasks asr   # one task of a mixture
"""

from processing.train import main

if __name__ == "__main__":
    main()
