"""Fidelity-first checkpoint selection (distill.select): the student as cut is a candidate, the kept state is the
evaluated one closest to the teacher on held-out blocks, and the choice survives a resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import one_line_error, tiny_distill_setup  # tests/ is on sys.path

from edgestill.config import DistillConfig, load_config
from edgestill.distill.trainer import LiveTeacher, distill, held_out_scores

BASE = DistillConfig(steps=6, batch_size=2, lr=1e-3, warmup_steps=1, top_k=8, checkpoint_every=2, eval_every=2, seed=0)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    return tiny_distill_setup(tiny_model_dir, [0, 1, 2, 3], allow_full=True)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(setup, tmp_path, cfg, name="run", reference=True):
    teacher, make_student, blocks, val = setup
    student = make_student()
    history = distill(student, LiveTeacher(teacher, cfg.top_k), blocks, cfg, tmp_path / name, val_blocks=val,
                      show_progress=False, reference=teacher if reference else None)
    selection = tmp_path / name / "selection.json"
    return student, history, (json.loads(selection.read_text()) if selection.is_file() else None)


def test_a_run_that_only_moves_away_from_the_teacher_keeps_the_student_as_cut(setup, tmp_path):
    """A full-depth copy of the teacher has KL 0; any training can only raise it, so step 0 must be kept."""
    teacher, make_student, _, val = setup
    cut = _state(make_student())
    cfg = dataclasses.replace(BASE, lr=5e-2, alpha=0.0)  # CE only at a high lr: moves away from the teacher
    student, history, sel = _run(setup, tmp_path, cfg)
    assert sel["select"] == "val_kl" and sel["selected_step"] == 0 and sel["last_step"] == cfg.steps
    assert sel["start"]["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert sel["last"]["kl_teacher_student"] > 1e-3  # training did move it
    for k, v in student.state_dict().items():
        assert torch.equal(v, cut[k]), k
    assert held_out_scores(student, teacher, val)["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    # every evaluation is in the log, with the score it was selected on
    assert [h["step"] for h in history if "kl_teacher_student" in h] == [2, 4, 6]


def test_the_kept_state_is_the_evaluated_step_with_the_lowest_kl(setup, tmp_path):
    teacher, _, _, val = setup
    cfg = dataclasses.replace(BASE, lr=1e-2)
    student, history, sel = _run(setup, tmp_path, cfg, name="kl")
    evaluated = {h["step"]: h["kl_teacher_student"] for h in history if "kl_teacher_student" in h}
    evaluated[0] = sel["start"]["kl_teacher_student"]
    best = min(evaluated, key=evaluated.get)
    assert sel["selected_step"] == best
    assert held_out_scores(student, teacher, val)["kl_teacher_student"] == pytest.approx(evaluated[best], rel=1e-5)


def test_select_last_keeps_the_final_step(setup, tmp_path):
    cfg = dataclasses.replace(BASE, lr=5e-2, alpha=0.0, select="last")
    student, history, sel = _run(setup, tmp_path, cfg, name="last")
    assert sel is None and not (tmp_path / "last" / "checkpoints" / "best").exists()
    assert "kl_teacher_student" not in history[-1] and "val_loss" in history[-1]


def test_without_the_teacher_model_selection_falls_back_to_held_out_ce(setup, tmp_path):
    cfg = dataclasses.replace(BASE, lr=5e-2, alpha=0.0)
    _, history, sel = _run(setup, tmp_path, cfg, name="ce", reference=False)
    assert sel["select"] == "val_loss" and sel["selected_on"] == "val_loss"
    losses = {h["step"]: h["val_loss"] for h in history if "val_loss" in h}
    losses[0] = sel["start"]["val_loss"]
    assert sel["selected_step"] == min(losses, key=losses.get)


def test_a_resumed_run_keeps_the_same_state_as_an_uninterrupted_one(setup, tmp_path, monkeypatch):
    from edgestill.distill import trainer

    cfg = dataclasses.replace(BASE, lr=1e-2)
    whole, _, sel_whole = _run(setup, tmp_path, cfg, name="whole")
    real_step = trainer.train_step

    def killed_after_step_4(*args, **kwargs):  # the checkpoint of step 4 exists, step 5 never finishes
        if args[8] == 4:  # step (0-based)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", killed_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path, cfg, name="resumed")
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed, _, sel_resumed = _run(setup, tmp_path, cfg, name="resumed")
    assert sel_resumed == sel_whole
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_an_unknown_select_names_the_choices(tmp_path):
    msg = one_line_error(load_config, overrides=["distill.select=best"])
    assert "distill.select='best' is unknown" in msg and "val_kl" in msg and "last" in msg
