"""Distillation of a WhisperMoE teacher into a student (processing/distillation.py, the `distillation` task)."""

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, run_without_package, tiny_batch, tiny_moe
from datasets import Dataset
from torch import nn
from transformers import Seq2SeqTrainingArguments

from modeling_whisper_moe import WhisperMoEProcessor
from processing.arguments import parse_arguments
from processing.distillation import (
    ENCODER_STATES_KEY,
    DistillationArguments,
    DistillationTrainer,
    distillation_objective,
    filter_by_wer,
    teacher_logits,
)
from processing.evaluation.common import ModelRef
from processing.metrics import english_normalizer
from processing.pseudo_labels import PROGRESS_SUFFIX, Clip, pseudo_label_clips, transcript_wer
from processing.student import make_student
from processing.training import apply_training_mode

RECIPE = REPO_ROOT / "configuration" / "recipes" / "distil-tiny.en.json"
LJSPEECH = "ljspeech/manifest.csv"


def _teacher_and_student():
    """A random 4-decoder-layer teacher whose experts differ, and its 2-layer student with the encoder frozen."""
    teacher = tiny_moe(decoder_layers=4)
    with torch.no_grad():
        for name, parameter in teacher.named_parameters():
            if ".mlp." in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    student = apply_training_mode(make_student(teacher, 2), "freeze_encoder")
    return teacher.eval(), student.eval()


def _trainer(student, teacher, tmp_path, **distillation) -> DistillationTrainer:
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    return DistillationTrainer(model=student, args=args, teacher=teacher,
                               distillation=DistillationArguments(**distillation))  # fmt: skip


def test_the_loss_is_distil_whispers_ce_and_kl_by_hand(tmp_path):
    teacher, student = _teacher_and_student()
    batch = tiny_batch()
    labels = batch["labels"]
    real = labels != -100
    with torch.no_grad():
        outputs = student(**batch)
        theirs = teacher(**batch).logits  # the teacher's own full forward: its encoder, its decoder
        loss = _trainer(student, teacher, tmp_path).compute_loss(student, batch)
    ce = F.cross_entropy(outputs.logits[real], labels[real])
    t = 2.0  # Distil-Whisper's temperature; CE weight 0.8, KL weight 1.0
    kl_per_token = F.kl_div((outputs.logits[real] / t).log_softmax(-1), (theirs[real] / t).log_softmax(-1),
                            log_target=True, reduction="none").sum(-1)  # fmt: skip
    expected = 0.8 * ce + 1.0 * t**2 * kl_per_token.mean() + outputs.aux_loss
    assert outputs.aux_loss > 0  # the sparse student's router losses are part of it
    torch.testing.assert_close(loss, expected)
    # other weights and temperature, through the objective alone
    args = DistillationArguments(ce_weight=0.3, kl_weight=2.0, kl_temperature=1.0)
    parts = distillation_objective(outputs, theirs, labels, args)
    plain = F.kl_div(outputs.logits[real].log_softmax(-1), theirs[real].log_softmax(-1), log_target=True,
                     reduction="none").sum(-1).mean()  # fmt: skip
    torch.testing.assert_close(parts["loss"], 0.3 * ce + 2.0 * plain + outputs.aux_loss)


