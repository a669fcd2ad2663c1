"""`modeling_whisper_moe/` is exactly what a Hub repo receives: a saved folder holds every module of the package (all
but `__init__.py`) and nothing else. Adding, removing or renaming a module fails here until SHIPPED_CODE is updated."""

from conftest import tiny_moe
from transformers.dynamic_module_utils import get_relative_imports

from modeling_whisper_moe.hub import HUB_MODULES, PACKAGE_DIR

SHIPPED_CODE = {
    "audio.py",
    "configuration_whisper_moe.py",
    "echo.py",
    "features.py",
    "generation_whisper_moe.py",
    "growth.py",
    "hub.py",
    "keypoints.py",
    "model_card.py",
    "modeling_whisper_moe.py",
    "modeling_whisper_moe_tts.py",
    "packing.py",
    "patches.py",
    "peer.py",
    "pose.py",
    "pipeline_text_to_audio.py",
    "pipeline_translation.py",
    "pipeline_video_to_text.py",
    "pipeline_whisper_moe.py",
    "processing_whisper_moe.py",
    "quantization.py",
    "ttt.py",
    "upcycling.py",
    "video.py",
    "vocoder.py",
    "wavenet.py",
}
# The package's own entry point; a Hub folder is loaded module by module through auto_map instead.
PACKAGE_ONLY = {"__init__.py"}
SAVED_OTHER_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors"}


def test_the_package_holds_only_what_a_hub_repo_receives():
    assert sorted(path.name for path in PACKAGE_DIR.iterdir() if path.suffix == ".py") == sorted(
        SHIPPED_CODE | PACKAGE_ONLY
    )


def test_a_saved_folder_holds_exactly_the_shipped_code(tmp_path):
    tiny_moe().save_pretrained(tmp_path)
    saved = sorted(path.name for path in tmp_path.iterdir())
    assert saved == sorted(SHIPPED_CODE | SAVED_OTHER_FILES)


def test_every_shipped_module_is_an_entry_or_imported_by_one_that_is_shipped():
    imported = {f"{name}.py" for module in SHIPPED_CODE for name in get_relative_imports(str(PACKAGE_DIR / module))}
    unreached = SHIPPED_CODE - imported - set(HUB_MODULES)
    assert not unreached, f"shipped but neither an entry module nor imported by one: {sorted(unreached)}"
    assert imported <= SHIPPED_CODE, f"imported but not shipped: {sorted(imported - SHIPPED_CODE)}"
