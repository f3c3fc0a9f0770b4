"""Shrink-curve break points (retention and fidelity, per series), points from a run's metrics, and report files."""

from __future__ import annotations

import json

import pytest

from edgestill.evaluate.shrink_curve import (
    Criterion,
    ShrinkPoint,
    break_point_lines,
    break_points,
    criteria,
    plot_shrink_curve,
    write_shrink_report,
)


def _p(name, mb, retention, top1, kl, series="edgestill", ood=None):
    size = int(mb * 1e6)
    return ShrinkPoint(name, 400e6 / size, retention, top1, size, series=series, kl_teacher_student=kl,
                       compression_x_fp16=200e6 / size, compression_x_source=100e6 / size, reference="corrected",
                       out_of_domain=ood)


def _points():
    return [
        _p("a", 200, 0.99, 0.95, 0.02, ood={"retention": 0.97, "top1_agreement": 0.90, "kl_teacher_student": 0.05}),
        _p("b", 100, 0.96, 0.88, 0.08),
        _p("c", 50, 0.93, 0.79, 0.30),
        _p("d", 25, 0.97, 0.83, 0.20),  # a non-monotone curve: a better point further out counts
        _p("e", 12, 1.10, 0.40, 1.50),  # "better" than the reference in domain, yet unfaithful: retention alone lies
        _p("llama.cpp Q8_0", 140, 0.999, 0.95, 0.005, series="llama.cpp"),
        _p("llama.cpp Q4_K_M", 105, 0.95, 0.84, 0.066, series="llama.cpp"),
        _p("llama.cpp Q2_K", 60, 0.71, 0.59, 0.47, series="llama.cpp"),
        _p("teacher.gguf", 98.4, 0.98, 0.93, 0.01, series="original file"),
    ]


def test_fidelity_break_points_are_the_smallest_files_meeting_each_bar_per_series():
    bp = break_points(_points(), criteria((0.95,), (0.90, 0.80), (0.10, 0.25)))
    assert list(bp) == ["kl_teacher_student<=0.10", "kl_teacher_student<=0.25", "top1_agreement>=0.90",
                        "top1_agreement>=0.80", "retention>=0.95"]
    name = {k: (v["edgestill"] and v["edgestill"]["name"], v["llama.cpp"] and v["llama.cpp"]["name"]) for k, v in bp.items()}
    assert name["kl_teacher_student<=0.10"] == ("b", "llama.cpp Q4_K_M")  # KL is a ceiling: 0.30 and 1.50 fail it
    assert name["kl_teacher_student<=0.25"] == ("d", "llama.cpp Q4_K_M")  # d (0.20) beyond c (0.30): smallest wins
    assert name["top1_agreement>=0.90"] == ("a", "llama.cpp Q8_0")
    assert name["top1_agreement>=0.80"] == ("d", "llama.cpp Q4_K_M")
    assert name["retention>=0.95"] == ("e", "llama.cpp Q4_K_M")  # what fidelity is there to catch
    assert bp["kl_teacher_student<=0.10"]["rule"] == "<=" and bp["top1_agreement>=0.90"]["rule"] == ">="
    assert bp["top1_agreement>=0.80"]["edgestill"]["bytes"] == 25_000_000
    assert all("original file" not in v for v in bp.values())  # one file, not a curve: no break point of its own
    assert break_points(_points(), [Criterion("kl_teacher_student", 0.001)])["kl_teacher_student<=0.00"]["edgestill"] is None


def test_a_point_without_the_measure_never_meets_its_bar():
    unmeasured = ShrinkPoint("x", 8.0, 0.99, 0.99, 10)  # no KL (say, a classifier's point)
    assert not Criterion("kl_teacher_student", 10.0).holds(unmeasured)
    assert Criterion("top1_agreement", 0.99).holds(unmeasured)


def test_a_point_reads_its_run_metrics_against_the_reference():
    m = {"compression_x_fp32": 8.0, "compression_x_fp16": 4.0, "compression_x_source": 1.5, "retention": 0.9,
         "top1_agreement": 0.8, "kl_teacher_student": 0.2, "reference": "corrected",
         "student": {"bytes": 1000, "perplexity": 30.0},
         "out_of_domain": {"retention": 0.7, "top1_agreement": 0.6, "kl_teacher_student": 0.5, "student_perplexity": 90.0,
                           "reference_perplexity": 60.0, "source": "general-english"},
         "environment": {"git_commit": "abc", "git_dirty": True, "date": "2026-12-01", "cpu_model": "x", "threads": 2,
                         "load_average_before": [1, 1, 1], "load_average_after": [2, 2, 2], "torch": "2.x"}}
    p = ShrinkPoint.from_metrics("8L q4_0", m, {"run": "r"})
    assert (p.bytes, p.compression_x_fp16, p.kl_teacher_student, p.reference) == (1000, 4.0, 0.2, "corrected")
    assert p.out_of_domain == {"retention": 0.7, "top1_agreement": 0.6, "kl_teacher_student": 0.5, "perplexity": 90.0}
    assert p.environment["git_dirty"] is True and p.environment["load_average_after"] == [2, 2, 2]
    assert "torch" not in p.environment
    assert ShrinkPoint.from_metrics("x", {**m, "out_of_domain": None}).out_of_domain is None  # eval.out_of_domain=null


