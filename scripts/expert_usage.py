#!/usr/bin/env python
"""Per-task expert usage of one WhisperMoE checkpoint: do the experts specialise by task?

    python scripts/expert_usage.py --model outputs/text-en-de \
        --manifest ../shared/data/librispeech/test-other/manifest.csv [--speech 16] [--text 128] \
        [--output-json results/expert-usage-en-de.json]

`--manifest` may be given several times (one speech domain each, e.g. LibriSpeech and FSDD digits), with one
`--split` for all or one per manifest (`all` for no filter).

Runs teacher-forced batches of each task the folder serves and counts, per sparse block, the routing slots each
expert gets from real tokens (padding left out):

- speech recognition: `--speech` clips of `--manifest` (of its `--split` rows when given; English, decoder prompted
  to transcribe);
- text translation (a folder with `config.text_frontend`): `--text` of the pairs `scripts/train.py` held out;
- sign language (a folder with `config.pose_frontend`, or `config.patch_frontend`: the words rendered to RGB
  video): `--signs` fingerspelled held-out words;
- speech synthesis (a generalist folder, `WhisperMoEForSpeechAndText`): `--speak` held-out digit sequences spoken by
  the espeak-ng voices it was trained on, with their exact frame counts (needs espeak-ng).

For every block it prints each task's busiest experts and the total variation distance between each pair of tasks'
expert shares (0: the tasks use the experts alike, 1: disjoint experts), and writes all shares to JSON. For a model
that grew experts (lifelong phases), it also prints, per task and side, the share of routing weight that goes to
the experts it started with and to each growth phase's (`phase i` is `config.expert_growth[i]`): how much of an old
domain's traffic moved to the new experts.
"""

import argparse
import itertools
import json
import random
from pathlib import Path

import torch

from modeling_whisper_moe import WhisperMoEForConditionalGeneration, WhisperMoEProcessor
from modeling_whisper_moe.generation_whisper_moe import text_decoder_prompt
from modeling_whisper_moe.hub import atomic_directory
from modeling_whisper_moe.modeling_whisper_moe_tts import WhisperMoEForSpeechAndText
from processing.pruning import manifest_batches, phase_weight_shares, routing_counts
from processing.sign_data import FingerspellingDataset, PoseCollator, read_lexicon, split_words, words_from_sentences
from processing.sign_video import RenderedFingerspellingDataset, rendering_of
from processing.text_data import (
    TextPairCollator,
    prepare_text_pairs,
    read_held_out_ids,
    read_held_out_pairs,
)
from processing.tts_data import DigitClipBank, digits_to_words, encode_utterance, held_out_sequences

REPO_ROOT = Path(__file__).resolve().parents[1]

TOP = 2  # busiest experts listed per task and block


def text_batches(model, processor, folder: Path, limit: int, batch_size: int):
    """Teacher-forced batches of the held-out pairs recorded in `folder` (as train.py encoded them)."""
    record = read_held_out_ids(folder)
    pairs = read_held_out_pairs(record, REPO_ROOT, limit=limit)
    prepared = prepare_text_pairs(pairs, processor.tokenizer, model.generation_config, record["src_lang"],
                                  record["tgt_lang"], model.config.max_text_positions, 448)  # fmt: skip
    collate = TextPairCollator(model.config.pad_token_id)
    for start in range(0, len(prepared), batch_size):
        yield collate([prepared[i] for i in range(start, min(start + batch_size, len(prepared)))])


