"""Distil-Whisper students of WhisperMoE teachers (processing/student.py, `whisper-moe make-student`)."""

import pytest
import torch
from conftest import tiny_batch, tiny_dense_config, tiny_moe
from transformers import WhisperForConditionalGeneration

from modeling_whisper_moe import WhisperMoEForConditionalGeneration
from processing.student import make_student, student_decoder_layers


def test_the_kept_layers_are_evenly_spaced_with_the_first_and_last():
    assert student_decoder_layers(32, 2) == [0, 31]  # distil-large-v2's choice
    assert student_decoder_layers(4, 2) == [0, 3]
    assert student_decoder_layers(6, 3) == [0, 2, 5]  # 2.5 rounds to even
    assert student_decoder_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="1 to 4"):
        student_decoder_layers(4, 5)


@pytest.mark.parametrize("dense", [None, "average", "busiest"])
def test_a_student_of_all_layers_of_a_fresh_upcycle_is_the_teacher(dense):
    """Upcycled experts are copies of one block: averaging them, or keeping any one, is that block again."""
    torch.manual_seed(0)
    dense_model = WhisperForConditionalGeneration(tiny_dense_config())
    teacher = WhisperMoEForConditionalGeneration.from_dense(dense_model, num_experts=4, num_experts_per_tok=2).eval()
    usage = {f"model.decoder.layers.{i}.mlp": torch.tensor([1, 5, 2, 0]) for i in range(2)}
    student = make_student(teacher, decoder_layers=2, dense=dense, usage=usage)
    assert student.config.decoder_sparse_layers == ([] if dense else None)
    batch = tiny_batch()
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits, teacher(**batch).logits, rtol=1e-5, atol=1e-5)


def test_a_two_layer_student_holds_the_teachers_first_and_last_layers():
    teacher = tiny_moe(decoder_layers=4)
    student = make_student(teacher, decoder_layers=2)
    assert student.config.decoder_layers == 2
    for mine, theirs in ((0, 0), (1, 3)):
        ours = student.model.decoder.layers[mine].state_dict()
        for name, tensor in teacher.model.decoder.layers[theirs].state_dict().items():
            assert torch.equal(ours[name], tensor), name
    features = tiny_batch()["input_features"]
    with torch.no_grad():
        assert torch.equal(student.get_encoder()(features).last_hidden_state,
                           teacher.get_encoder()(features).last_hidden_state)  # fmt: skip
    busiest = make_student(teacher, 2, "busiest", {f"model.decoder.layers.{i}.mlp": torch.tensor([0, 0, 3, 1])
                                                   for i in (0, 3)})  # fmt: skip
    expert = teacher.model.decoder.layers[3].mlp.experts
    assert torch.equal(busiest.model.decoder.layers[1].mlp.fc1.weight, expert.fc1_weight[2])


def test_impossible_students_are_refused():
    with pytest.raises(ValueError, match="dense must be"):
        make_student(tiny_moe(), 2, dense="median")
    with pytest.raises(ValueError, match="busiest"):
        make_student(tiny_moe(), 2, dense="busiest")
    with pytest.raises(ValueError, match="shared"):
        make_student(tiny_moe(num_shared_experts=1), 2, dense="average")
    grown = tiny_moe()
    grown.add_experts(1)
    with pytest.raises(ValueError, match="grew experts"):
        make_student(grown, 2)


def test_make_student_cli_writes_a_loadable_folder(tiny_random_moe, tmp_path):
    from processing.cli import main as cli

    out = tmp_path / "student"
    command = ["make-student", str(tiny_random_moe), str(out), "--decoder-layers", "1", "--dense-decoder", "average"]
    assert cli(command) == 0
    student = WhisperMoEForConditionalGeneration.from_pretrained(out)
    assert student.config.decoder_layers == 1 and student.config.decoder_sparse_layers == []
    assert (out / "tokenizer_config.json").is_file()
    assert cli(["make-student", str(tiny_random_moe), str(tmp_path / "bad"), "--dense-decoder", "busiest"]) == 1
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_speculative_decoding_with_a_student_gives_the_teachers_transcripts(tiny_en_moe, data_dir, tmp_path, capsys):
    """Real tiny.en 8x2 and a 2-layer student of it (not distilled: it drafts badly, which is the hard case): with
    the student as assistant, `whisper-moe transcribe` prints exactly the teacher's greedy transcripts."""
    from processing.cli import main as cli

    student = tmp_path / "student"
    assert cli(["make-student", str(tiny_en_moe), str(student), "--decoder-layers", "2"]) == 0
    clips = [str(data_dir / "librispeech" / "test-other" / "1688" / "142285" / "1688-142285-0001.flac")]
    capsys.readouterr()
    assert cli(["transcribe", str(tiny_en_moe), *clips]) == 0
    alone = capsys.readouterr().out
    assert cli(["transcribe", str(tiny_en_moe), *clips, "--assistant", str(student)]) == 0
    assert capsys.readouterr().out == alone and "Margaret said" in alone
    assert cli(["transcribe", str(tiny_en_moe), clips[0], "--assistant", str(student), "--batch-size", "2"]) == 1