def test_a_point_names_the_levers_its_run_pulled():
    m = {"compression_x_fp32": 20.0, "retention": 0.5, "top1_agreement": 0.5,
         "teacher": {"num_layers": 30, "intermediate_size": 1536, "hidden_size": 576},
         "student": {"bytes": 1000, "perplexity": 30.0, "num_layers": 10, "intermediate_size": 768, "quant": "q3_k",
                     "low_rank": None, "hidden_size": 288},
         "vocab_trim": {"student_vocab": 9000, "teacher_vocab": 49152, "teacher_trimmed_mass": 0.01}}
    assert ShrinkPoint.from_metrics("10L q3_k", m).levers == {
        "layers": [10, 30], "ffn": [768, 1536], "hidden": [288, 576], "vocab": [9000, 49152], "format": "q3_k",
        "low_rank": None}
    full = {**m, "student": {**m["student"], "num_layers": 30, "intermediate_size": 1536, "hidden_size": 576,
                             "quant": None, "low_rank": {"keep": 0.5, "factorized": 7, "ranks": {"a": 3}}},
            "vocab_trim": None}
    assert ShrinkPoint.from_metrics("30L", full).levers == {
        "layers": None, "ffn": None, "hidden": None, "vocab": None, "format": None,
        "low_rank": {"keep": 0.5, "factorized": 7}}
    older = {**m, "teacher": {"num_layers": 30}}  # a run from before the teacher's widths were recorded
    assert ShrinkPoint.from_metrics("10L", older).levers["ffn"] is None
    assert ShrinkPoint.from_metrics("10L", older).levers["hidden"] is None


def test_report_writes_json_png_and_html(tmp_path):
    meta = {"title": "tiny", "reference": "corrected", "source_file": {"path": "t.gguf", "bytes": 98_400_000},
            "dropped_budgets": [{"budget_fraction": 0.01, "max_file_bytes": 5_000_000, "reason": "too small"}]}
    result = write_shrink_report(tmp_path, _points(), meta, criteria((0.95, 0.60), (0.90,), (0.10,)))
    saved = json.loads((tmp_path / "shrink_curve.json").read_text())
    assert saved["break_points"] == result["break_points"]
    assert saved["thresholds"] == {"kl_teacher_student": [0.10], "top1_agreement": [0.90], "retention": [0.95, 0.60]}
    assert saved["reference"] == "corrected"
    assert saved["break_points"]["retention>=0.60"]["edgestill"]["name"] == "e"
    assert {p["series"] for p in saved["points"]} == {"edgestill", "llama.cpp", "original file"}
    for p in saved["points"]:
        assert {"reference", "bytes", "compression_x_fp16", "compression_x_source", "compression_x_fp32", "retention",
                "top1_agreement", "kl_teacher_student", "out_of_domain", "environment"} <= set(p)
    assert (tmp_path / "shrink_curve.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and "corrected teacher" in page
    for key in saved["break_points"]:  # each break point named, with what it means
        assert key.replace(">", "&gt;").replace("<", "&lt;") in page
    assert "mean KL(reference ‖ model)" in page and "too small" in page  # and the dropped budget with its reason
    lines = break_point_lines(saved)
    assert len(lines) == 4 and "edgestill 100.0 MB (b" in lines[0] and "llama.cpp 105.0 MB (llama.cpp Q4_K_M" in lines[0]


def test_the_classifier_curve_is_still_drawn_against_compression(tmp_path):
    points = [ShrinkPoint("fp32", 1.0, 1.0, 1.0, 400), ShrinkPoint("int8", 3.9, 0.99, 0.98, 103)]
    plot_shrink_curve(points, tmp_path / "c.png", title="classifier", retention_label="accuracy retention")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("measure,value,ok", [("kl_teacher_student", 0.25, True), ("kl_teacher_student", 0.2501, False),
                                              ("top1_agreement", 0.8, True), ("top1_agreement", 0.7999, False)])
def test_a_bar_includes_its_threshold(measure, value, ok):
    threshold = 0.25 if measure == "kl_teacher_student" else 0.8
    p = ShrinkPoint("x", 1.0, 1.0, 1.0, 1, kl_teacher_student=value if measure == "kl_teacher_student" else 0.0)
    if measure == "top1_agreement":
        p.top1_agreement = value
    assert Criterion(measure, threshold).holds(p) is ok
