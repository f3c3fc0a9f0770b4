"""distill.budget: a time or token budget turned into training steps, measured here and kept across a resume."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import tiny_distill_setup  # tests/ is on sys.path

from edgestill.config import DistillConfig, load_config
from edgestill.distill import trainer
from edgestill.distill.budget import TrainBudget, probe_steps
from edgestill.distill.trainer import LiveTeacher, distill
from edgestill.errors import EdgestillError

BASE = DistillConfig(steps=3, batch_size=2, lr=1e-3, warmup_steps=2, top_k=8, checkpoint_every=0, eval_every=4, seed=0)


@pytest.mark.parametrize("text, seconds, tokens", [
    ("2h", 7200, None), ("1.5 hours", 5400, None), ("90m", 5400, None), ("45min", 2700, None), ("600s", 600, None),
    ("2Mtok", None, 2_000_000), ("2M tokens", None, 2_000_000), ("500k tokens", None, 500_000),
    ("300000 tokens", None, 300_000), ("1e3tok", None, None),
])
def test_parse(text, seconds, tokens):
    if text == "1e3tok":  # exponents are not budgets people write; refused rather than misread
        with pytest.raises(EdgestillError, match="not a budget"):
            TrainBudget.parse(text)
        return
    b = TrainBudget.parse(text)
    assert (b.seconds, b.tokens, b.text) == (seconds, tokens, text)


@pytest.mark.parametrize("text, message", [
    ("600", "bare number is ambiguous"), ("2 days", "unknown unit 'days'"), ("2x tokens", "not a token multiplier"),
    ("0h", "no time"), ("0 tokens", "no tokens"), ("fast", "not a budget"),
])
def test_bad_budgets_say_what_to_write(text, message):
    with pytest.raises(EdgestillError, match=message) as e:
        TrainBudget.parse(text)
    assert "2h" in str(e.value) and "2Mtok" in str(e.value)


def test_none_and_empty_mean_no_budget():
    assert TrainBudget.parse(None) is None and TrainBudget.parse(" ") is None


def test_a_bad_budget_is_refused_when_the_recipe_is_read(tmp_path):
    with pytest.raises(EdgestillError, match="distill.budget='3 weeks'"):
        load_config(None, ["distill.budget=3 weeks", f"output.dir={tmp_path}"])


def test_steps_for_time_charges_evaluations_checkpoints_and_the_final_evaluation():
    b = TrainBudget.parse("100s")
    # 10 s spent on 2 steps; then each step 1 s + 4 s / 4 steps of evaluation + 1 s / 10 steps of checkpoint = 2.1 s;
    # 100 - 10 - 4 (final evaluation) = 86 s -> 40 more steps
    assert b.steps_for_time(2, 10.0, 1.0, 4.0, 4, 1.0, 10, min_steps=3) == 42
    assert b.steps_for_time(2, 10.0, 1.0, 0.0, 0, 0.0, 0, min_steps=3) == 2 + 90
    with pytest.raises(EdgestillError, match=r"spent before training starts: it buys 2 training steps.*give at least 17s"):
        TrainBudget.parse("12s").steps_for_time(2, 10.0, 1.0, 4.0, 4, 1.0, 10, min_steps=3)


def test_probe_stays_inside_the_warm_up():
    assert [probe_steps(w) for w in (0, 1, 2, 5, 50)] == [1, 1, 2, 5, 5]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    return tiny_distill_setup(tiny_model_dir, [0, 3])


def _run(setup, run_dir, cfg, student=None):
    teacher, make_student, blocks, val = setup
    student = student if student is not None else make_student()
    history = distill(student, LiveTeacher(teacher, cfg.top_k), blocks, cfg, run_dir, val_blocks=val,
                      show_progress=False, reference=teacher)
    return student, history


def test_token_budget_is_exact_and_equals_the_steps_it_names(setup, tmp_path):
    _, _, blocks, _ = setup
    per_step = BASE.batch_size * blocks.shape[1]  # 2 x 20 tokens
    a, history = _run(setup, tmp_path / "budget", dataclasses.replace(BASE, budget="200 tokens"))
    assert len(history) == 5  # ceil(200 / 40)
    record = json.loads((tmp_path / "budget" / "budget.json").read_text())
    assert record["steps"] == 5 and record["train_tokens"] == 5 * per_step and record["kind"] == "tokens"
    assert record["attempts"][0]["from_step"] == 0 and record["attempts"][0]["to_step"] == 5
    b, _ = _run(setup, tmp_path / "steps", dataclasses.replace(BASE, steps=5))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=name)


def test_a_token_budget_inside_the_warm_up_says_so(setup, tmp_path, caplog):
    _, history = _run(setup, tmp_path / "r", dataclasses.replace(BASE, budget="40 tokens"))
    assert len(history) == 1 and "never reaches distill.lr" in caplog.text


def test_time_budget_is_measured_then_fixed_and_reproducible_by_steps(setup, tmp_path):
    cfg = dataclasses.replace(BASE, budget="6s", eval_every=5, checkpoint_every=10)
    a, history = _run(setup, tmp_path / "time", cfg)
    record = json.loads((tmp_path / "time" / "budget.json").read_text())
    m = record["measured"]
    assert record["kind"] == "time" and record["steps"] == len(history) > cfg.warmup_steps
    assert m["probe_steps"] == 2 and m["step_s"] > 0 and m["eval_s"] > 0 and m["checkpoint_s"] > 0
    # the total is what the measurements buy (whether the loop then keeps to it is a matter of the machine's load:
    # RUN/budget.json records the loop's own time next to the budget, `attempts`)
    spent = m["spent_s_before_resolving"]
    assert record["steps"] == TrainBudget.parse("6s").steps_for_time(2, spent, m["step_s"], m["eval_s"], 5,
                                                                     m["checkpoint_s"], 10, 3)
    assert record["attempts"][0]["loop_s"] > spent
    # the probe steps are ordinary steps: distill.steps=<resolved> trains the same student
    b, _ = _run(setup, tmp_path / "steps", dataclasses.replace(BASE, steps=record["steps"], eval_every=5,
                                                                  checkpoint_every=10))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=name)


class Killed(Exception):
    pass


def test_a_resumed_time_budget_keeps_the_total_its_first_attempt_chose(setup, tmp_path, monkeypatch):
    cfg = dataclasses.replace(BASE, budget="4s", checkpoint_every=3)
    save = trainer.save_checkpoint
    saved = []

    def save_then_die(root, student, optimizer, step, *args):
        save(root, student, optimizer, step, *args)
        saved.append(step)
        if len(saved) == 2:  # the probe's checkpoint, then the first regular one
            raise Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        _run(setup, tmp_path / "r", cfg)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    total = json.loads((tmp_path / "r" / "budget.json").read_text())["steps"]
    monkeypatch.setattr(trainer, "_resolve_time_budget", lambda *a, **k: pytest.fail("a resumed budget is re-measured"))
    _, history = _run(setup, tmp_path / "r", cfg)
    assert len(history) == total and history[-1]["step"] == total
    assert np.isfinite([h["loss"] for h in history]).all()


def test_a_time_budget_spent_on_timing_is_refused(setup, tmp_path):
    with pytest.raises(EdgestillError, match="spent before training starts"):
        _run(setup, tmp_path / "r", dataclasses.replace(BASE, budget="0.01s"))
