"""`edgestill sweep` end to end on the tiny model (a Q8_0 GGUF teacher, corrected): plans within budget, resumable
points, the llama.cpp baseline and the original file scored against the reference, caches kept per reference."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import tiny_overrides

from edgestill.config import load_config
from edgestill.jobs.sweep import SweepSettings, sweep

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python not installed (make test installs it)")


def _tiny_gguf_teacher(model_dir, path):
    """The tiny model as a Q8_0 GGUF: a teacher file that is already quantized, as the default teacher is."""
    from conftest import load_tiny_teacher
    from transformers import AutoTokenizer

    from edgestill.export.gguf import export_gguf

    export_gguf(load_tiny_teacher(model_dir), AutoTokenizer.from_pretrained(model_dir), path, "q8_0")
    return path


def _out_of_domain_text(path):
    """A small out-of-domain .txt (documents separated by blank lines), as eval.out_of_domain accepts."""
    from conftest import make_text

    path.write_text("\n\n".join(make_text(100 + i, 30) for i in range(6)))
    return path


@pytest.fixture(scope="module")
def swept(tiny_model_dir, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    gguf = _tiny_gguf_teacher(tiny_model_dir, tmp_path_factory.mktemp("teacher") / "tiny-q8_0.gguf")
    ood = _out_of_domain_text(tmp_path_factory.mktemp("ood") / "news.txt")
    overrides = [*tiny_overrides(gguf, tiny_corpus, out / "unused", steps=2), f"eval.out_of_domain={ood}",
                 "eval.out_of_domain_tokens=256", "eval.zero_shot_passages=0", "eval.chat=false"]
    cfg = load_config(overrides=overrides)
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
        # the ratio against the file the user started from (the tiny teacher's GGUF) travels with the point
        assert point["compression_x_source"] == pytest.approx(metrics["teacher"]["source_bytes"] / point["bytes"])
        # every figure is the run's own, against the reference, in and out of domain, with where it was measured
        assert point["reference"] == metrics["reference"] == "corrected"
        assert point["kl_teacher_student"] == metrics["kl_teacher_student"]
        assert point["out_of_domain"]["retention"] == metrics["out_of_domain"]["retention"]
        assert point["environment"]["git_commit"] == metrics["environment"]["git_commit"]


def test_baselines_and_the_original_file_are_scored_against_the_reference(swept):
    out, cfg, _, result = swept
    baseline = [p for p in result["points"] if p["series"] == "llama.cpp"]
    assert [p["name"] for p in sorted(baseline, key=lambda p: -p["bytes"])] == ["llama.cpp Q8_0", "llama.cpp Q4_0"]
    original = [p for p in result["points"] if p["series"] == "original file"]
    source = Path(cfg.teacher.model)
    assert [p["name"] for p in original] == [source.name] and original[0]["bytes"] == source.stat().st_size
    assert original[0]["compression_x_source"] == 1.0
    assert result["source_file"]["bytes"] == source.stat().st_size and result["reference"] == "corrected"
    params = result["reference_params"]
    for p in baseline + original:
        assert p["reference"] == "corrected" and 0 < p["retention"] and 0 <= p["top1_agreement"] <= 1
        assert p["kl_teacher_student"] > 0  # the reference was corrected: not even the original file is it
        assert p["compression_x_fp16"] == pytest.approx(params * 2 / p["bytes"])
        assert p["compression_x_fp32"] == pytest.approx(params * 4 / p["bytes"])
        assert set(p["out_of_domain"]) >= {"retention", "top1_agreement", "kl_teacher_student"}
        assert p["environment"]["git_commit"] and p["environment"]["date"]
    assert result["out_of_domain"]["tokens"] > 0 and result["out_of_domain"]["reference_perplexity"] > 0
    keys = {"kl_teacher_student<=0.10", "kl_teacher_student<=0.25", "top1_agreement>=0.90", "top1_agreement>=0.80",
            "retention>=0.95", "retention>=0.90"}
    assert set(result["break_points"]) == keys
    assert all(set(bp) >= {"edgestill", "llama.cpp", "description"} for bp in result["break_points"].values())
    assert (out / "shrink_curve.png").is_file() and (out / "report.html").is_file()
    assert json.loads((out / "baseline.json").read_text())["key"]["reference"] == result["reference_key"]


def test_a_rerun_reuses_finished_points_and_redoes_a_missing_one(swept, monkeypatch):
    import shutil

    out, cfg, settings, first = swept
    points = sorted((out / "points").iterdir())
    stamps = {p.name: (p / "DONE").stat().st_mtime_ns for p in points}
    shutil.rmtree(points[-1])  # as if the sweep had been killed before its last point

    def scored_again(*a, **k):
        raise AssertionError("a baseline scored again although baseline.json holds it for this reference")

    monkeypatch.setattr("edgestill.evaluate.gguf_eval.gguf_quality", scored_again)
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


def _few_words_corpus(folder: Path) -> Path:
    """A domain of six words: the tokens of the other words' merges are cut by a trimmed vocabulary."""
    import random

    from conftest import WORDS

    folder.mkdir()
    for i in range(8):
        rng = random.Random(i)
        (folder / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(WORDS[:6]) for _ in range(8)) + "."
                                                      for _ in range(150)))
    return folder


