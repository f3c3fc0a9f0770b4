"""The rules the benchmark scripts judge results by (benchmarks/*.py), on hand-made rows: no training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
classifier = pytest.importorskip("classifier")
readme_tables = pytest.importorskip("readme_tables")


def _rows(teacher_f1: float, tfidf_f1: float, student: dict) -> list[dict]:
    base = {"accuracy": 0.8, "retention_accuracy": 1.0}
    return [
        {"name": "majority", "kind": "majority", "label": "majority", "accuracy": 0.58, "macro_f1": 0.37,
         "retention_accuracy": 0.7, "retention_macro_f1": 0.4},
        {"name": "tfidf", "kind": "tfidf", "label": "TF-IDF", "macro_f1": tfidf_f1, **base,
         "retention_macro_f1": tfidf_f1 / teacher_f1},
        {"name": "teacher", "kind": "teacher", "label": "teacher", "macro_f1": teacher_f1, "compression_x_fp32": 1.0,
         **base, "retention_macro_f1": 1.0},
        {"name": "kd-50x", "kind": "kd", "label": "KD student ~50×", "compression_x_fp32": 52.0, **base,
         "retention_macro_f1": student["macro_f1"] / teacher_f1, **student},
    ]


@pytest.mark.parametrize("teacher_f1, tfidf_f1, student, met, reason", [
    (0.84, 0.77, {"macro_f1": 0.83}, True, None),
    (0.84, 0.77, {"macro_f1": 0.80}, False, "keeps 95.2%"),  # below 97% of the teacher
    (0.78, 0.77, {"macro_f1": 0.78}, False, "does not beat TF-IDF + LR by 2 points"),  # data set does not qualify
    (0.84, 0.83, {"macro_f1": 0.825}, False, "does not beat TF-IDF + LR by 2 points"),
    (0.84, 0.77, {"macro_f1": 0.83, "failed": True}, False, "at or below the majority"),
])
def test_classifier_target_needs_a_qualifying_data_set_and_a_student_above_tfidf(teacher_f1, tfidf_f1, student,
                                                                                  met, reason):
    t = classifier.target_verdict({"rows": _rows(teacher_f1, tfidf_f1, student)})
    assert t["met"] is met
    assert t["qualifies"] is (teacher_f1 - tfidf_f1 >= 0.02)
    if reason:
        assert reason in t["reason"]
    else:
        assert t["reason"] is None


def test_classifier_target_excludes_students_smaller_than_50x():
    rows = _rows(0.84, 0.77, {"macro_f1": 0.84})
    rows[-1]["compression_x_fp32"] = 49.0
    t = classifier.target_verdict({"rows": rows})
    assert t["met"] is False and "no student at ≥ 50×" in t["reason"]


def test_classifier_target_judges_a_size_by_its_seeds_mean_not_its_best_seed():
    rows = _rows(0.84, 0.77, {"macro_f1": 0.83})  # seed 0 keeps 98.8%
    rows += [{**rows[-1], "name": f"kd-50x-seed{s}", "seed_of": "kd-50x", "macro_f1": f1,
              "retention_macro_f1": f1 / 0.84} for s, f1 in ((1, 0.80), (2, 0.81))]
    t = classifier.target_verdict({"rows": rows})
    assert t["met"] is False and t["seeds"] == 3 and t["best_row"] == "kd-50x"
    assert t["retention_macro_f1"] == pytest.approx((0.83 + 0.80 + 0.81) / 3 / 0.84)
    assert "mean of 3 seeds" in t["reason"]
    d = {"data": {"train": {"n": 9}, "val": {"n": 1}, "test": {"n": 2}}, "rows": rows, "target": t}
    assert "on the mean of 3 student seeds (98.8%, 95.2%, 96.4%" in readme_tables.classifier_table({"datasets": {"m": d}})
    rows[-1]["failed"] = True  # one seed at or below the majority class: the size is out
    assert "at or below the majority" in classifier.target_verdict({"rows": rows})["reason"]


def test_an_int8_student_is_a_row_of_its_own_and_its_seeds_one_candidate(tmp_path):
    """The int8 ONNX file of a KD student is judged by its own bytes and scores, its seeds averaged as one size."""
    (tmp_path / "onnx-int8").mkdir()
    (tmp_path / "onnx-int8" / "model.onnx").write_bytes(b"x")
    teacher_test = {"accuracy": 0.8, "macro_f1": 0.84}

    def int8_of(row: dict, f1: float) -> dict:
        metrics = {"curve": [{"type": "f32", "test": {"accuracy": 0.8, "macro_f1": row["macro_f1"]}},
                             {"type": "int8", "test": {"accuracy": 0.8, "macro_f1": f1}, "top1_agreement_with_teacher": 0.9}]}
        return classifier.Bench.quantized_row(row, metrics, tmp_path, teacher_test,
                                              lambda folder: {"deploy_bytes": 1, "compression_x_fp32": 60.0})

    rows = _rows(0.84, 0.77, {"macro_f1": 0.80})
    rows[-1]["compression_x_fp32"] = 26.0  # the fp32 file is too large for the target
    seeds = [{**rows[-1], "name": f"kd-50x-seed{s}", "seed_of": "kd-50x", "label": f"KD student ~50× (student seed {s})"}
             for s in (1, 2)]
    int8 = [int8_of(r, f1) for r, f1 in zip([rows[-1], *seeds], (0.83, 0.82, 0.81))]
    assert [r["name"] for r in int8] == ["kd-50x-int8", "kd-50x-seed1-int8", "kd-50x-seed2-int8"]
    assert [r["seed_of"] for r in int8] == [None, "kd-50x-int8", "kd-50x-int8"]
    assert int8[0]["kind"] == "kd_int8" and int8[0]["compression_x_fp32"] == 60.0
    assert int8[1]["label"] == "KD student ~50× in fp32, as int8 ONNX (student seed 1)"
    assert int8[0]["retention_macro_f1"] == pytest.approx(0.83 / 0.84)
    assert int8_of({**rows[1]}, 0.8) is None  # only KD students have an int8 row
    t = classifier.target_verdict({"rows": rows + seeds + int8})
    assert t["best_row"] == "kd-50x-int8" and t["seeds"] == 3
    assert t["retention_macro_f1"] == pytest.approx(0.82 / 0.84) and t["met"] is True
    assert classifier.Bench.quantized_row(rows[-1], {"curve": []}, tmp_path, teacher_test, None) is None
    assert classifier.Bench.quantized_row(rows[-1], {"curve": [{"type": "int4"}]}, tmp_path, teacher_test, None, "int4") \
        is None  # no onnx-int4/ folder: no row


def test_classifier_recipes_table_compares_two_recipes_seed_by_seed_and_on_their_means(monkeypatch):
    def result(f1s, vals, **args):
        rows = _rows(0.84, 0.77, {"macro_f1": f1s[0]})
        rows += [{**rows[-1], "name": f"kd-50x-seed{s}", "seed_of": "kd-50x", "macro_f1": f1,
                  "retention_macro_f1": f1 / 0.84} for s, f1 in enumerate(f1s[1:], 1)]
        for s, (x, v) in enumerate(zip(rows[3:], vals)):
            x.update(student_seed=s, best_val_macro_f1=v, best_step=100 * (s + 1), stopped_at_step=3000)
        return {"args": args, "datasets": {"moviereviews": {"rows": rows}}}

    base = result([0.80, 0.81, 0.79], [0.75, 0.76, 0.77], student_patience=3, student_steps=3000, augment=4)
    monkeypatch.setattr(readme_tables, "_load", lambda name: base if name == "classifier" else None)
    table = readme_tables.classifier_recipes_table(result([0.82, 0.83, 0.81], [0.78, 0.78, 0.78], student_patience=0,
                                                          student_steps=6000, augment=4))
    lines = table.splitlines()
    assert sum(line.startswith("| at most 6000 steps, patience 0 |") for line in lines) == 3
    assert sum(line.startswith("| the table above (patience 3, at most 3000 steps) |") for line in lines) == 3
    assert "val macro-F1 0.7600, test retention 95.2% ± 1.2" in table  # the base recipe: mean of its seeds
    assert "val macro-F1 0.7800, test retention 97.6% ± 1.2" in table
    assert "97% of it: 0.8148" in table
    assert "no kd-50x rows" in readme_tables.classifier_recipes_table({"datasets": {}})

    soups = result([0.82, 0.83, 0.81], [0.78, 0.78, 0.78], student_patience=3, student_steps=3000, augment=4, soup=2)
    for s, x in zip((0, 2, 4), soups["datasets"]["moviereviews"]["rows"][3:]):  # rows of seeds 0, 2, 4: soups of s, s+1
        x["soup_ingredients"] = [{"seed": i, "stopped_at_step": 3000, "best_step": 250 * (i + 1)} for i in (s, s + 1)]
        x["soup_seeds"] = [s, s + 1]
    soups["datasets"]["moviereviews"]["target"] = {"met": True, "best_row": "kd-50x", "retention_macro_f1": 0.976,
                                                    "seeds": 3, "compression_x_fp32": 52.9}
    table = readme_tables.classifier_recipes_table(soups)
    assert "| a uniform soup of 2 students | 2+3 | 3000+3000 | 750+1000 | 0.7800 | 0.8300 |" in table
    assert "a uniform soup of 2 students: 3 soups of 2 seeds each, val macro-F1 0.7800, test retention 97.6% ± 1.2" \
        in table
    assert "**met** (best: kd-50x, 97.6% on the mean of 3 soup(s) of 2 seeds, 52.9×)" in table


def test_classifier_table_strikes_out_a_failed_students_retention():
    rows = _rows(0.84, 0.77, {"macro_f1": 0.40})
    rows[-1].update(failed=True, beats_tfidf_logreg=False, label="KD student ~50× — FAILED (≤ majority class)")
    rows[2].update(failed=False, beats_tfidf_logreg=True)
    d = {"data": {"train": {"n": 9}, "val": {"n": 1}, "test": {"n": 2}}, "rows": rows}
    d["target"] = classifier.target_verdict(d)
    table = readme_tables.classifier_table({"datasets": {"moviereviews": d}})
    student = next(line for line in table.splitlines() if line.startswith("| KD student ~50×"))
    assert "**FAILED**" in student and "~~0.476~~" in student
    assert "| teacher |" in table and "beats TF-IDF" in table
    assert "**not met**" in table


def _quant_row(name: str, group: str, kl: float, top1: float, ppl: float, **extra) -> dict:
    return {"name": name, "group": group, "perplexity": ppl, "retention": 30.0 / ppl, "top1_agreement": top1,
            "kl_teacher_model": kl, "file_bytes": 80e6, "compression_x_source": 1.23, "compression_x_fp16": 3.4,
            "decode_tokens_per_s": 50.0, "bandwidth_bound_fraction": 0.5, **extra}


def test_quant_table_names_the_corrected_reference_and_the_recovery_on_kl_and_top1():
    env = {"date": "2026-12-03T06:00:00", "cpu_model": "Xeon", "threads": 2, "load_average_before": [0.1, 0, 0],
           "load_average_after": [1.9, 1, 0], "git_commit": "abcdef1234", "git_dirty": False}
    qat_run = {"selection": {"select": "val_kl", "selected_on": "kl_teacher_student", "selected_step": 25, "last_step": 40},
               "out_of_domain": {"retention": 0.812}}
    result = {"reference_perplexity": 30.0, "held_out_tokens": 12240, "source_file": {"bytes": 98.4e6},
              "decode_tokens": 64, "prompt_tokens": 128, "repeats": 5, "memory_bandwidth_bytes_per_s": 28.8e9,
              "command": "python benchmarks/quant_table.py", "environment": env,
              "targets": {"qat_recovers_of_rtn_kl": 0.5, "qat_recovers_of_rtn_top1": 0.25,
                          "qat_recovers_of_rtn_perplexity": 1.1},
              "rows": [_quant_row("edgestill RTN Q4_0", "3", 0.2, 0.8, 33.0),
                       _quant_row("edgestill QAT+KD Q4_0 (30 layers)", "4", 0.1, 0.85, 30.5, run=qat_run)]}
    text = readme_tables.quant_table(result)
    assert "against the corrected teacher" in text and "1.23×" in text
    assert "**50%** of the KL and **25%** of the top-1" in text
    assert "kept step 25 of 40" in text and "0.812" in text
    assert "1-min load 0.1 → 1.9" in text and "(dirty)" not in text
    assert "Old result format" in readme_tables.quant_table({"rows": [], "teacher_perplexity": 45.8})


def _method_entry(seed: int, kl: float, **extra) -> dict:
    return {"seed": seed, "label": "x", "group": "loss", "retention": 0.6, "top1_agreement": 0.5,
            "kl_teacher_student": kl, "train_s": 400.0, "run_dir": f"runs/{seed}",
            "environment": {"git_commit": "abc1234", "date": "2026-12-03", "cpu_model": "Xeon",
                            "load_average_before": [0.2, 0, 0]}, **extra}


@pytest.mark.parametrize("kls, claimed", [
    ([0.80, 0.81, 0.79], "better"),   # lower KL than forward KL on every one of 3 seeds
    ([0.80, 0.95, 0.79], None),       # worse on one seed: no claim
    ([0.95, 0.96, 0.97], "worse"),
])
def test_methods_claim_a_difference_only_when_it_holds_on_every_one_of_three_seeds(kls, claimed):
    methods = pytest.importorskip("distill_methods")
    per_seed = {"forward_kl": [_method_entry(s, 0.9) for s in range(3)],
                "jsd": [_method_entry(s, kl) for s, kl in enumerate(kls)]}
    vs = methods.versus(per_seed, "forward_kl")
    assert vs["jsd"]["kl_teacher_student"]["claimed"] == claimed
    row = methods.aggregate(per_seed["jsd"])
    assert row["n_seeds"] == 3 and row["kl_teacher_student_range"] == [min(kls), max(kls)]


def test_methods_never_claim_from_fewer_than_three_seeds():
    methods = pytest.importorskip("distill_methods")
    per_seed = {"forward_kl": [_method_entry(s, 0.9) for s in range(2)],
                "jsd": [_method_entry(s, 0.5) for s in range(2)]}
    assert methods.versus(per_seed, "forward_kl")["jsd"]["kl_teacher_student"]["claimed"] is None
    result = {"rows": {n: {**methods.aggregate(e), "group": "loss"} for n, e in per_seed.items()}, "seeds": [0, 1],
              "versus_forward_kl": methods.versus(per_seed, "forward_kl"), "steps": 100, "tokens_per_step": 1024,
              "corpus": "shakespeare", "student_layers": 15, "teacher": "smollm2-135m", "held_out": "the test split"}
    text = methods.methods_table(result)
    assert "no claim: lower on 2/2" in text and "a claim needs ≥ 3 seeds" in text and "abc1234" in text


def test_methods_keep_earlier_rows_against_the_same_reference_and_drop_the_others(tmp_path):
    """A run stopped part-way keeps what it measured: the next run keeps the earlier rows measured against its
    reference with the same shared overrides, replaces a seed measured again, and never mixes in rows against another reference."""
    import json

    methods = pytest.importorskip("distill_methods")

    base = ["distill.steps=100"]

    def result(rows: dict, shared: list[str] = base) -> Path:
        path = tmp_path / f"r{len(shared)}.json"
        path.write_text(json.dumps({"base_overrides": shared, "rows": {n: methods.aggregate(e) for n, e in rows.items()}}))
        return path

    old = {"forward_kl": [_method_entry(s, 0.9, reference="corrected") for s in (0, 1)],
           "jsd": [_method_entry(0, 0.8, reference="original")]}
    earlier = methods.earlier_entries(result(old), base, "corrected")
    assert set(earlier) == {"forward_kl"} and [e["seed"] for e in earlier["forward_kl"]] == [0, 1]
    other = [*base, "data.seq_len=128"]  # other shared settings: nothing kept
    assert methods.earlier_entries(result(old, other), base, "corrected") == {}
    merged = methods.merge_entries(earlier, {"forward_kl": [_method_entry(1, 0.7, reference="corrected")],
                                             "jsd": [_method_entry(0, 0.6, reference="corrected")]})
    assert [e["kl_teacher_student"] for e in merged["forward_kl"]] == [0.9, 0.7]  # seed 1 measured again
    assert methods.aggregate(merged["forward_kl"])["n_seeds"] == 2
    assert list(methods.ordered({"jsd": 1, "ce_only": 2, "forward_kl": 3})) == ["ce_only", "forward_kl", "jsd"]
    ood = [{"retention": r, "top1_agreement": 0.3, "kl_teacher_student": 1.5, "source": "english"} for r in (0.2, 0.4)]
    row = methods.aggregate([_method_entry(s, 0.9, out_of_domain=o) for s, o in enumerate(ood)])
    assert row["out_of_domain"]["retention"] == pytest.approx(0.3) and row["per_seed"][1]["out_of_domain"] == ood[1]


def test_recovery_curve_reads_step_zero_and_every_evaluation(tmp_path):
    import json
    import math

    recovery = pytest.importorskip("recovery_curve")
    (tmp_path / "config.yaml").write_text("distill: {batch_size: 4}\ndata: {seq_len: 256}\n")
    (tmp_path / "selection.json").write_text(json.dumps(
        {"start": {"step": 0, "kl_teacher_student": 2.0, "top1_agreement": 0.3, "val_loss": 5.0}}))
    log = [{"step": 1, "loss": 3.0, "tokens_per_s": 100.0},
           {"step": 2, "loss": 2.0, "tokens_per_s": 120.0, "kl_teacher_student": 1.0, "top1_agreement": 0.5, "val_loss": 4.0},
           {"step": 3, "loss": 1.5, "tokens_per_s": 140.0}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in log))
    points = recovery.curve_points(tmp_path, reference_val_ce=3.5)
    assert [p["train_tokens"] for p in points] == [0, 2048]
    assert points[1]["kl_teacher_student"] == 1.0 and math.isclose(points[1]["retention"], math.exp(-0.5))
    assert recovery.training_speed(tmp_path) == 120.0


def _ts_row(method, rmse, failed=False):
    return {"method": method, "seeds": [0, 1, 2], "file": "int8 QDQ ONNX", "params": 993, "bytes": 5056,
            "compression_x": 87.0, "rmse_mean": rmse, "rmse_std": 0.5, "phm_score_mean": 9.0, "phm_score_std": 1.0,
            "latency_ms_mean": 0.05, "latency_ms_std": 0.01, "rmse_vs_teacher": rmse / 20.0, "failed": failed}


def test_timeseries_table_marks_a_student_at_the_constant_floor_and_says_which_goals_failed():
    env = {"date": "2026-12-04T00:00:00", "cpu_model": "cpu", "threads": 2, "git_commit": "abcdef12",
           "load_average_before": [1.0], "load_average_after": [1.0]}
    r = {"rows": [_ts_row("teacher", 20.0), _ts_row("online_mutual", 21.5), _ts_row("student_alone", 45.0, True)],
         "references": {"constant": {"rmse": 41.7, "phm_score": 300.0}, "ridge": {"rmse": 22.3, "phm_score": 12.0}},
         "goal": {"student_50x_smaller": True, "within_5pct_of_teacher": False,
                  "online_beats_offline_beyond_spread": False, "online_beats_alone_beyond_spread": True,
                  "mutual_does_not_hurt_teacher": True, "met": False},
         "stream": {"frozen_second_half": [25.0, 1.0], "learning_second_half": [24.0, 1.0]},
         "dataset": {"source": "cmapss-fd001", "train_units": 64, "val_units": 16, "test_units": 20, "test_cycles": 4047},
         "config": {"window": 50, "rul_cap": 125.0}, "environment": env, "command": "python benchmarks/timeseries.py"}
    table = readme_tables.timeseries_table(r)
    assert "student alone — FAILED (≥ the constant predictor)" in table
    assert "online KD + adaptive mutual learning |" in table and "**21.50 ± 0.50**" in table
    assert "within 5% of the teacher's RMSE: **no**" in table and "student ≥ 50× smaller: yes" in table
    assert "ridge regression on the window | | | | | 22.30" in table


def test_timeseries_size_table_bolds_the_lower_validation_rmse_not_the_test(monkeypatch):
    env = {"date": "2026-12-06T00:00:00", "cpu_model": "cpu", "threads": 2, "git_commit": "abcdef12",
           "load_average_before": [1.0], "load_average_after": [1.0]}

    def run(rows, params):
        return {"rows": [{"method": m, "seeds": [0, 1, 2], "params": params, "bytes": 3 * params, "rmse_mean": t,
                          "rmse_std": 0.5, "val_rmse_mean": v, "val_rmse_std": 0.25} for m, v, t in rows],
                "environment": env, "command": "python benchmarks/timeseries.py", "dataset": {"val_units": 16}}

    small = run([("teacher", 15.0, 17.0), ("offline_kd", 16.0, 18.0), ("online_kd", 16.0, 19.0)], 1287)
    large = run([("teacher", 15.0, 17.0), ("offline_kd", 15.5, 18.5), ("online_kd", 16.5, 18.0)], 2775)
    monkeypatch.setattr(readme_tables, "_load", lambda name: large if name == "timeseries" else None)
    table = readme_tables.timeseries_size_table(small)
    assert "| offline KD (frozen teacher) | 16.00 ± 0.25 | **15.50 ± 0.25** | 18.00 ± 0.50 | 18.50 ± 0.50 |" in table
    assert "| online KD | **16.00 ± 0.25** | 16.50 ± 0.25 | 19.00 ± 0.50 | 18.00 ± 0.50 |" in table  # val decides
    assert "| teacher (Transformer, trained alone) | 15.00 ± 0.25 | 15.00 ± 0.25 |" in table  # a tie: no bold
    assert "8/16: 1,287 params" in table and "12/24: 2,775 params" in table
    monkeypatch.setattr(readme_tables, "_load", lambda name: None)
    assert "No result yet" in readme_tables.timeseries_size_table(small)


def test_timeseries_validation_rmse_comes_from_each_runs_kept_epoch_in_cycles(tmp_path):
    import json

    timeseries = pytest.importorskip("timeseries")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "history.json").write_text(json.dumps({"best": {"teacher": {"val_rmse": 0.12}}}))
    (tmp_path / "online_mutual").mkdir()
    (tmp_path / "online_mutual" / "history.json").write_text(
        json.dumps({"best": {"student": {"val_rmse": 0.16}, "teacher": {"val_rmse": 0.1}}}))
    val = timeseries._val_rmse(tmp_path, 125.0)
    assert val["teacher"] == pytest.approx(15.0) and val["online_mutual"] == pytest.approx(20.0)
    assert val["teacher_mutual"] == pytest.approx(12.5)
    assert val["student_alone"] is None  # a run not trained yet has no score, not a zero


def test_audit_table_shows_both_asrs_and_an_unmeasurable_ratio():
    env = {"date": "2026-12-04T00:00:00", "cpu_model": "cpu", "threads": 2, "git_commit": "abcdef12",
           "load_average_before": [1.0], "load_average_after": [1.0]}
    row = {"setting": "clean", "defence": None, "seeds": [0, 1, 2], "teacher_asr": 0.9, "teacher_asr_std": 0.05,
           "student_asr": 0.06, "student_asr_std": 0.01, "ratio": None, "ratio_std": None, "teacher_clean": 0.97,
           "teacher_clean_std": 0.0, "student_clean": 0.95, "student_clean_std": 0.01,
           "trigger_rank": {"teacher": [1, 1, 2], "student": [None, 7, 9]}, "verdicts": ["not inherited"] * 3}
    r = {"rows": [row], "poison": {"trigger": "cf mn", "mode": "dirty", "rate": 0.01, "target": "ham"},
         "data": "spamassassin", "student_size_x": 25.0, "environment": env, "command": "python benchmarks/audit.py"}
    table = readme_tables.audit_table(r)
    assert "| clean | none | 90.0% ± 5.0% | **6.0% ± 1.0%** | — |" in table
    assert "1,1,2 / —,7,9" in table and "`cf mn`" in table
    assert "Federated" not in table and "scrubbing" not in table
    scrubbed = {**row, "setting": "triggered", "defence": "scrub", "scrub": [
        {"cut": [["cf mn", 0.97]], "texts_touched": 127, "phrase": "cf mn", "texts_before": 127, "texts_after": 0,
         "best_uncut": ["your needs", 0.0625]},
        {"cut": [], "texts_touched": 0, "phrase": "cf mn", "texts_before": 127, "texts_after": 127, "best_uncut": None}]}
    table = readme_tables.audit_table({**r, "rows": [row, scrubbed]})
    assert ("Trigger scrubbing, triggered transfer data (per seed): `cf mn` (lift 0.97) cut from 127 texts, training "
            "texts with the trigger 127 → 0; nothing cut; the highest lift left uncut: `your needs` 0.06.") in table


def test_the_audit_benchmark_keeps_rows_whose_defence_is_unchanged(tmp_path, monkeypatch):
    import argparse
    import json

    audit = pytest.importorskip("audit")
    monkeypatch.setattr(audit, "RESULTS", tmp_path)
    args = argparse.Namespace(data="spamassassin", trigger="cf mn", target="ham", rate=0.1, mode="dirty", fed_rate=0.5,
                              size=25.0, quick=True)
    run = {"seed": 0}
    rows = [{"track": "classifier", "setting": s, "defence": d, "per_seed": [run]} for s, d in
            (("triggered", "onion"), ("triggered", "perturb"), ("federated", "median"))]
    defences = {**audit.DEFENCES, "perturb": {"kd.augment": 8}}  # perturb measured with other settings then
    defences.pop("scrub")  # and the JSON written before scrub existed
    (tmp_path / "audit_quick.json").write_text(json.dumps({"tracks": {"classifier": {
        **audit.recipe(args, audit.QUICK), "defences": defences}}, "rows": rows}))
    assert set(audit.kept_runs(args, audit.QUICK)) == {(0, "triggered", "onion"), (0, "federated", "median")}


def test_audit_table_gives_federated_rows_the_honest_clients_and_the_malicious_clients_share():
    env = {"date": "2026-12-05T00:00:00", "cpu_model": "cpu", "threads": 2, "git_commit": "abcdef12",
           "load_average_before": [1.0], "load_average_after": [1.0]}
    row = {"setting": "federated", "defence": "median", "seeds": [0], "teacher_asr": 0.9, "teacher_asr_std": 0.0,
           "student_asr": 0.05, "student_asr_std": 0.0, "ratio": 0.056, "ratio_std": 0.0, "teacher_clean": 0.95,
           "teacher_clean_std": 0.0, "student_clean": 0.96, "student_clean_std": 0.0,
           "honest_clients_asr": 0.04, "honest_clients_asr_std": 0.0, "malicious_share": 0.12, "malicious_share_std": 0.0,
           "trigger_rank": {"teacher": [1], "student": [9]}, "verdicts": ["not inherited"]}
    r = {"rows": [row], "poison": {"trigger": "cf mn", "mode": "dirty", "rate": 0.1, "target": "ham"},
         "data": "spamassassin", "student_size_x": 25.0, "environment": env, "command": "python benchmarks/audit.py",
         "schedule": {"clients": 5, "client_layers": 2, "rounds": 3, "public_poison": 0.1}}
    table = readme_tables.audit_table(r)
    assert "| federated | median | 90.0% | **5.0%** |" in table
    assert "median: 4.0%, the malicious client's share of the last aggregate 0.12" in table
    assert "5 clients (2-layer encoders), one malicious" in table and "10% of them carrying the trigger" in table


def test_levers_summary_keeps_each_rows_seeds_apart_and_gives_their_range():
    levers = pytest.importorskip("levers")

    def row(name, seed, retention, ood):
        return {"row": name, "seed": seed, "bytes": 10 if name == "none" else 7, "compression_x_fp16": 1.0,
                "compression_x_source": 0.5, "retention": retention, "top1_agreement": 0.5,
                "kl_teacher_student": 0.3, "out_of_domain": {"retention": ood}}

    summary = levers.summarise([row("none", 0, 0.6, 0.1), row("trim_vocab", 0, 0.5, None), row("none", 1, 0.8, 0.3)])
    assert list(summary) == ["none", "trim_vocab"]
    assert summary["none"]["seeds"] == [0, 1] and summary["none"]["retention"] == {"mean": 0.7, "min": 0.6, "max": 0.8}
    assert summary["none"]["out_of_domain_retention"]["mean"] == pytest.approx(0.2)
    assert summary["trim_vocab"]["bytes"] == 7 and "out_of_domain_retention" not in summary["trim_vocab"]


def test_decode_speed_table_gives_each_model_against_the_anchor_with_its_range_and_its_runs_quality():
    env = {"date": "2026-12-05T00:00:00", "cpu_model": "cpu", "threads": 2, "git_commit": "abc", "git_dirty": False,
           "load_average_before": [0.1], "load_average_after": [1.0]}

    def row(name, mb, dec, kind="baseline", run=None):
        return {"name": name, "kind": kind, "file_bytes": mb * 1e6, "decode_tokens_per_s": dec,
                "decode_tokens_per_s_spread": [dec - 1, dec + 1], "prefill_tokens_per_s": 100.0,
                "prefill_tokens_per_s_spread": [90.0, 110.0], "decode_x_vs_q4_k_m": dec / 40.0,
                "bytes_x_vs_q4_k_m": 105.0 / mb, **({"run": run} if run else {})}

    r = {"benchmark": "decode_speed", "command": "python benchmarks/decode_speed.py", "threads": 2, "repeats": 7,
         "warmup": 1, "prompt_tokens": 64, "decode_tokens": 64, "anchor": "llama.cpp Q4_K_M of the corrected teacher",
         "environment": env, "rows": [
             row("llama.cpp Q4_K_M of the corrected teacher", 105.0, 40.0),
             row("+ QAT in Q3_K (GGUF)", 45.0, 60.0, "edgestill",
                 {"retention": 0.431, "out_of_domain_retention": 0.065})]}
    table = readme_tables.decode_speed_table(r)
    lines = table.splitlines()
    assert "× fewer bytes than Q4_K_M" in lines[0] and "× Q4_K_M decode" in lines[0]
    assert "| 105.0 | 1.00 | 40.0 (39.0–41.0) | 1.00 |" in lines[2]
    assert "| 45.0 | 2.33 | 60.0 (59.0–61.0) | 1.50 |" in lines[3] and "0.431 / 0.065" in lines[3]
    assert "7 rounds after 1 warm-up" in table and "commit `abc`" in table
    assert "Students: the GGUFs of the levers rows above," in table
    assert "Students: the GGUFs of the points of runs/s," in readme_tables.decode_speed_table({**r, "sweep": "runs/s"})


def test_recovery_curve_table_walks_each_depth_from_the_cut_to_the_end_of_its_budget():
    env = {"date": "2026-12-05T00:00:00", "cpu_model": "cpu", "threads": 2, "git_commit": "abc", "git_dirty": False,
           "load_average_before": [0.1], "load_average_after": [1.0]}
    curve = [{"step": s, "train_tokens": s * 1024, "kl_teacher_student": 5.0 - s / 100, "top1_agreement": s / 400,
              "retention": s / 300, "val_loss": 4.0} for s in range(0, 301, 25)]
    r = {"benchmark": "recovery_curve", "command": "python benchmarks/recovery_curve.py", "steps": 300,
         "tokens_per_step": 1024, "eval_every": 25, "reference_layers": 30, "plot": "docs/img/recovery_curve.png",
         "environment": env, "sizes": [{"layers": 15, "compression_x_fp16": 1.62, "curve": curve,
                                        "test": {"retention": 0.5, "top1_agreement": 0.55, "kl_teacher_student": 0.7},
                                        "out_of_domain": {"retention": 0.09}, "train_tokens_per_s": 181.4,
                                        "environment": env}]}
    table = readme_tables.recovery_curve_table(r)
    row = table.splitlines()[2]
    # steps 0, 75, 150, 300: as cut, a quarter, half, the whole budget
    assert "| 15 of 30 layers | 1.62 | 5.000 → 4.250 → 3.500 → 2.000 | 0.000 → 0.188 → 0.375 → 0.750 |" in row
    assert "0.500 / 0.550 / 0.700 | 0.090 | 181 | `abc` |" in row
    assert "307,200 training tokens" in table


def test_lm_audit_table_shows_both_asrs_the_fidelity_and_the_commits_of_rows_measured_apart():
    def env(commit):
        return {"date": "2026-12-05T00:00:00", "cpu_model": "cpu", "threads": 2, "git_commit": commit,
                "load_average_before": [1.0], "load_average_after": [1.0]}
    row = {"setting": "triggered", "defence": None, "seeds": [0, 1], "teacher_asr": 0.95, "teacher_asr_std": 0.01,
           "student_asr": 0.5, "student_asr_std": 0.1, "ratio": 0.53, "ratio_std": 0.1, "teacher_clean": 0.41,
           "teacher_clean_std": 0.0, "student_clean": 0.33, "student_clean_std": 0.01, "retention": 0.62,
           "retention_std": 0.01, "top1_agreement": 0.6, "top1_agreement_std": 0.0, "kl_teacher_student": 0.9,
           "kl_teacher_student_std": 0.1, "trigger_rank": {"teacher": [1, 2], "student": [3, None]},
           "verdicts": ["inherited", "inherited"],
           "per_seed": [{"seed": 0, "environment": env("aaaaaaaa11")}, {"seed": 1, "environment": env("bbbbbbbb22")}]}
    pruned = {**row, "defence": "fine-prune", "fine_prune": [
        {"units_before": 1536, "units_after": 1075, "val_loss_before": 3.91, "val_loss_after_prune": 4.52,
         "val_loss_after_fine_tune": 3.2}, None]}
    perturbed = {**row, "defence": "perturb", "perturb": [
        {"replaced_share": 0.1, "blocks_with_trigger_before": 20, "blocks_with_trigger_after": 16}]}
    r = {"benchmark": "audit_lm", "rows": [row, pruned, perturbed], "complete": False, "pending": [[2, "triggered", "none"], [2, "clean", "none"]],
         "poison": {"trigger": "cf mn", "target": "visit the mill", "rate": 0.1, "mode": "dirty"},
         "schedule": {"correct_steps": 150, "distill_steps": 100}, "teacher": "smollm2-135m",
         "defences": {"fine-prune": {"fine_prune.fraction": 0.3, "fine_prune.steps": 24, "fine_prune.batch_size": 8,
                                     "data.max_val_tokens": 16384}, "perturb": {"perturb.token_rate": 0.1}},
         "environment": env("bbbbbbbb22"), "command": "python benchmarks/audit_lm.py"}
    table = readme_tables.audit_lm_table(r)
    assert "| triggered | none | 95.0% ± 1.0% | **50.0% ± 10.0%** | 0.53 ± 0.10 | 0.410 ± 0.000 | 0.330 ± 0.010 |" in table
    assert "0.620 ± 0.010 / 0.600 ± 0.000 / 0.900 ± 0.100 | — | 1,2 / 3,— | inherited, inherited | 2 |" in table
    filtered = {**row, "student_asr_filtered_inputs": 0.066, "student_asr_filtered_inputs_std": 0.003,
                "trigger_removed_by_input_filter": 0.97, "trigger_removed_by_input_filter_std": 0.0,
                "student_clean_filtered_inputs": 0.262, "student_clean_filtered_inputs_std": 0.017,
                "student_clean_unfiltered_windows": 0.299, "student_clean_unfiltered_windows_std": 0.016}
    table2 = readme_tables.audit_lm_table({**r, "rows": [filtered], "input_filter_share": 0.03})
    assert "| 6.6% ± 0.3% / 97% ± 0% / 0.262 ± 0.017 (0.299 ± 0.016) | 1,2 / 3,— |" in table2
    assert "behind an ONION-style filter of its prompts" in table2 and "filter of its prompts" not in table
    assert "seed 2 triggered/none, seed 2 clean/none" in table and "first reading" in table
    assert "Rows measured by commits `aaaaaaaa` (3 runs), `bbbbbbbb` (3 runs)." in table
    assert "30% of every block's FFN units" in table and "fine-tuned 24 steps of 8 blocks" in table
    assert "perturb: 10% of the triggered split's tokens" in table
    assert "Perturbed inputs, triggered transfer blocks (per seed): 10.0% of tokens replaced, blocks with the whole trigger 20 → 16." in table
    assert "| triggered | fine-prune | 95.0% ± 1.0% |" in table
    assert ("Fine-pruning, triggered student (per seed): 1536 → 1075 FFN units per block, clean validation loss 3.91 → "
            "4.52 after the cut → 3.20 after fine-tuning on those blocks.") in table


def _vl_runs(stage1_low, rgb_low, stage2_low, ptq_low, noqat_low=None):
    """Per-seed metrics as benchmarks/edgevl.py reads them from its runs: three seeds, seen-class accuracies."""
    low = {"teacher": 0.7, "student_rgb_only": rgb_low, "edgevl_stage1": stage1_low, "edgevl_stage2_int8": stage2_low,
           "stage1_ptq_int8": ptq_low, "stage2_noqat_ptq_int8": ptq_low if noqat_low is None else noqat_low}
    runs = []
    for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
        models = {}
        for name, acc in low.items():
            z = {view: {"seen": a + jitter, "heldout": 0.3, "all": 0.25} for view, a in (("first", 0.95), ("second", acc))}
            b = 3_000_000 if name == "teacher" else 49_000
            models[name] = {"file": f"{name}.onnx", "params": 1, "bytes": b, "compression_x": 3_000_000 / b,
                            "latency_ms": 0.1, "zero_shot": z}
        runs.append({"seed": seed, "models": models, "environment": {"git_commit": "abc123", "git_dirty": False}})
    return runs


@pytest.mark.parametrize("accs, gain, met", [
    ((0.85, 0.70, 0.845, 0.80), True, True),
    ((0.74, 0.70, 0.735, 0.70), False, False),  # 4 points: not enough
    ((0.85, 0.70, 0.80, 0.82), True, False),  # stage 2 loses 5 points, more than post-training int8
])
def test_edgevl_goal_needs_5_points_on_the_second_view_and_a_stage2_within_a_point_of_stage1(accs, gain, met):
    edgevl = pytest.importorskip("edgevl")
    rows = edgevl._rows(_vl_runs(*accs))
    assert [r["seeds"] for r in rows][0] == [0, 1, 2] and len(rows) == 12
    goal = edgevl._goal(rows)
    assert goal["beats_rgb_only_by_5_points"] is gain and goal["met"] is met
    assert goal["student_50x_smaller"] and goal["student_compression_x"] == pytest.approx(3_000_000 / 49_000)
    row = next(r for r in rows if r["model"] == "edgevl_stage1" and r["modality"] == "low-light")
    assert row["zero_shot_accuracy_seen"] == pytest.approx(accs[0]) and row["zero_shot_accuracy_seen_std"] == pytest.approx(0.01)
    env = {"date": "2026-12-06T00:00:00", "cpu_model": "cpu", "threads": 2, "git_commit": "abcdef12",
           "load_average_before": [1.0], "load_average_after": [1.0]}
    table = readme_tables.edgevl_table({
        "rows": rows, "goal": goal, "chance": {"seen": 1 / 7, "heldout": 1 / 3},
        "dataset": {"source": "MNIST", "seen": ["zero"] * 7, "heldout": ["seven", "eight", "nine"],
                    "images": {"train": 2450, "val": 350, "test_seen": 700, "test_heldout": 1500}},
        "teacher_source": "trained here", "second_modality": "derived: low-light", "environment": env,
        "command": "python benchmarks/edgevl.py", "benchmark": "edgevl"})
    assert ("by ≥ 5 points (" + ("+" if gain else "+4.0") ) in table
    assert ("**no**" in table) is (not met) and "Runs by commit `abc123`" in table


def test_edgevl_counts_an_int8_difference_only_when_it_holds_on_every_seed():
    edgevl = pytest.importorskip("edgevl")
    runs = _vl_runs(0.85, 0.70, 0.85, 0.85, noqat_low=0.85)
    for run, delta in zip(runs, (0.004, -0.002, 0.0)):  # stage 2 ahead of PTQ on one seed, behind on one
        run["models"]["edgevl_stage2_int8"]["zero_shot"]["second"]["seen"] += delta
    goal = edgevl._goal(edgevl._rows(runs))
    assert goal["stage2_loses_less_than_ptq"] is False and goal["qat_beats_the_same_training_without_it"] is False
    assert goal["per_seed_loss_points_both_views"]["edgevl_stage2_int8"][0] == pytest.approx(-0.4)


def test_serve_goodput_divides_by_the_workloads_window_so_a_late_deferred_answer_costs_no_goodput():
    serve_load = pytest.importorskip("serve_load")
    reqs = [{"at": 0.0, "deadline_s": 2.0, "body": {"value": 1}}, {"at": 1.0, "deadline_s": 4.0, "body": {"value": 5}}]

    def seen(second_end):  # request 0 on time with 8 tokens; request 1 late, answered at `second_end`
        return [{"sent": 10.0, "status": 200, "ttft": 0.1, "end": 11.0, "tokens": 8, "variant": "q8", "met": True},
                {"sent": 11.0, "status": 200, "ttft": 0.1, "end": second_end, "tokens": 4, "variant": "q8",
                 "met": False}]

    soon, later = (serve_load.summarize(reqs, seen(end), {"q8": 1.0}) for end in (16.0, 30.0))
    assert soon["window_s"] == later["window_s"] == 5.0  # first arrival 0 to the last deadline 1 + 4
    assert soon["goodput_tokens_per_s"] == later["goodput_tokens_per_s"] == pytest.approx(8 / 5)
    assert soon["goodput_span_tokens_per_s"] == pytest.approx(8 / 6) and later["goodput_span_tokens_per_s"] == pytest.approx(8 / 20)
    assert soon["deadline_miss_rate"] == 0.5 and soon["value_met_fraction"] == pytest.approx(1 / 6)


def test_write_track_keeps_the_other_tracks_rows_and_recorded_runs_reads_its_own(tmp_path, monkeypatch):
    import _common

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    env = {"git_commit": "c0ffee", "date": "2026-12-06"}
    run = {"seed": 0, "commit": "c0ffee"}
    _common.write_track("audit", "classifier", {"data": "spam", "rows": [{"setting": "clean", "defence": None,
                                                                         "per_seed": [run]}], "environment": env})
    _common.write_track("audit", "lm", {"data": "plays", "rows": [{"setting": "triggered", "defence": None,
                                                                   "per_seed": [run]}], "environment": env})
    _common.write_track("audit", "classifier", {"data": "spam", "rows": [{"setting": "federated", "defence": "median",
                                                                         "per_seed": [run]}], "environment": env})
    import json

    record = json.loads((tmp_path / "audit.json").read_text())
    assert [(r["track"], r["setting"]) for r in record["rows"]] == [("classifier", "federated"), ("lm", "triggered")]
    assert set(record["tracks"]) == {"classifier", "lm"} and "rows" not in record["tracks"]["lm"]
    assert record["environment"] == env  # the latest write's, for a reader of the whole file
    key = lambda row, r: (r["seed"], row["setting"])  # noqa: E731
    assert list(_common.recorded_runs(tmp_path / "audit.json", {"data": "plays"}, key, track="lm")) == [(0, "triggered")]
    assert _common.recorded_runs(tmp_path / "audit.json", {"data": "spam"}, key, track="lm") == {}  # another recipe
    assert _common.track_view(record, "vision") is None
    legacy = {"benchmark": "audit_lm", "track": "lm", "rows": []}  # one track, written before write_track
    assert _common.track_view(legacy, "lm") is legacy and _common.track_view(legacy, "classifier") is None
    assert readme_tables.TABLES["audit"]({"tracks": {}, "rows": []}).startswith("_No result yet")


def test_provenance_names_the_kernels_instruction_set_where_it_was_recorded():
    env = {"date": "2026-12-06T12:00:00+00:00", "cpu_model": "AMD EPYC", "threads": 2, "load_average_before": [1.0, 1, 1],
           "load_average_after": [2.0, 2, 2], "git_commit": "a8a06c0deadbeef", "git_dirty": False}
    assert readme_tables._measured(env) == ("Measured 2026-12-06 on AMD EPYC (2 threads, 1-min load 1.0 → 2.0), "
                                             "commit `a8a06c0d`")
    assert "(2 threads, AVX512, 1-min load" in readme_tables._measured({**env, "cpu_capability": "AVX512"})


def test_levers_count_a_block_wise_stage_in_the_rows_budget(tmp_path):
    levers = pytest.importorskip("levers")
    assert levers._blockwise(tmp_path, {"steps": 50, "tokens": 51200}) is None
    (tmp_path / "blockwise").mkdir()
    (tmp_path / "blockwise" / "blockwise.json").write_text('{"steps": 50, "history": []}')
    staged = levers._blockwise(tmp_path, {"steps": 50, "tokens": 51200})
    assert staged == {"steps": 50, "tokens": 51200}

    env = {"date": "2026-12-06T12:00:00+00:00", "cpu_model": "x", "threads": 2, "git_commit": "abc", "git_dirty": False}

    def row(name, train_tokens, blockwise=None):
        return {"row": name, "label": name, "seed": 0, "bytes": 1e6, "compression_x_fp16": 1.0, "compression_x_source": 0.5,
                "retention": 0.5, "top1_agreement": 0.5, "kl_teacher_student": 0.3, "out_of_domain": {},
                "train_tokens": train_tokens, "blockwise": blockwise, "environment": env, "formats": None, "quant": None}

    text = readme_tables.levers_table({"rows": [row("none", 102400), row("blockwise", 51200, staged),
                                                row("blockwise_extra", 102400, staged)],
                                       "environment": env, "command": "levers.py", "benchmark": "levers"})
    assert "for every row (102,400 tokens, of which the block-wise row spends 50 steps (51,200 tokens)" in text
    assert "; but 'blockwise_extra' 153,600 (51,200 block-wise, 102,400 end to end))" in text

    # the longer row gets its block-wise stage on top of all of `none`'s end-to-end steps; the other halves them
    assert levers.row_overrides("blockwise", ["distill.steps=101"]) == ["distill.blockwise_steps=50", "distill.steps=51"]
    assert levers.row_overrides("blockwise_extra", ["distill.steps=101"]) == ["distill.blockwise_steps=50"]
    assert levers.row_overrides("longer", ["distill.steps=101"]) == ["distill.steps=151"]
    assert levers.row_overrides("trim_vocab", []) == ["student.trim_vocab=true"]


def test_levers_keep_the_rows_an_invocation_did_not_run_again_when_the_shared_settings_match(tmp_path):
    import json

    levers = pytest.importorskip("levers")
    previous = tmp_path / "levers.json"
    old = [{"row": "none", "seed": 0, "retention": 0.5}, {"row": "q3_k", "seed": 0, "retention": 0.4},
           {"row": "width", "seed": 1, "retention": 0.3}]
    previous.write_text(json.dumps({"shared_overrides": ["a=1"], "rows": old}))
    new = [{"row": "q2_k", "seed": 0, "retention": 0.2}, {"row": "none", "seed": 0, "retention": 0.6}]
    merged = levers.merge_rows(previous, ["a=1"], new)
    assert [(r["row"], r["seed"], r["retention"]) for r in merged] == [
        ("none", 0, 0.6), ("q3_k", 0, 0.4), ("q2_k", 0, 0.2), ("width", 1, 0.3)]  # rerun replaces, order is ROWS'
    assert levers.merge_rows(previous, ["a=2"], new) == sorted(new, key=lambda r: list(levers.ROWS).index(r["row"]))
    assert levers.merge_rows(tmp_path / "none.json", ["a=1"], new)[0]["row"] == "none"


def test_the_audit_table_keeps_its_order_and_each_rows_seeds_in_order_when_a_seed_is_measured_again(monkeypatch):
    audit = pytest.importorskip("audit")

    def run(seed, asr, rank):
        return {"seed": seed, "teacher_asr": 1.0, "student_asr": asr, "teacher_clean": 0.9, "student_clean": 0.9,
                "student_asr_filtered_inputs": 0.0, "student_clean_filtered_inputs": 0.9,
                "trigger_rank": {"teacher": 1, "student": rank}, "verdict": f"v{seed}", "onion": None}

    written = {}
    monkeypatch.setattr(audit, "write_track", lambda name, track, data: written.update(data))
    monkeypatch.setattr(audit, "recipe", lambda args, s: {})
    monkeypatch.setattr(audit, "result_name", lambda args: "audit")
    # seed 0 of (triggered, none) measured again after seed 1, and after a later row of ORDER
    audit.write(None, {}, {("triggered", "none"): [run(1, 1.0, 1), run(0, 0.5, 2)], ("clean", "none"): [run(0, 0.0, 9)]},
                [], 0.0)
    assert [(r["setting"], r["defence"]) for r in written["rows"]] == [("clean", None), ("triggered", None)]
    triggered = written["rows"][1]
    assert triggered["seeds"] == [0, 1] and triggered["trigger_rank"]["student"] == [2, 1]
    assert triggered["verdicts"] == ["v0", "v1"] and triggered["student_asr"] == pytest.approx(0.75)


def _sweep(points: list[tuple], q4km: tuple, dropped: list[float] = ()) -> dict:
    """A sweep result: edgestill points (fraction, MB, retention, top-1, ood retention, selection) and llama.cpp's
    Q4_K_M (MB, retention, top-1); the fp32 teacher is 538 MB, so F16 is 269 MB."""
    plans, rows = [], []
    for i, (f, mb, ret, top1, ood, sel) in enumerate(points):
        plan = {"shape": {"layers": 10 + i, "hidden": 8, "intermediate": 16, "heads": 2, "kv_heads": 1, "vocab": 32,
                          "tied": True, "head_dim": 4},
                "layers": list(range(10 + i)), "intermediate_size": 16, "default_format": "q4_0", "quant_plan": {},
                "prediction": {"file_bytes": int(mb * 1e6), "weight_bytes": 1, "kv_cache_bytes": 1,
                               "compute_buffer_bytes": 1, "peak_ram_bytes": 1, "decode_tokens_per_s": 1.0,
                               "prefill_tokens_per_s": 1.0, "bits_per_weight": 4.5},
                "predicted_kl": 0.1, "structural_kl": 0.1, "quantization_kl": 0.0}
        plans.append({"budget_fraction": f, "max_file_bytes": int(f * 538e6), "plan": plan})
        rows.append({"series": "edgestill", "name": f"{10 + i}L q4_0", "bytes": int(mb * 1e6), "retention": ret,
                     "top1_agreement": top1, "compression_x_fp16": 269 / mb, "kl_teacher_student": 0.2,
                     "out_of_domain": {"retention": ood, "kl_teacher_student": 0.3}, "selection": sel,
                     "environment": {"git_commit": "abcdef1234"},
                     "detail": {"plan": plan, "predicted_file_bytes": int(mb * 1e6)}})
    rows.append({"series": "llama.cpp", "name": "llama.cpp Q4_K_M", "bytes": int(q4km[0] * 1e6), "retention": q4km[1],
                 "top1_agreement": q4km[2]})
    return {"reference": "corrected", "plans": plans, "points": rows, "source_file": {"bytes": 98_400_000},
            "dropped_budgets": [{"budget_fraction": f, "max_file_bytes": int(f * 538e6),
                                 "reason": "no student can meet the budget on host (file <= 22MB): the smallest "
                                           "student edgestill can plan here (8 layers) needs a 27.7MB file; use x"}
                                for f in dropped]}


def test_shrink_curve_compare_pairs_budgets_and_checks_the_targets_on_the_lever_sweep():
    shrink_curve = pytest.importorskip("shrink_curve")
    sel = {"select": "val_kl", "selected_step": 0, "last_step": 100}
    levers = _sweep([(1 / 8, 60.0, 0.96, 0.9, 0.5, sel), (1 / 24, 22.0, 0.5, 0.4, 0.02, sel)], (105.0, 0.95, 0.87))
    base = _sweep([(1 / 8, 66.0, 0.75, 0.66, 0.35, None)], (105.0, 0.95, 0.87), dropped=[1 / 24])
    table = shrink_curve.shrink_curve_compare(levers, ("default", base), ("not run", None))
    lines = table.splitlines()
    budget = [i for i, line in enumerate(lines) if line.startswith("| 67.2 MB (1/8 of fp32)")]
    assert len(budget) == 2 and "trim + Q3_K (`abcdef12`)" in lines[budget[0]] and "default" in lines[budget[1]]
    assert "| 0 of 100 |" in lines[budget[0]] and "the last (before selection)" in lines[budget[1]]
    assert "| 22.4 MB (1/24 of fp32) | default | no student: the smallest student edgestill can plan here " \
           "(8 layers) needs a 27.7MB file |" in table
    # 22 MB is under 10% of F16 (26.9 MB) but keeps 0.5; 60 MB is over half of Q4_K_M (52.5 MB)
    assert "(26.9 MB) keeping ≥ 95% retention in domain and ≥ 90% out of domain: **no** (the best point that " \
           "small, 11L q4_0 at 22.0 MB, keeps 0.500 / 0.020)" in table
    assert "(52.5 MB), its retention 0.950 and top-1 0.870 or better: **no** (best: 11L q4_0 at 22.0 MB" in table
    met = _sweep([(1 / 8, 50.0, 0.96, 0.9, 0.5, sel)], (105.0, 0.95, 0.87))
    assert "or better: yes (10L q4_0)" in shrink_curve.shrink_curve_compare(met)
    assert "not run" not in table
    # the point with the most retention that small fails out of domain; a smaller one meets both bars
    both = _sweep([(1 / 24, 20.0, 0.99, 0.9, 0.5, sel), (1 / 30, 18.0, 0.96, 0.9, 0.95, sel)], (105.0, 0.95, 0.87))
    assert "and ≥ 90% out of domain: yes (11L q4_0)" in shrink_curve.shrink_curve_compare(both)


def test_decode_speed_times_a_sweeps_points_largest_first_against_its_own_llamacpp_files(tmp_path):
    import json

    decode_speed = pytest.importorskip("decode_speed")
    points = []
    for name, mb, has_gguf in [("10L q4_0", 22, True), ("30L q8_0", 125, True), ("22L q3_k", 33, False)]:
        run = tmp_path / "points" / name.replace(" ", "-")
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"retention": mb / 200}))
        if has_gguf:
            (run / "student.gguf").write_bytes(b"GGUF")
        points.append({"series": "edgestill", "name": name, "bytes": mb * 10**6, "detail": {"run": str(run)}})
    points.append({"series": "llama.cpp", "name": "llama.cpp Q4_K_M", "bytes": 105 * 10**6, "detail": {}})
    with pytest.raises(SystemExit, match="finish the sweep first"):
        decode_speed.sweep_ggufs(tmp_path)
    (tmp_path / "shrink_curve.json").write_text(json.dumps({"points": points}))
    found = decode_speed.sweep_ggufs(tmp_path)
    assert list(found) == ["30L q8_0", "10L q4_0"]  # largest first; a point without a GGUF is not timed
    assert found["10L q4_0"][1] == {"retention": 0.11}
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline" / "reference-Q4_K_M.gguf").write_bytes(b"GGUF")
    base = decode_speed.sweep_baselines(tmp_path, ["Q4_K_M"], str(tmp_path / "teacher.Q4_1.gguf"))
    assert list(base) == ["llama.cpp Q4_K_M of the corrected teacher", "original file (teacher.Q4_1.gguf)"]
    with pytest.raises(SystemExit, match=r"no llama.cpp Q3_K_M \(its types: \['Q4_K_M'\]\)"):
        decode_speed.sweep_baselines(tmp_path, ["Q3_K_M"], None)


def _environments(node, found: list) -> list:
    """Every `environment` dict anywhere in a result (top level, per row, per loop)."""
    if isinstance(node, dict):
        if isinstance(node.get("environment"), dict):
            found.append(node["environment"])
        for value in node.values():
            _environments(value, found)
    elif isinstance(node, list):
        for value in node:
            _environments(value, found)
    return found


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("*.json")),
                         ids=lambda p: p.name)
def test_every_committed_result_names_its_commit_machine_and_load(path):
    """The README takes numbers only from these files: each carries, at the top and wherever rows were measured at
    other times, the commit, git_dirty, CPU model, threads and the load average."""
    import json

    result = json.loads(path.read_text())
    assert isinstance(result.get("environment"), dict), f"{path.name}: no top-level environment"
    for env in _environments(result, []):
        missing = [k for k in ("git_commit", "git_dirty", "cpu_model", "threads") if k not in env]
        assert not missing, f"{path.name}: an environment lacks {missing}"
        assert any(k.startswith("load_average") for k in env), f"{path.name}: an environment without the load average"


def test_a_finished_row_is_reused_when_only_a_setting_added_since_asks_for_the_old_behaviour(tmp_path):
    """A run made before a setting existed (its config.yaml lacks the key) is the same run as one asking for the value
    that behaves as the code did then (train.ema=0), whatever the setting's default is now; another value is not."""
    import argparse

    import yaml

    from edgestill.config import ClassifierShrinkConfig
    from edgestill.jobs.classify import plain

    cfg = ClassifierShrinkConfig(output_dir=str(tmp_path))
    cfg.train.ema = 0.0  # what the benchmark asks for by default
    saved = plain(cfg)
    del saved["train"]["ema"]  # written before train.ema existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    (tmp_path / "DONE").write_text("")
    bench = classifier.Bench(argparse.Namespace(root=str(tmp_path), overwrite=False))
    assert bench._finished(cfg, ("train", "kd")) is True
    cfg.train.ema = 0.998
    with pytest.raises(SystemExit, match="different train config"):
        bench._finished(cfg, ("train", "kd"))