def test_one_encoder_pass_gives_the_loss_of_two_and_cached_states_none(tmp_path):
    teacher, student = _teacher_and_student()
    calls = {"student": 0, "teacher": 0}
    for name, model in (("student", student), ("teacher", teacher)):
        model.get_encoder().register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    batch = tiny_batch()
    with torch.no_grad():
        trainer = _trainer(student, teacher, tmp_path, cache_encoder_states=False)
        assert trainer.share_encoder
        shared = trainer.compute_loss(student, batch)
        assert calls == {"student": 1, "teacher": 0}
        trainer.share_encoder = False  # what a student whose encoder trains gets: the teacher encodes again
        separate = trainer.compute_loss(student, batch)
        assert calls == {"student": 2, "teacher": 1}
        torch.testing.assert_close(shared, separate)
        # cached encoder output: no encoder pass at all, the same CE and KL
        outputs = student(**batch)
        states = outputs.encoder_last_hidden_state
        cached = {ENCODER_STATES_KEY: states, "labels": batch["labels"]}
        calls.update(student=0, teacher=0)
        _, cached_outputs = trainer.compute_loss(student, cached, return_outputs=True)
        assert calls == {"student": 0, "teacher": 0}
    args = DistillationArguments()
    for outs, states_given in ((outputs, None), (cached_outputs, states)):
        logits = teacher_logits(teacher, {"labels": batch["labels"]} if states_given is not None else batch, states)
        parts = distillation_objective(outs, logits, batch["labels"], args)
        reference = distillation_objective(outputs, teacher(**batch).logits, batch["labels"], args)
        torch.testing.assert_close(parts["kl"], reference["kl"])
        torch.testing.assert_close(outs.loss - outs.aux_loss, outputs.loss - outputs.aux_loss)  # the CE


def test_a_trained_encoder_cannot_use_cached_states(tmp_path):
    teacher, _ = _teacher_and_student()
    student = apply_training_mode(make_student(teacher, 2), "full")
    with pytest.raises(ValueError, match="cache_encoder_states"):
        _trainer(student, teacher, tmp_path)
    assert not _trainer(student, teacher, tmp_path, cache_encoder_states=False).share_encoder


def test_the_wer_filter_drops_pseudo_labels_far_from_the_reference():
    normalize = english_normalizer()
    reference = "the quick brown fox jumps over the lazy sleeping dog"
    assert transcript_wer("Mr. Smith paid $25.", "mister smith paid twenty five dollars", normalize) == 0.0
    assert transcript_wer(reference, reference.replace("lazy", "hazy"), normalize) == pytest.approx(10.0)
    assert transcript_wer("", "anything", normalize) is None and transcript_wer("Uh, um!", "x", normalize) is None
    wers = ["0.0", "10.0", "20.0", "", "100.0"]
    rows = Dataset.from_dict({"audio": ["exact", "one-word", "two-words", "unlabeled", "empty"],
                              "text": ["a", "b", "c", "d", ""], "wer": wers})  # fmt: skip
    assert filter_by_wer(rows, 10.0)["audio"] == ["exact", "one-word", "unlabeled"]
    assert filter_by_wer(rows, 0.0)["audio"] == ["exact", "unlabeled"]
    assert len(filter_by_wer(rows, 100.0)) == 5
    with pytest.raises(ValueError, match="dropped all"):
        filter_by_wer(rows.select([2, 4]), 10.0)
    with pytest.raises(ValueError, match="'wer' column"):
        filter_by_wer(rows.remove_columns("wer"), 10.0)


