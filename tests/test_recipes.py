"""Recipes: bases merge, flags after the recipe win, and every value (an empty list too) reaches the arguments."""

import json
from dataclasses import dataclass, field

from processing.recipes import parse_recipe


@dataclass
class _Arguments:
    replay_manifest: list[str] = field(default_factory=lambda: ["default.csv"])
    learning_rate: float = 1e-3
    use_cpu: bool = False  # parse_recipe adds --use_cpu true without an accelerator


def _write(path, recipe: dict):
    path.write_text(json.dumps(recipe), encoding="utf-8")
    return path


def test_an_empty_list_in_a_recipe_empties_what_its_base_and_the_default_had(tmp_path):
    base = _write(tmp_path / "base.json", {"replay_manifest": ["a.csv", "b.csv"], "learning_rate": 0.5})
    child = _write(tmp_path / "child.json", {"base": str(base), "replay_manifest": []})
    (arguments,), recipe = parse_recipe([str(child)], [_Arguments])
    assert arguments.replay_manifest == [] and arguments.learning_rate == 0.5
    assert recipe["replay_manifest"] == []
    (from_base,), _ = parse_recipe([str(base)], [_Arguments])
    assert from_base.replay_manifest == ["a.csv", "b.csv"]


def test_a_flag_after_the_recipe_wins_over_its_empty_list(tmp_path):
    child = _write(tmp_path / "child.json", {"replay_manifest": []})
    (arguments,), _ = parse_recipe([str(child), "--replay_manifest", "c.csv"], [_Arguments])
    assert arguments.replay_manifest == ["c.csv"]


def test_keys_starting_with_an_underscore_are_notes_not_flags(tmp_path):
    base = _write(tmp_path / "base.json", {"_comment": "needs a GPU", "learning_rate": 0.5})
    child = _write(tmp_path / "child.json", {"base": str(base), "_needs": ["a dataset"]})
    (arguments,), recipe = parse_recipe([str(child)], [_Arguments])
    assert arguments.learning_rate == 0.5 and not any(key.startswith("_") for key in recipe)
