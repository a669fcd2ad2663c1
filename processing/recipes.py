"""Training recipes: a JSON file of flag values under `configuration/recipes/`, overlaid by the command line and
parsed into the training scripts' argument dataclasses with transformers' `HfArgumentParser`."""

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import HfArgumentParser


def parse_recipe(
    argv: Sequence[str], dataclass_types: Sequence[type], default: Path | None = None, usage: str = ""
) -> tuple[list, dict]:
    """(one instance per dataclass type, the recipe with its `path`).

    The recipe is the first argument when it ends in .json, else `default`; with neither, ValueError(`usage`). Flags
    after it override the recipe's values.
    """
    if argv and argv[0].endswith(".json"):
        recipe_path, flags = Path(argv[0]), list(argv[1:])
    elif default is not None:
        recipe_path, flags = default, list(argv)
    else:
        raise ValueError(usage or "the first argument must be a recipe (.json)")
    if not recipe_path.is_file():
        raise FileNotFoundError(f"Recipe not found: {recipe_path}")
    recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
    recipe_flags = [item for key, value in recipe.items() for item in as_flags(key, value)]
    # without an accelerator, torchrun / accelerate processes only form a (gloo) process group when told "cpu"
    device_flags = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    parsed = HfArgumentParser(tuple(dataclass_types)).parse_args_into_dataclasses(
        args=device_flags + recipe_flags + flags
    )
    return list(parsed), {"path": str(recipe_path), **recipe}


def as_flags(key: str, value) -> list[str]:
    """A recipe entry as command-line flags: lists as several values, dicts as JSON."""
    if isinstance(value, list):
        return [f"--{key}", *map(str, value)]
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    return [f"--{key}", str(value)]