class _Scripted(nn.Module):
    """A model whose `generate` returns the token ids of scripted transcripts, one per clip, in order."""

    def __init__(self, tokenizer, texts: list[str], fail_on_call: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer, self.texts, self.fail_on_call, self.calls = tokenizer, list(texts), fail_on_call, 0

    @property
    def device(self):
        return self.weight.device

    @property
    def dtype(self):
        return self.weight.dtype

    def generate(self, features: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("interrupted")
        texts = [self.texts.pop(0) for _ in range(features.shape[0])]
        return torch.tensor(self.tokenizer(texts, padding=True).input_ids)


def test_pseudo_labels_resume_after_an_interruption(tiny_en_dense, data_dir, tmp_path):
    processor = WhisperMoEProcessor.from_pretrained(tiny_en_dense)
    rows = list(csv.DictReader(open(data_dir / LJSPEECH)))[:5]
    clips = [Clip(str(data_dir / "ljspeech" / row["path"]), row["text"]) for row in rows]
    clips[4] = Clip(clips[4].path)  # unlabeled audio
    texts = [clips[0].reference, "something else entirely", clips[2].reference, clips[3].reference, "heard"]
    output, normalize = tmp_path / "labels.csv", english_normalizer()
    with pytest.raises(RuntimeError, match="interrupted"):
        pseudo_label_clips(_Scripted(processor.tokenizer, texts, fail_on_call=2), processor, clips, output, normalize,
                           batch_size=2)  # fmt: skip
    assert not output.exists()
    progress = output.with_name(output.name + PROGRESS_SUFFIX)
    with open(progress, "a") as log:
        log.write('{"path": "cut sh')  # a crash in the middle of a line
    rest = _Scripted(processor.tokenizer, texts[2:])
    pseudo_label_clips(rest, processor, clips, output, normalize, batch_size=2)
    assert rest.calls == 2  # clips 3-4 and 5: the first batch was not labelled again
    written = list(csv.DictReader(open(output)))
    assert [row["path"] for row in written] == [clip.path for clip in clips]
    assert [row["text"] for row in written] == texts
    assert written[0]["wer"] == "0.0" and float(written[1]["wer"]) > 50 and written[4]["wer"] == ""
    assert all(json.loads(line) for line in progress.read_text().splitlines())
    again = _Scripted(processor.tokenizer, [])
    pseudo_label_clips(again, processor, clips, output, normalize)
    assert again.calls == 0


@pytest.mark.parametrize("recipe", ["distil-tiny.en.json", "distil-base.json"])
def test_the_recipes_hold_distil_whispers_settings(recipe):
    run = parse_arguments([str(RECIPE.with_name(recipe)), "--output_dir", "unused"])
    assert run.tasks.tasks == ["distillation"] and run.model.training_mode == "freeze_encoder"
    args = run.distillation
    assert (args.ce_weight, args.kl_weight, args.kl_temperature, args.wer_threshold) == (0.8, 1.0, 2.0, 10.0)
    assert args.student_decoder_layers == 2 and args.cache_encoder_states and args.spoken_sentences > 0
    assert all(Path(manifest).is_file() for manifest in args.distill_manifest)


def test_distillation_arguments_refuse_impossible_values():
    for bad, match in (({"kl_temperature": 0.0}, "kl_temperature"), ({"ce_weight": -1.0}, "ce_weight"),
                       ({"ce_weight": 0.0, "kl_weight": 0.0}, "learn nothing"),
                       ({"student_dense_decoder": "busiest"}, "make-student"),
                       ({"spoken_sentences": 3}, "spoken_sentences_csv")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            DistillationArguments(**bad)


def _clips_manifest(data_dir, path, rows: int, unlabeled: int = 0):
    """A manifest of the first LJSpeech clips; the last `unlabeled` of them without their transcript."""
    chosen = list(csv.DictReader(open(data_dir / LJSPEECH)))[:rows]
    lines = [[str(data_dir / "ljspeech" / row["path"]), row["text"]] for row in chosen]
    for line in lines[len(lines) - unlabeled :]:
        line[1] = ""
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "text"], *lines])
    return [line[0] for line in lines]


