"""`edgestill sweep` end to end on the tiny model: plans within budget, resumable points, a baseline curve."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import tiny_overrides
from edgestill.config import load_config
from edgestill.jobs.sweep import SweepSettings, sweep

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python not installed (make test installs it)")


@pytest.fixture(scope="module")
def swept(tiny_model_dir, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    cfg = load_config(overrides=tiny_overrides(tiny_model_dir, tiny_corpus, out / "unused", steps=2))
    settings = SweepSettings(budgets=[0.5, 0.3], device="rpi5-8gb", baseline_types=("Q8_0", "Q4_0"), calibration_blocks=2)
    return out, cfg, settings, sweep(cfg, settings, out)


def test_every_point_is_a_finished_run_within_its_file_budget(swept):
    out, _, _, result = swept
    plans = json.loads((out / "plans.json").read_text())["plans"]
    ours = [p for p in result["points"] if p["series"] == "edgestill"]
    assert len(ours) == len(plans) >= 1
    for point in ours:
        plan = next(p for p in plans if p["plan"] == point["detail"]["plan"])
        assert point["bytes"] <= plan["max_file_bytes"]  # the real GGUF, not the prediction
        metrics = json.loads((out / "points" / point["detail"]["run"].split("/points/")[1] / "metrics.json").read_text())
        assert metrics["student"]["bytes"] == point["bytes"]
        # the ratio against the file the user started from (the tiny teacher's safetensors) travels with the point
        assert point["compression_x_source"] == pytest.approx(metrics["teacher"]["source_bytes"] / point["bytes"])


def test_baseline_curve_and_report(swept):
    out, _, _, result = swept
    baseline = [p for p in result["points"] if p["series"] == "llama.cpp"]
    assert [p["name"] for p in sorted(baseline, key=lambda p: p["compression_x_fp32"])] == ["llama.cpp Q8_0", "llama.cpp Q4_0"]
    assert all(0 < p["retention"] and 0 <= p["top1_agreement"] <= 1 for p in baseline)
    assert set(result["break_points"]) == {"0.95", "0.90"}
    assert (out / "shrink_curve.png").is_file() and (out / "report.html").is_file()


def test_a_rerun_reuses_finished_points_and_redoes_a_missing_one(swept):
    import shutil

    out, cfg, settings, first = swept
    points = sorted((out / "points").iterdir())
    stamps = {p.name: (p / "DONE").stat().st_mtime_ns for p in points}
    shutil.rmtree(points[-1])  # as if the sweep had been killed before its last point
    again = sweep(cfg, settings, out)
    assert (points[-1] / "DONE").is_file()
    for p in points[:-1]:
        assert (p / "DONE").stat().st_mtime_ns == stamps[p.name]  # not retrained
    assert [p["name"] for p in again["points"]] == [p["name"] for p in first["points"]]


def test_shrink_for_a_device_runs_the_best_plan_within_the_budget(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    from edgestill.cli import main

    teacher_fp32_bytes = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    budget = int(teacher_fp32_bytes * 0.4)
    out = tmp_path / "dev"
    assert main(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=2), "--device", "rpi5",
                 "--max-file-size", str(budget)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["budget"]["max_file_bytes"] == budget
    assert (out / "student.gguf").stat().st_size <= budget
    cfg = (out / "config.yaml").read_text()
    assert f"format: {plan['plan']['default_format']}" in cfg
    # an impossible budget: one line naming the least file size that would do; a budget without a device is refused
    assert main(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, tmp_path / "x", steps=2), "--device", "rpi5",
                 "--max-file-size", "2KB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "raise --max-file-size to at least" in err
    assert not (tmp_path / "x").exists()
    assert main(["shrink", "--max-memory", "150MB"]) == 2
    assert "need --device" in capsys.readouterr().err


def test_new_budgets_replan_from_the_saved_sensitivities(swept, monkeypatch):
    import numpy as np

    from edgestill.models.load import load_causal_lm
    from edgestill.data.corpus import corpus_blocks
    from edgestill.jobs.sweep import make_plans

    out, cfg, settings, _ = swept
    assert (out / "sensitivity.json").is_file()

    def measured_again(*a, **k):
        raise AssertionError("layer sensitivity measured again although sensitivity.json holds it")

    monkeypatch.setattr("edgestill.plan.sensitivity.layer_sensitivity", measured_again)
    teacher = load_causal_lm(cfg.teacher.model)
    train = corpus_blocks(cfg.data, teacher.tokenizer).train
    again = make_plans(cfg, settings, teacher.model, np.asarray(train), 0, out)
    saved = json.loads((out / "plans.json").read_text())["plans"]
    assert "dropped" in json.loads((out / "plans.json").read_text())  # budgets without a plan, with their reasons
    assert [p["plan"]["layers"] for p in again] == [p["plan"]["layers"] for p in saved]


def test_a_plan_cache_shared_between_budgets_gives_the_same_plans(tiny_model_dir):
    import torch

    from conftest import load_tiny_teacher
    from edgestill.plan import Budget, plan

    model = load_tiny_teacher(tiny_model_dir)
    batches = [torch.arange(32).reshape(2, 16) % model.config.vocab_size]
    teacher_bytes = 4 * sum(p.numel() for p in model.parameters())
    cache: dict = {}
    for fraction in (0.5, 0.3):
        budget = Budget(max_file_bytes=int(teacher_bytes * fraction))
        fresh = plan(model, "rpi5-8gb", budget, batches, top=3)
        cached = plan(model, "rpi5-8gb", budget, batches, top=3, cache=cache)
        assert [p.to_dict() for p in cached] == [p.to_dict() for p in fresh]
    assert any(isinstance(k, tuple) for k in cache)  # structural KL kept per shape
