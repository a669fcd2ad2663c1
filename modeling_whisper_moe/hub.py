"""What a Hub folder of WhisperMoE holds beyond weights: the code, the auto_map, the custom pipelines, a model card.

Folders are written to a temporary sibling first and moved into place file by file, and single files to a temporary
sibling renamed into place, so an interrupted save never leaves a half-written file behind.
"""

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

PACKAGE_DIR = Path(__file__).resolve().parent

# Every Auto class a user may load the folder with, and the module.Class that answers it.
AUTO_MAP = {
    "AutoConfig": "configuration_whisper_moe.WhisperMoEConfig",
    "AutoModel": "modeling_whisper_moe.WhisperMoEModel",
    "AutoModelForSpeechSeq2Seq": "modeling_whisper_moe.WhisperMoEForConditionalGeneration",
    "AutoProcessor": "processing_whisper_moe.WhisperMoEProcessor",
    "AutoModelForTextToSpectrogram": "modeling_whisper_moe_tts.WhisperMoEForTextToSpeech",
}

# transformers 5.x routes any model_type but "whisper" to CTC decoding; this pipeline decodes the Whisper way.
CUSTOM_PIPELINES = {
    "automatic-speech-recognition": {
        "impl": "pipeline_whisper_moe.WhisperMoEASRPipeline",
        "pt": ["AutoModelForSpeechSeq2Seq"],
        "tf": [],
        "type": "audio",
    },
    # transformers 5.x has no translation pipeline; this one feeds text to the encoder's text front-end
    "translation": {
        "impl": "pipeline_translation.WhisperMoETranslationPipeline",
        "pt": ["AutoModelForSpeechSeq2Seq"],
        "tf": [],
        "type": "text",
    },
    # sign language (keypoints of a signer) -> text through the encoder's pose front-end
    "video-to-text": {
        "impl": "pipeline_video_to_text.WhisperMoEVideoToTextPipeline",
        "pt": ["AutoModelForSpeechSeq2Seq"],
        "tf": [],
        "type": "multimodal",
    },
    # text -> speech with WhisperMoEForTextToSpeech and a vocoder (Griffin-Lim unless one is passed)
    "text-to-audio": {
        "impl": "pipeline_text_to_audio.WhisperMoETextToAudioPipeline",
        "pt": ["AutoModelForTextToSpectrogram"],
        "tf": [],
        "type": "text",
    },
}

# Entry modules of the Hub code; their relative imports come along.
HUB_MODULES = (
    "modeling_whisper_moe.py",
    "processing_whisper_moe.py",
    "pipeline_whisper_moe.py",
    "pipeline_translation.py",
    "pipeline_video_to_text.py",
    "modeling_whisper_moe_tts.py",
    "pipeline_text_to_audio.py",
    "growth.py",
    "video.py",  # frames of video files, for video inputs
)


def merged_custom_pipelines(config, save_directory: str | os.PathLike) -> dict[str, dict]:
    """The `custom_pipelines` a save into `save_directory` writes: the entries already in that folder's config.json,
    then the config's own (e.g. set by a registered pipeline's `save_pretrained`), then this package's; a later entry
    wins for the same task. Saving several pipelines into one folder keeps them all."""
    existing = {}
    config_file = Path(save_directory) / "config.json"
    if config_file.is_file():
        try:
            existing = json.loads(config_file.read_text(encoding="utf-8")).get("custom_pipelines") or {}
        except json.JSONDecodeError as error:
            raise ValueError(f"Cannot merge custom pipelines into {config_file}: not valid JSON ({error})") from error
    return {**existing, **(getattr(config, "custom_pipelines", None) or {}), **CUSTOM_PIPELINES}


def copy_hub_code(folder: str | os.PathLike) -> list[Path]:
    """Copy the remote-code files (entry modules and everything they import relatively) into `folder`."""
    sources = {PACKAGE_DIR / name for name in HUB_MODULES}
    for entry in list(sources):
        sources.update(Path(p) for p in get_relative_import_files(str(entry)))
    copied = []
    for source in sorted(sources):
        destination = Path(folder) / source.name
        shutil.copyfile(source, destination)
        copied.append(destination)
    return copied


class HubSavingMixin:
    """`save_pretrained` for every WhisperMoE head: a self-contained Hub folder (weights, config with `auto_map` and
    `custom_pipelines`, the code, a model card), written atomically.

    A head names the Auto classes it answers over `AUTO_MAP` in `hub_auto_map` and writes its card in
    `hub_model_card`; it lists this mixin before `PreTrainedModel` in its bases.
    """

    hub_auto_map: dict[str, str] = {}

    def hub_model_card(self) -> str:
        """The README.md (Hub model card) a save writes into a folder that has none."""
        raise NotImplementedError(f"{type(self).__name__} must write its model card in hub_model_card().")

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Write a self-contained Hub folder: weights, config with `auto_map` and `custom_pipelines`, the code, and a
        model card (kept if the folder already has a README.md). Files land atomically."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP, **self.hub_auto_map}
        self.config.custom_pipelines = merged_custom_pipelines(self.config, save_directory)
        with atomic_directory(save_directory) as staging:
            super().save_pretrained(staging, *args, **kwargs)
            copy_hub_code(staging)
            if not (Path(save_directory) / "README.md").exists():
                (staging / "README.md").write_text(self.hub_model_card(), encoding="utf-8")


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write one file to; on success it replaces `target` in one rename.

    The temporary name keeps `target`'s suffix (writers that pick a format by suffix pick the same one). The file
    ends with the permissions a plain `open()` gives (0o666 less the umask), not mkstemp's private 0600. On error it
    is deleted and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.stem}.{uuid.uuid4().hex}.tmp{target.suffix}")
    try:
        yield temporary
        temporary.chmod(0o666 & ~_umask())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success move its files into `target`.

    A new `target` appears in one rename. An existing one keeps its other files and gets each new file by an atomic
    per-file replace. On error the temporary directory is removed and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    # mkdtemp makes a private (0700) folder; a saved folder gets the usual permissions, as mkdir would give it
    staging.chmod(0o777 & ~_umask())
    try:
        yield staging
        if not target.exists():
            staging.rename(target)
            return
        for path in sorted(staging.rglob("*")):
            destination = target / path.relative_to(staging)
            if path.is_dir():
                destination.mkdir(exist_ok=True)
            else:
                os.replace(path, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
