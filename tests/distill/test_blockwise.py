"""Block-wise distillation: each kept block learns the span of teacher blocks it replaces, from the teacher's stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_distill_setup

from edgestill.distill.blockwise import block_losses, blockwise_distill, check_blockwise, spans
from edgestill.distill.blockwise import token_normalised_mse as token_loss
from edgestill.errors import EdgestillError


def test_each_kept_block_stands_in_for_the_blocks_cut_before_it_and_the_last_for_the_rest():
    assert spans([0, 2, 5], 6) == [(0, 0), (1, 2), (3, 5)]
    assert spans([1, 3], 6) == [(0, 1), (2, 5)]  # blocks before the first kept one fold into it
    assert spans(list(range(4)), 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    with pytest.raises(EdgestillError, match="not distinct blocks"):
        spans([0, 6], 6)


def test_every_token_counts_the_same_in_the_block_loss_however_large_its_stream():
    target = torch.ones(1, 4, 8)
    target[0, 0] *= 100.0  # the first token's stream tens of times the others' scale (an attention sink's)
    out = target.clone()
    out[0, 1] = 0.0  # one ordinary token entirely wrong: a quarter of the tokens
    assert token_loss(out, target).item() == pytest.approx(0.25)
    sink_wrong = target.clone()
    sink_wrong[0, 0] = 0.0  # the large token entirely wrong weighs the same, not ~all of the loss
    assert token_loss(sink_wrong, target).item() == pytest.approx(0.25)


def test_a_full_copy_of_the_teacher_has_zero_block_loss(tiny_model_dir):
    teacher, make_student, blocks, _ = tiny_distill_setup(tiny_model_dir, [0, 1, 2, 3], allow_full=True)
    student = make_student()
    with torch.no_grad():
        losses = block_losses(student, teacher, torch.from_numpy(blocks[:2]).long(), spans([0, 1, 2, 3], 4))
    assert losses.shape == (4,) and float(losses.max()) < 1e-10


def test_the_stage_lowers_every_blocks_loss_and_leaves_embeddings_and_head_alone(tiny_model_dir, tmp_path):
    teacher, make_student, blocks, _ = tiny_distill_setup(tiny_model_dir, [1, 3])
    student = make_student()
    embed = student.get_input_embeddings().weight.detach().clone()
    norm = student.model.norm.weight.detach().clone()
    ids = torch.from_numpy(blocks).long()
    with torch.no_grad():
        before = block_losses(student, teacher, ids, spans([1, 3], 4))
    history = blockwise_distill(student, teacher, blocks, [1, 3], steps=40, lr=3e-3, batch_size=4, run_dir=tmp_path,
                                show_progress=False)
    with torch.no_grad():
        after = block_losses(student, teacher, ids, spans([1, 3], 4))
    assert len(history) == 40 and history[-1]["loss"] < history[0]["loss"]
    assert (after < 0.7 * before).all(), (before, after)
    assert torch.equal(student.get_input_embeddings().weight, embed) and torch.equal(student.model.norm.weight, norm)
    # and the stage's result is kept: the same folder loads it instead of training again
    again = make_student()
    assert blockwise_distill(again, teacher, blocks, [1, 3], steps=40, lr=3e-3, batch_size=4, run_dir=tmp_path,
                             show_progress=False) == history
    for a, b in zip(again.parameters(), student.parameters()):
        assert torch.equal(a, b)
    assert not (tmp_path / "blockwise" / "checkpoints").exists()  # no litter once done


def test_a_killed_stage_resumes_from_its_checkpoint_and_ends_where_an_unbroken_one_does(tiny_model_dir, tmp_path,
                                                                                         monkeypatch):
    import edgestill.distill.blockwise as bw

    teacher, make_student, blocks, _ = tiny_distill_setup(tiny_model_dir, [1, 3])
    kwargs = dict(steps=10, lr=3e-3, batch_size=4, checkpoint_every=4, show_progress=False)
    whole = make_student()
    blockwise_distill(whole, teacher, blocks, [1, 3], run_dir=tmp_path / "whole", **kwargs)

    real, calls = bw.block_losses, {"n": 0}

    def dies_at_step_7(*args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(bw, "block_losses", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        blockwise_distill(make_student(), teacher, blocks, [1, 3], run_dir=tmp_path / "killed", **kwargs)
    monkeypatch.setattr(bw, "block_losses", real)
    assert (tmp_path / "killed" / "blockwise" / "checkpoints" / "LATEST").is_file()
    resumed = make_student()
    history = blockwise_distill(resumed, teacher, blocks, [1, 3], run_dir=tmp_path / "killed", **kwargs)
    assert [h["step"] for h in history] == list(range(1, 11))
    for a, b in zip(resumed.parameters(), whole.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_student_that_is_not_a_slice_of_the_teacher_gets_one_clear_line(tiny_model_dir):
    teacher, make_student, _, _ = tiny_distill_setup(tiny_model_dir, [0, 3])
    with pytest.raises(EdgestillError, match="sliced out of the teacher"):
        check_blockwise(make_student(), teacher, None)
    with pytest.raises(EdgestillError, match="3 kept blocks"):
        check_blockwise(make_student(), teacher, [0, 1, 3])
    with pytest.raises(EdgestillError, match="fewer than one batch"):
        blockwise_distill(make_student(), teacher, np.zeros((2, 8), np.int32), [0, 3], steps=1, lr=1e-3, batch_size=4,
                          run_dir="unused", show_progress=False)


def test_shrink_runs_the_stage_before_end_to_end_kd_and_refuses_it_where_it_cannot_apply(tiny_model_dir, tiny_corpus,
                                                                                         tmp_path_factory):
    import json

    from conftest import one_line_error, shrunk_run, tiny_overrides

    from edgestill.config import load_config

    run = shrunk_run(tmp_path_factory, "blockwise", tiny_model_dir, tiny_corpus, "distill.blockwise_steps=4",
                     "student.trim_vocab=true")
    record = json.loads((run / "blockwise" / "blockwise.json").read_text())
    assert [h["step"] for h in record["history"]] == [1, 2, 3, 4] and len(record["spans"]) == 2
    assert json.loads((run / "metrics.json").read_text())["student"]["params"] > 0
    out = tmp_path_factory.mktemp("refused") / "run"
    for extra, words in ((["distill.blockwise_steps=-1"], "must be >= 0"),
                         (["distill.blockwise_steps=2", "student.hidden_size=32"], "hidden size")):
        assert words in one_line_error(load_config, None, [*tiny_overrides(tiny_model_dir, tiny_corpus, out), *extra])