def speech_output_batches(model, processor, folder: Path, limit: int):
    """Teacher-forced text-to-speech inputs, one sequence each (no padding): held-out 4-digit sequences spoken by
    the espeak-ng voices, speeds and pitches of the folder's training record, with exact frames per token."""
    data = json.loads((folder / "training_record.json").read_text(encoding="utf-8"))["data"]
    bank = DigitClipBank.from_espeak(data["voices"], data["speeds"], data["pitches"])
    rng = random.Random(0)
    reduction = model.config.tts_reduction_factor
    for digits in held_out_sequences(limit):
        style = rng.choice(bank.styles)
        pauses = [rng.randint(data["pause_frames_min"], data["pause_frames_max"]) for _ in digits]
        waveform, word_frames = bank.speak(digits, style, pauses, reduction)
        item = encode_utterance(digits_to_words(digits).split(), word_frames, waveform, style.voice, len(bank.voices),
                                processor.tokenizer, reduction, model.config.num_mel_bins)  # fmt: skip
        yield {"input_ids": item["input_ids"][None], "durations": item["durations"][None],
               "speaker_embeddings": item["speaker_embeddings"][None]}  # fmt: skip


def pose_batches(model, processor, folder: Path, limit: int, batch_size: int):
    """Teacher-forced batches of fingerspelled held-out words (a folder with `config.pose_frontend`, or with
    `config.patch_frontend`: rendered to video), composed from the lexicon and word lists of its training record."""
    data = json.loads((folder / "training_record.json").read_text(encoding="utf-8"))["data"]
    lexicon = read_lexicon(data["signed_language"])
    csvs = [path if Path(path).is_absolute() else REPO_ROOT / path for path in data["sign_words_csv"]]
    _, held_out = split_words(words_from_sentences(csvs), set(lexicon))
    prompt = text_decoder_prompt(model.generation_config, "en")[1:]
    common = dict(words=held_out, lexicon=lexicon, size=limit, prompt=prompt, tokenizer=processor.tokenizer,
                  eos_id=model.generation_config.eos_token_id, seed=0)  # fmt: skip
    if model.config.patch_frontend:  # the words drawn as RGB video, as its training run drew them
        words, collate = RenderedFingerspellingDataset(**common, rendering=rendering_of(data)), PoseCollator(
            key="pixel_values")  # fmt: skip
    else:
        words, collate = FingerspellingDataset(**common), PoseCollator()
    for start in range(0, limit, batch_size):
        yield collate([words[i] for i in range(start, min(start + batch_size, limit))])


def shares(counts: dict[str, torch.Tensor]) -> dict[str, list[float] | None]:
    """Counts -> each block's expert shares (summing to 1), None for a block the task never reached."""
    return {block: (c / c.sum()).tolist() if c.sum() > 0 else None for block, c in counts.items()}


def total_variation(p: list[float] | None, q: list[float] | None) -> float | None:
    if p is None or q is None:
        return None
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def busiest(share: list[float] | None) -> str:
    if share is None:
        return "not used"
    ranked = sorted(range(len(share)), key=lambda expert: -share[expert])[:TOP]
    return ", ".join(f"{expert} ({100 * share[expert]:.0f} %)" for expert in ranked)


