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