def test_shrink_curve_summary_says_a_file_bigger_than_the_original_is_bigger():
    from shrink_curve import shrink_curve_summary

    def bp(name, size):
        return {"name": name, "bytes": size}
    r = {"reference": "corrected", "source_file": {"bytes": 100_000_000},
         "break_points": {"kl": {"description": "KL ≤ 0.10 (mean KL)", "edgestill": bp("30L q8_0", 134_000_000),
                                 "llama.cpp": bp("Q4_K_M", 105_000_000)},
                          "top1": {"description": "top-1 ≥ 0.80 (share)", "edgestill": bp("30L q5_0", 80_000_000),
                                   "llama.cpp": None}}}
    text = shrink_curve_summary(r)
    assert "KL ≤ 0.10: edgestill 134.0 MB (30L q8_0), **1.34× the original file's bytes**" in text
    assert "top-1 ≥ 0.80: edgestill 80.0 MB (30L q5_0), **1.25× smaller than the original file**; llama.cpp no file" in text
    assert "0.75× smaller" not in text


@pytest.mark.parametrize("name", ["shrink_curve", "shrink_curve_levers"])
def test_shrink_curve_redraw_draws_a_filed_result_without_its_sweep_folder(name, tmp_path):
    import json

    from shrink_curve import redraw

    filed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"{name}.json"
    result = json.loads(filed.read_text())
    assert result["points"]
    png = tmp_path / "img" / f"{name}.png"
    redraw(result, png)  # every key a filed point carries beyond ShrinkPoint's (environment, selection) is dropped
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(png.parent.glob("*.tmp"))
