"""Training recipes: a JSON file of flag values under `configuration/recipes/`, overlaid by the command line and
parsed into the training arguments' dataclasses with transformers' `HfArgumentParser`.

Recipes compose, so that no block is written twice:

- `"base": "<recipe>"` starts from another recipe (a name under `configuration/recipes/`, or a path), whose keys
  this one overrides; bases may have bases.
- `"data_root": "<folder>"` fills `{data_root}` in every string value (`"{data_root}/fsdd/manifest.csv"`); the flag
  `--data_root` overrides it. It is relative to the working directory, as every other path flag is.
- `"moe": "<preset>"` names a file of `configuration/presets/` (see `processing.models.moe_options`).
- keys that start with `_` (`"_comment"`) are notes for the reader, never flags.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import HfArgumentParser

from processing.data import read_json

CONFIGURATION_DIR = Path(__file__).resolve().parents[1] / "configuration"
RECIPES_DIR = CONFIGURATION_DIR / "recipes"
PRESETS_DIR = CONFIGURATION_DIR / "presets"
BASE_KEY = "base"
DATA_ROOT_KEY = "data_root"
DATA_ROOT_FIELD = "{" + DATA_ROOT_KEY + "}"
MAX_BASE_DEPTH = 8  # a longer chain of bases is a cycle
NOTE_PREFIX = "_"  # a recipe key starting with it is a note, not a flag


def find_configuration(name_or_path: str | Path, folder: Path) -> Path:
    """A recipe or preset file: an existing path, else `folder/<name>.json`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    named = folder / f"{name_or_path}.json"
    if named.is_file():
        return named
    known = sorted(item.stem for item in folder.glob("*.json"))
    raise FileNotFoundError(f"No file {name_or_path!r}, nor {named}; names under {folder}: {known}")


def load_recipe(path: str | Path, depth: int = 0) -> dict:
    """The recipe at `path` with its `base` chain merged in (the recipe's own keys win)."""
    if depth > MAX_BASE_DEPTH:
        raise ValueError(f"Recipe {path}: more than {MAX_BASE_DEPTH} nested bases (a cycle?)")
    path = Path(path)
    recipe = read_json(path, "Recipe")
    recipe = {key: value for key, value in recipe.items() if not key.startswith(NOTE_PREFIX)}
    base = recipe.pop(BASE_KEY, None)
    if base is None:
        return recipe
    return {**load_recipe(find_configuration(base, path.parent), depth + 1), **recipe}


def resolve_data_root(recipe: dict, flags: list[str]) -> tuple[dict, list[str]]:
    """(recipe without `data_root`, flags without `--data_root`), `{data_root}` filled in the recipe's strings."""
    flags = list(flags)
    root = recipe.pop(DATA_ROOT_KEY, None)
    if f"--{DATA_ROOT_KEY}" in flags:
        at = flags.index(f"--{DATA_ROOT_KEY}")
        if at + 1 >= len(flags):
            raise ValueError("--data_root needs a folder")
        root = flags.pop(at + 1)
        flags.pop(at)

    def fill(value):
        if isinstance(value, list):
            return [fill(item) for item in value]
        if not isinstance(value, str) or DATA_ROOT_FIELD not in value:
            return value
        if root is None:
            raise ValueError(f"Recipe value {value!r} needs a data_root (a recipe key or --data_root)")
        return value.replace(DATA_ROOT_FIELD, str(root))

    return {key: fill(value) for key, value in recipe.items()}, flags


def parse_recipe(
    argv: Sequence[str], dataclass_types: Sequence[type], default: Path | None = None, usage: str = ""
) -> tuple[list, dict]:
    """(one instance per dataclass type, the merged recipe with its `path`).

    The recipe is the first argument when it ends in .json, else `default`; with neither, ValueError(`usage`). Flags
    after it override the recipe's values.
    """
    if argv and argv[0].endswith(".json"):
        recipe_path, flags = Path(argv[0]), list(argv[1:])
    elif default is not None:
        recipe_path, flags = default, list(argv)
    else:
        raise ValueError(usage or "the first argument must be a recipe (.json)")
    recipe, flags = resolve_data_root(load_recipe(recipe_path), flags)
    recipe_flags = [item for key, value in recipe.items() for item in as_flags(key, value)]
    # without an accelerator, torchrun / accelerate processes only form a (gloo) process group when told "cpu"
    device_flags = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    parsed = HfArgumentParser(tuple(dataclass_types)).parse_args_into_dataclasses(
        args=device_flags + recipe_flags + flags
    )
    given = {flag.lstrip("-").split("=")[0].replace("-", "_") for flag in flags if flag.startswith("--")}
    for key in (key for key, value in recipe.items() if value == [] and key not in given):
        for arguments in parsed:  # an empty list is no flag at all: set it, or the field's default would stand
            if hasattr(arguments, key):
                setattr(arguments, key, [])
    return list(parsed), {"path": str(recipe_path), **recipe}


def as_flags(key: str, value) -> list[str]:
    """A recipe entry as command-line flags: lists as several values (none for an empty list, which
    `parse_recipe` sets after parsing), dicts as JSON."""
    if value == []:
        return []
    if isinstance(value, list):
        return [f"--{key}", *map(str, value)]
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    return [f"--{key}", str(value)]