def print_phase_weights(phases: dict[str, dict[str, dict[str, float]]]) -> None:
    """Markdown table: per task and side, the percentage of routing weight on each phase's experts."""
    columns = sorted({(side, label) for sides in phases.values() for side, parts in sides.items() for label in parts})
    print(f"\n| task | {' | '.join(f'{side}: {label}' for side, label in columns)} |")
    print(f"|---|{'---:|' * len(columns)}")
    for task, sides in phases.items():
        cells = [sides.get(side, {}).get(label) for side, label in columns]
        print(f"| {task} | {' | '.join('—' if c is None else f'{100 * c:.1f} %' for c in cells)} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved WhisperMoE folder")
    parser.add_argument("--manifest", required=True, action="append", help="path,text CSV of English speech")
    parser.add_argument(
        "--split", action="append", default=None, help="only the rows of this split (FSDD's test); `all`: every row"
    )
    parser.add_argument("--speech", type=int, default=16, help="clips of speech")
    parser.add_argument("--text", type=int, default=128, help="held-out text pairs (text front-end folders)")
    parser.add_argument("--speak", type=int, default=64, help="held-out digit sequences to speak (generalists)")
    parser.add_argument("--signs", type=int, default=64, help="held-out fingerspelled words (pose front-end)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--untrained", action="store_true", help="score the architecture freshly initialised (no-training baseline)"
    )
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)

    folder = Path(args.model)
    architecture = (json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or [""])[0]
    generalist = architecture == WhisperMoEForSpeechAndText.__name__
    model_class = WhisperMoEForSpeechAndText if generalist else WhisperMoEForConditionalGeneration
    model = model_class.from_pretrained(folder).eval()
    grown = any(phase.get("num_experts") for phase in model.config.expert_growth or ())
    if args.untrained:
        torch.manual_seed(0)
        untrained = model_class(model.config).eval()
        untrained.generation_config = model.generation_config  # languages and tasks, for the decoder prompts
        model = untrained
    processor = WhisperMoEProcessor.from_pretrained(folder)
    if getattr(model.generation_config, "is_multilingual", False):
        processor.tokenizer.set_prefix_tokens(language="en", task="transcribe")
    splits = args.split or ["all"]
    if len(splits) not in (1, len(args.manifest)):
        raise ValueError(f"Give one --split for all manifests or one per manifest, got {len(splits)} for "
                         f"{len(args.manifest)}.")  # fmt: skip
    splits = splits * len(args.manifest) if len(splits) == 1 else splits
    tasks = {}
    for manifest, split in zip(args.manifest, splits):
        name = "speech recognition" + (f" ({Path(manifest).parent.name})" if len(args.manifest) > 1 else "")
        tasks[name] = lambda manifest=manifest, split=split: manifest_batches(
            Path(manifest), processor, args.speech, args.batch_size, split=None if split == "all" else split,
            real_frames_only=True)  # fmt: skip
    if model.config.text_frontend:
        tasks["text translation"] = lambda: text_batches(model, processor, folder, args.text, args.batch_size)
    sign_frontend = model.config.pose_frontend or model.config.patch_frontend
    if sign_frontend:
        tasks["sign language"] = lambda: pose_batches(model, processor, folder, args.signs, args.batch_size)
    if generalist:
        tasks["speech synthesis"] = lambda: speech_output_batches(model, processor, folder, args.speak)
    usage = {task: shares(routing_counts(model, batches())) for task, batches in tasks.items()}
    phases = {task: phase_weight_shares(model, batches()) for task, batches in tasks.items()} if grown else {}
    blocks = list(next(iter(usage.values())))
    names = list(usage)
    pairs = list(itertools.combinations(names, 2))
    header = " | ".join(f"TV {a} / {b}" for a, b in pairs)
    print(f"| sparse block | {' | '.join(f'{task}: busiest experts' for task in names)} | {header} |")
    print(f"|---|{'---|' * len(names)}{'---:|' * len(pairs)}")
    distances = {f"{a} / {b}": {} for a, b in pairs}
    for block in blocks:
        cells = " | ".join(busiest(usage[task][block]) for task in names)
        row = []
        for a, b in pairs:
            distance = distances[f"{a} / {b}"][block] = total_variation(usage[a][block], usage[b][block])
            row.append("—" if distance is None else f"{distance:.2f}")
        print(f"| {block.removeprefix('model.')} | {cells} | {' | '.join(row)} |")
    if phases:
        print_phase_weights(phases)
    report = {"model": str(folder), "untrained": args.untrained, "manifest": args.manifest, "split": splits,
              "speech_clips": args.speech, "text_pairs": args.text,
              "speech_synthesis_sequences": args.speak if generalist else 0,
              "sign_words": args.signs if sign_frontend else 0, "shares": usage,
              "total_variation": distances, "phase_weight_shares": phases}  # fmt: skip
    if args.output_json:
        output = Path(args.output_json)
        with atomic_directory(output.parent) as staging:
            (staging / output.name).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
