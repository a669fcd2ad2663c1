"""The arguments of `scripts/train.py`: one dataclass per concern, filled from a recipe and flags.

Model-architecture and MoE fields default to None, meaning "WhisperMoEConfig's default" (or the checkpoint's): the
config class is the only place those defaults live.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from transformers import Seq2SeqTrainingArguments

from processing.distillation import DistillationArguments
from processing.grokfast import GROKFAST_FILTERS, GradientFilter
from processing.lifelong import LifelongArguments
from processing.recipes import RECIPES_DIR, parse_recipe
from processing.sign_corpora import SIGN_CORPORA
from processing.tasks import task_names
from processing.training import TRAINING_MODES

DEFAULT_RECIPE = RECIPES_DIR / "asr-finetune.json"
MODEL_CLASSES = ("WhisperMoEForConditionalGeneration", "WhisperMoEForTextToSpeech", "WhisperMoEForSpeechAndText")
TTS_CORPORA = ("digits", "sentences")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Whisper folder (upcycled unless upcycle=false) or WhisperMoE folder to start from; "
                  "none: random weights of the architecture fields below"},
    )  # fmt: skip
    model_class: str | None = field(
        default=None, metadata={"help": f"one of {MODEL_CLASSES}; default: what the tasks need"}
    )
    upcycle: bool = field(default=True, metadata={"help": "upcycle a dense checkpoint; false trains it dense"})
    moe: str | None = field(default=None, metadata={"help": "a preset of configuration/presets (name or path)"})
    num_experts: int | None = field(default=None, metadata={"help": "experts per sparse layer (config default)"})
    num_experts_per_tok: int | None = field(default=None, metadata={"help": "top-k routing (config default)"})
    expert_segments: int | None = field(
        default=None, metadata={"help": "split each expert into this many, 1/m as wide, top-(k*m) (fine-grained)"}
    )
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "override the config's value"})
    router_z_loss_coef: float | None = field(default=None, metadata={"help": "override the config's value"})
    router_jitter_noise: float | None = field(default=None, metadata={"help": "override the config's value"})
    variable_length_audio: bool | None = field(
        default=None, metadata={"help": "encode only real frames, clips packed (no 30 s padding); changes outputs"}
    )
    text_encoder_layers: int | None = field(
        default=None, metadata={"help": "encoder layers text runs through (text tasks; default: all)"}
    )
    # the patch front-end of video tasks (sign_frontend=patches); None: WhisperMoEConfig's defaults
    video_patch_size: int | None = field(default=None, metadata={"help": "pixels per patch side"})
    video_tubelet_frames: int | None = field(default=None, metadata={"help": "frames per tubelet"})
    video_token_dropout: float | None = field(default=None, metadata={"help": "tubelets dropped while training"})
    training_mode: str = field(
        default="full", metadata={"help": f"one of {', '.join(TRAINING_MODES)}, lifelong (the newest experts only)"}
    )
    # Test-Time-Training sub-layers added before training (modeling_whisper_moe/ttt.py; closed gates: exact)
    ttt_encoder_layers: str | None = field(default=None, metadata={"help": "add TTT to encoder layers: all, 0,2"})
    ttt_decoder_layers: str | None = field(default=None, metadata={"help": "add TTT to decoder layers: all, 0,2"})
    ttt_type: str = field(default="mlp", metadata={"help": "linear (TTT-Linear) or mlp (TTT-MLP)"})
    ttt_mini_batch_size: int = field(default=16, metadata={"help": "tokens per inner TTT step"})
    ttt_base_lr: float | None = field(default=None, metadata={"help": "inner base rate (1.0 linear, 0.1 mlp)"})
    # a WaveNet branch beside the decoder added before training (modeling_whisper_moe/wavenet.py; alpha 0: exact)
    wavenet_layers: int | None = field(default=None, metadata={"help": "add a WaveNet branch of this many layers"})
    wavenet_channels: int = field(default=64, metadata={"help": "the WaveNet branch's channels"})
    # ttt-video-dit trains its TTT layers at 10x the pretrained backbone's rate: they start from nothing
    ttt_lr_multiplier: float = field(default=10.0, metadata={"help": "TTT parameters' learning rate / the rest's"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (training_mode=lora)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator (training_mode=lora)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "must stay 0: expert adapters have no input"})
    language: str | None = field(default=None, metadata={"help": "language token for multilingual models, e.g. en"})
    task: str = field(default="transcribe", metadata={"help": "decoder task token: transcribe or translate"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16/fp16 on GPU, fp32 on CPU), no"})
    # random weights (no model_name_or_path): the tokenizer and the architecture
    tokenizer_name_or_path: str = field(
        default="bundled:base", metadata={"help": "Whisper folder whose tokenizer a new model reads ('bundled:base')"}
    )
    d_model: int | None = field(default=None, metadata={"help": "width of every layer"})
    encoder_layers: int | None = field(default=None, metadata={"help": "encoder layers"})
    decoder_layers: int | None = field(default=None, metadata={"help": "decoder layers"})
    attention_heads: int | None = field(default=None, metadata={"help": "heads in every attention block"})
    ffn_dim: int | None = field(default=None, metadata={"help": "hidden units of each expert"})
    dropout: float | None = field(default=None, metadata={"help": "dropout in attention outputs, feed-forward"})
    max_text_positions: int | None = field(default=None, metadata={"help": "longest text in tokens"})
    tts_postnet_layers: int | None = field(default=None, metadata={"help": "post-net convolutions (0: none)"})
    tts_reduction_factor: int | None = field(default=None, metadata={"help": "mel frames per decoder position"})


@dataclass
class DataArguments:
    # sign language (video_to_text): fingerspelled words composed from a lexicon's letter clips (sign_data.py)
    signed_language: str = field(default="ase", metadata={"help": "the fingerspelling lexicon's language (ase: ASL)"})
    sign_words_csv: list[str] = field(
        default_factory=list, metadata={"help": "sentence CSVs whose words are spelled (the en column)"}
    )
    sign_examples: int = field(
        default=20_000, metadata={"help": "training examples drawn on the fly (fingerspelled words, varied signs)"}
    )
    # isolated signs (video_to_text, processing/sign_corpora.py): the gloss of each recorded sign, as text
    sign_corpus: str = field(default="fingerspelling", metadata={"help": f"one of {SIGN_CORPORA}"})
    sign_root: str | None = field(
        default=None, metadata={"help": "include: the pose release's root; wlasl: the folder of <video_id>.pose"}
    )
    include_subset: str = field(default="include", metadata={"help": "include (263 signs) or include50"})
    wlasl_json: str | None = field(default=None, metadata={"help": "wlasl: WLASL_v0.3.json"})
    wlasl_subset_json: str | None = field(default=None, metadata={"help": "wlasl: an nslt_*.json subset"})
    # fingerspelled words drawn as RGB video for the patch front-end (sign_video.py)
    sign_frontend: str = field(
        default="pose",
        metadata={"help": "pose (keypoints) or patches (the words rendered to RGB video, sign_video.py)"},
    )
    sign_video_size: int = field(default=64, metadata={"help": "rendered frames' side in pixels (patches)"})
    sign_video_frame_step: int = field(default=5, metadata={"help": "render every n-th 25 fps frame (patches)"})
    # speech recognition (and speech translation)
    train_manifest: str | None = field(default=None, metadata={"help": "CSV path,text (paths relative to it)"})
    eval_manifest: str | None = field(default=None, metadata={"help": "defaults to train_manifest's eval_split"})
    train_split: str = field(default="train", metadata={"help": "rows of a manifest's split column to train on"})
    eval_split: str = field(default="test", metadata={"help": "rows of a manifest's split column to evaluate on"})
    exclude_speakers: list[str] = field(default_factory=list, metadata={"help": "speakers kept out of training"})
    dataset_name: str | None = field(default=None, metadata={"help": "a datasets source, e.g. audiofolder"})
    dataset_config_name: str | None = field(default=None)
    data_dir: str | None = field(default=None, metadata={"help": "data_dir for folder-based datasets"})
    audio_column: str = field(default="audio")
    text_column: str = field(default="text")
    streaming: bool = field(default=False, metadata={"help": "read the training data lazily (too big for disk)"})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    max_label_length: int = field(default=448, metadata={"help": "drop examples with longer labels"})
    augment: bool = field(default=False, metadata={"help": "gain / noise / speed augmentation of training audio"})
    asr_synthetic_examples: int = field(
        default=0, metadata={"help": "espeak-ng digit sequences added to the asr recordings (real frames only)"}
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "processes for feature extraction; one is fastest on CPU (forked workers fight torch's "
                  "threads: 15x slower here, and one run hung)"},
    )  # fmt: skip
    # text translation
    text_pairs_csv: str | None = field(default=None, metadata={"help": "CSV of sentence pairs (translation task)"})
    source_column: str = field(default="en", metadata={"help": "text_pairs_csv column translated from"})
    target_column: str = field(default="de", metadata={"help": "text_pairs_csv column translated into"})
    src_lang: str | None = field(default=None, metadata={"help": "source language token; default: source_column"})
    tgt_lang: str | None = field(default=None, metadata={"help": "target language token; default: target_column"})
    held_out_size: int = field(default=500, metadata={"help": "pairs held out (hashed ids), written to OUT"})
    copy_fraction: float = field(
        default=0.0,
        metadata={"help": "add this share of training sources as source->source copies (decoder prompted with the "
                  "source language): teaches cross-attention to read the text encoder"},
    )  # fmt: skip
    max_source_length: int = field(default=128, metadata={"help": "drop text pairs with longer source ids"})
    # modular arithmetic: "a + b" -> "(a + b) mod p" over every pair of residues (the grokking task)
    arithmetic_modulus: int = field(default=97, metadata={"help": "p: operands and results are 0..p-1"})
    arithmetic_operation: str = field(default="+", metadata={"help": "+, -, * or / (division needs a prime p)"})
    arithmetic_train_fraction: float = field(
        default=0.4, metadata={"help": "share of the p^2 pairs trained on (seeded); the rest are held out"}
    )
    # text-to-speech: espeak-ng digits, or LJSpeech sentences
    corpus: str = field(default="digits", metadata={"help": f"tts corpus, one of {TTS_CORPORA}"})
    ljspeech_dir: str | None = field(default=None, metadata={"help": "sentences: an LJSpeech folder"})
    max_sentences: int | None = field(default=None, metadata={"help": "sentences: use the first N rows only"})
    aligner: str = field(
        default="bundled:base", metadata={"help": "sentences: Whisper folder whose word timestamps time recordings"}
    )
    voices: list[str] = field(default_factory=lambda: ["en-us", "en-gb"], metadata={"help": "espeak-ng voices"})
    speeds: list[int] = field(default_factory=lambda: [160], metadata={"help": "espeak-ng words per minute"})
    pitches: list[int] = field(default_factory=lambda: [50], metadata={"help": "espeak-ng pitch, 0-99"})
    min_digits: int = field(default=1, metadata={"help": "shortest digit sequence"})
    max_digits: int = field(default=7, metadata={"help": "longest digit sequence"})
    pause_frames_min: int = field(default=2, metadata={"help": "shortest pause after a word, 10 ms frames"})
    pause_frames_max: int = field(default=12, metadata={"help": "longest pause after a word, 10 ms frames"})
    num_examples: int = field(default=200_000, metadata={"help": "distinct tts sequences (drawn on the fly)"})
    speaker_dropout: float = field(default=0.2, metadata={"help": "share of tts examples shown with no speaker"})


@dataclass
class TaskArguments:
    tasks: list[str] = field(
        default_factory=list, metadata={"help": f"any of {task_names()}; default: translation with text_pairs_csv "
                                        "and no manifest or dataset, else asr"}
    )  # fmt: skip
    task_steps: list[int] = field(
        default_factory=list, metadata={"help": "steps per task: one-task batches interleaved (a task mixture)"}
    )
    task_batch_sizes: list[int] = field(default_factory=list, metadata={"help": "batch size per task (mixture)"})


@dataclass
class BudgetArguments:
    max_train_minutes: float | None = field(
        default=None, metadata={"help": "stop training (and save) after this many minutes of wall time"}
    )
    num_threads: int | None = field(
        default=None,
        metadata={"help": "torch CPU threads; 1 on a shared machine (busy cores make threads spin-wait: 10x slower)"},
    )


@dataclass
class GrokfastArguments:
    # Grokfast's defaults for its algorithmic tasks (arXiv 2405.20233): a slow EMA (alpha 0.98) added twice (lamb 2)
    grokfast: str | None = field(
        default=None, metadata={"help": f"amplify the gradients' slow component: one of {GROKFAST_FILTERS}; none: off"}
    )
    grokfast_alpha: float = field(default=0.98, metadata={"help": "ema: weight of the past in the average"})
    grokfast_lamb: float = field(default=2.0, metadata={"help": "weight of the slow component added to the gradient"})
    grokfast_window: int = field(default=100, metadata={"help": "ma: optimizer steps averaged (window x memory)"})

    def __post_init__(self):
        self.gradient_filter()  # an impossible setting is refused when the flags are read, before anything loads

    def gradient_filter(self) -> GradientFilter | None:
        """The filter these arguments ask for (None: off); raises ValueError naming an impossible value."""
        if self.grokfast is None:
            return None
        return GradientFilter(self.grokfast, self.grokfast_alpha, self.grokfast_lamb, self.grokfast_window)


class RunArguments(NamedTuple):
    model: ModelArguments
    data: DataArguments
    tasks: TaskArguments
    budget: BudgetArguments
    lifelong: LifelongArguments
    distillation: DistillationArguments
    training: Seq2SeqTrainingArguments
    grokfast: GrokfastArguments
    recipe: dict


def parse_arguments(argv: list[str], default_recipe: Path = DEFAULT_RECIPE) -> RunArguments:
    """Recipe (first argument if it ends in .json, else the default recipe) overlaid with the flags."""
    types = (ModelArguments, DataArguments, TaskArguments, BudgetArguments, LifelongArguments, DistillationArguments,
             Seq2SeqTrainingArguments, GrokfastArguments)  # fmt: skip
    parsed, recipe = parse_recipe(argv, types, default=default_recipe)
    return RunArguments(*parsed, recipe)


def chosen_tasks(tasks: TaskArguments, data: DataArguments) -> list[str]:
    """The tasks to train: `tasks.tasks`, or the one the data implies (text pairs alone: translation; else asr)."""
    if tasks.tasks:
        return list(tasks.tasks)
    speech = data.train_manifest or data.dataset_name
    return ["translation"] if data.text_pairs_csv and not speech else ["asr"]


def task_plan(args: TaskArguments, listed: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """({task: steps}, {task: batch size}) of a task mixture, checked.

    `listed`: the tasks the step and batch-size lists follow, in order (the recipe's `tasks`). When `--tasks` picks
    some of them, each keeps its own steps and batch size, so a single-task baseline matches the multi-task run.
    """
    tasks, steps, batch_sizes = args.tasks, args.task_steps, args.task_batch_sizes
    unknown = sorted(set(tasks) - set(task_names()))
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct names from {task_names()}, got {tasks}.")
    order = listed if len(steps) == len(batch_sizes) == len(listed) and set(tasks) <= set(listed) else tasks
    if len(steps) != len(order) or len(batch_sizes) != len(order):
        raise ValueError(f"give task_steps and task_batch_sizes for each of {order}, got {steps} and {batch_sizes}.")
    plan = {task: (steps[order.index(task)], batch_sizes[order.index(task)]) for task in tasks}
    return {task: plan[task][0] for task in tasks}, {task: plan[task][1] for task in tasks}