def test_a_device_plan_with_a_trimmed_vocabulary_is_priced_and_run_with_it(tiny_model_dir, tmp_path, capsys):
    """shrink --device ... student.trim_vocab=true: the planner prices the trimmed embedding (plan.json's vocab), and
    the run trims to exactly that many tokens; `edgestill plan --trim-vocab` prints the same cut."""
    from edgestill.cli import main

    tiny_corpus = _few_words_corpus(tmp_path / "few-words")
    teacher_fp32_bytes = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    budget = int(teacher_fp32_bytes * 0.4)
    out = tmp_path / "dev-trim"
    assert main(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=2), "student.trim_vocab=true",
                 "--device", "rpi5", "--max-file-size", str(budget)]) == 0
    plan = json.loads((out / "plan.json").read_text())["plan"]
    teacher_vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert plan["vocab"]["teacher_size"] == teacher_vocab > plan["vocab"]["size"] == plan["shape"]["vocab"]
    student = json.loads((out / "student" / "config.json").read_text())
    assert student["vocab_size"] == plan["vocab"]["size"]  # the run cut what the plan priced
    assert (out / "student.gguf").stat().st_size <= budget
    capsys.readouterr()
    assert main(["plan", "--device", "rpi5", "--teacher", str(tiny_model_dir), "--data", str(tiny_corpus),
                 "--file-size", str(budget), "--trim-vocab", "--calibration-tokens", "64", "--no-correct"]) == 0
    printed = capsys.readouterr().out
    assert f"vocabulary {plan['vocab']['size']:,} of {teacher_vocab:,}" in printed and "the trim cuts" in printed


def test_a_sweep_with_a_trimmed_vocabulary_plans_and_cuts_every_point_with_it(tiny_model_dir, tmp_path):
    """sweep ... student.trim_vocab=true: plans priced with the trimmed embedding and tokenizer, every point cut to
    that vocabulary within its budget, its levers saying so; plans made without the trim are not reused."""
    corpus = _few_words_corpus(tmp_path / "few-words")
    out = tmp_path / "sweep-trim"
    teacher_vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    settings = SweepSettings(budgets=[0.4], device="rpi5", baseline_types=("Q8_0",), calibration_blocks=2)
    base = [*tiny_overrides(tiny_model_dir, corpus, out / "unused", steps=2), "eval.out_of_domain=null"]
    sweep(load_config(overrides=base), settings, out)
    assert json.loads((out / "plans.json").read_text())["vocab"] is None

    result = sweep(load_config(overrides=[*base, "student.trim_vocab=true"]), settings, out)
    saved = json.loads((out / "plans.json").read_text())
    assert saved["vocab"]["size"] < teacher_vocab  # planned again, with the trim
    assert saved["formats"] == list(settings.formats)  # what the plans were made for (other formats: planned again)
    ours = [p for p in result["points"] if p["series"] == "edgestill"]
    assert len(ours) == len(saved["plans"]) >= 1
    for point in ours:
        plan = next(p for p in saved["plans"] if p["plan"] == point["detail"]["plan"])
        assert plan["plan"]["vocab"]["size"] == saved["vocab"]["size"]
        student = json.loads((Path(point["detail"]["run"]) / "student" / "config.json").read_text())
        assert student["vocab_size"] == saved["vocab"]["size"]  # shrunk again, cut to what was priced
        assert point["bytes"] <= plan["max_file_bytes"]
        assert point["levers"]["vocab"] == [saved["vocab"]["size"], teacher_vocab]


def _reference(cfg):
    from edgestill.data.corpus import corpus_blocks
    from edgestill.jobs.shrink import reference_teacher
    from edgestill.jobs.sweep import Reference, reference_key
    from edgestill.models.load import load_causal_lm

    original = load_causal_lm(cfg.teacher.model)
    data = corpus_blocks(cfg.data, original.tokenizer)
    loaded = reference_teacher(cfg, original, data)  # cached by the sweep
    assert loaded is not original
    return Reference(loaded, "corrected", reference_key(loaded)), data