def test_train_script_distils_a_random_teacher_on_real_clips(tiny_random_moe, data_dir, tmp_path, caplog):
    """The whole task at unit-test speed: a random-weight teacher with tiny.en's vocabulary labels 3 real clips (one
    unlabeled), its labels miss the references, so the WER filter leaves only the unlabeled clip to train on."""
    from safetensors.torch import load_file

    from processing import train

    paths = _clips_manifest(data_dir, tmp_path / "clips.csv", rows=3, unlabeled=1)
    out = tmp_path / "student"
    caplog.set_level(logging.INFO, logger="processing.distillation")
    train.main([str(RECIPE), "--model_name_or_path", str(tiny_random_moe), "--output_dir", str(out),
                "--distill_manifest", str(tmp_path / "clips.csv"), "--spoken_sentences", "0", "--max_steps", "2",
                "--per_device_train_batch_size", "2", "--save_strategy", "no",
                "--max_label_length", "24"])  # fmt: skip
    labels = list(csv.DictReader(open(out / "distillation" / "pseudo_labels.csv")))
    assert [row["path"] for row in labels] == paths
    assert [row["wer"] == "" for row in labels] == [False, False, True]
    assert all(float(row["wer"]) > 10.0 for row in labels[:2])  # random weights: nothing like the reference
    assert "WER filter (<= 10.0 %): kept 1 of 3 clips" in caplog.text
    assert len(list((out / "distillation" / "encoder_states").glob("*.npy"))) == 3
    record = json.loads((out / "training_record.json").read_text())
    assert list(record["tasks"]) == ["distillation"] and record["distillation"]["kl_temperature"] == 2.0
    assert ModelRef(str(out), str(out)).trained_tasks() == ["asr"]  # scripts/evaluate.py scores it as a recogniser
    teacher, weights = load_file(tiny_random_moe / "model.safetensors"), load_file(out / "model.safetensors")
    encoder = [name for name in weights if name.startswith("model.encoder.")]
    assert encoder and all(torch.equal(weights[name], teacher[name]) for name in encoder)  # frozen
    assert not torch.equal(weights["model.decoder.layers.1.self_attn.q_proj.weight"],
                           teacher["model.decoder.layers.1.self_attn.q_proj.weight"])  # fmt: skip


SPECULATIVE_SCRIPT = """
from transformers import AutoModelForSpeechSeq2Seq, pipeline

teacher, student, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
asr = pipeline("automatic-speech-recognition", model=teacher, trust_remote_code=True)
assistant = AutoModelForSpeechSeq2Seq.from_pretrained(student, trust_remote_code=True).eval()
result = {"student_layers": assistant.config.decoder_layers,
          "alone": [asr(path)["text"] for path in paths],
          "assisted": [asr(path, generate_kwargs={"assistant_model": assistant})["text"] for path in paths]}
"""


@pytest.mark.slow
def test_a_distilled_student_drafts_the_teachers_own_transcripts(tiny_en_moe, data_dir, tmp_path):
    """Real tiny.en 8x2 teacher, 2 LJSpeech clips and 1 sentence espeak-ng speaks, 2 steps of the CPU recipe; then,
    with this package not importable, the student folder loads and, as the pipeline's assistant, gives exactly the
    teacher's greedy transcripts of real speech."""
    from processing import train

    _clips_manifest(data_dir, tmp_path / "clips.csv", rows=2)
    sentences = tmp_path / "sentences.csv"
    sentences.write_text("id,en\n1,The cat sat on the mat.\n2,I like green tea.\n3,Where is the station?\n")
    out = tmp_path / "student"
    train.main([str(RECIPE), "--model_name_or_path", str(tiny_en_moe), "--output_dir", str(out),
                "--distill_manifest", str(tmp_path / "clips.csv"), "--spoken_sentences_csv", str(sentences),
                "--spoken_sentences", "1", "--max_steps", "2", "--per_device_train_batch_size", "2",
                "--save_strategy", "no", "--max_label_length", "64"])  # fmt: skip
    labels = list(csv.DictReader(open(out / "distillation" / "pseudo_labels.csv")))
    assert len(labels) == 3 and all(row["wer"] != "" for row in labels)
    assert sum(float(row["wer"]) <= 10.0 for row in labels) >= 2  # a real teacher gets most of them right
    assert len(list((out / "distillation" / "encoder_states").glob("*.npy"))) == 3
    speech = [data_dir / "librispeech" / "test-other" / "1688" / "142285" / "1688-142285-0001.flac"]
    result = run_without_package(SPECULATIVE_SCRIPT, tiny_en_moe, out, *speech, tmp_path=tmp_path)
    assert result["leaked"] == [] and result["student_layers"] == 2
    assert result["assisted"] == result["alone"] and all(text.strip() for text in result["alone"])