def test_new_budgets_replan_from_the_saved_sensitivities_of_the_same_reference(swept, monkeypatch):
    import numpy as np

    from edgestill.jobs.sweep import make_plans

    out, cfg, settings, _ = swept
    assert (out / "sensitivity.json").is_file()
    reference, data = _reference(cfg)

    def measured_again(*a, **k):
        raise AssertionError("layer sensitivity measured again")

    monkeypatch.setattr("edgestill.plan.sensitivity.layer_sensitivity", measured_again)
    train = np.asarray(data.train)
    again = make_plans(cfg, settings, reference.loaded.model, train, 0, out, reference=reference.key)
    saved = json.loads((out / "plans.json").read_text())
    assert "dropped" in saved and saved["reference"] == reference.key  # budgets without a plan, with their reasons
    assert [p["plan"]["layers"] for p in again] == [p["plan"]["layers"] for p in saved["plans"]]
    # sensitivities measured for another teacher (the uncorrected one, an older sweep's) are measured again
    with pytest.raises(AssertionError, match="measured again"):
        make_plans(cfg, settings, reference.loaded.model, train, 0, out, reference="another-teacher:0")


def test_a_changed_reference_scores_the_baselines_again_and_reshrinks_the_points(swept, tmp_path, monkeypatch):
    import shutil

    from edgestill.config import load_config
    from edgestill.jobs import sweep as sweep_job
    from edgestill.models.load import gguf_file

    out, cfg, settings, result = swept
    reference, data = _reference(cfg)
    held_out = sweep_job._held_out(cfg, reference, data.test)
    shutil.copy(out / "baseline.json", tmp_path / "baseline.json")
    scored = []
    real = sweep_job._gguf_point
    monkeypatch.setattr(sweep_job, "_gguf_point", lambda name, *a, **k: scored.append(name) or real(name, *a, **k))
    args = (settings.baseline_types, gguf_file(cfg.teacher.model), result["source_file"]["bytes"])

    same, _ = sweep_job.baseline_points(tmp_path, reference, held_out, *args)  # the same reference: all read back
    assert scored == [] and [p.to_dict() for p in same] == [p for p in result["points"] if p["series"] != "edgestill"]
    other = sweep_job.Reference(reference.loaded, "corrected", "another-teacher:0")
    sweep_job.baseline_points(tmp_path, other, held_out, *args)  # another reference: none of it is reused
    assert scored == ["llama.cpp Q8_0", "llama.cpp Q4_0", Path(cfg.teacher.model).name]
    (tmp_path / "baseline.json").write_text(json.dumps(json.loads((out / "baseline.json").read_text())["points"]))
    scored.clear()  # an older sweep's cache (a bare list, measured against the uncorrected teacher): scored again
    sweep_job.baseline_points(tmp_path, reference, held_out, *args)
    assert len(scored) == 3

    # a finished point is kept for this reference and this plan only
    run = Path(next(p for p in result["points"] if p["series"] == "edgestill")["detail"]["run"])
    point_cfg = load_config(run / "config.yaml")
    assert sweep_job._finished_point(run, point_cfg, reference) is not None
    renamed = sweep_job.Reference(type(reference.loaded)(reference.loaded.model, reference.loaded.tokenizer, "x",
                                                         str(tmp_path / "another-corrected-teacher")), "corrected", "k")
    assert sweep_job._finished_point(run, point_cfg, renamed) is None
    point_cfg.quant.format = "q8_0" if point_cfg.quant.format != "q8_0" else "q4_0"
    assert sweep_job._finished_point(run, point_cfg, reference) is None


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


def test_a_sweep_with_the_recovery_probe_plans_again_and_every_plan_carries_it(swept, tmp_path):
    import dataclasses
    import shutil

    import numpy as np

    from edgestill.jobs.sweep import _plans
    from edgestill.plan.probe import RecoveryProbe

    out, cfg, settings, _ = swept
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)  # the module's sweep stays as it is for the other tests
    reference, data = _reference(cfg)
    probed = dataclasses.replace(settings, probe=RecoveryProbe(steps=2, top=2))
    plans, _ = _plans(cfg, probed, copy, reference, np.asarray(data.train), 0)
    assert plans and all(p["plan"]["recovery"]["steps"] == 2 for p in plans)
    assert all("after a 2-step recovery probe" in p["summary"] for p in plans)
    assert json.loads((copy / "plans.json").read_text())["probe"]["steps"] == 2  # plans made without it are not reused
