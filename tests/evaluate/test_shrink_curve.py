"""Shrink-curve break points and report files."""

from __future__ import annotations

import json

from edgestill.evaluate.shrink_curve import ShrinkPoint, break_points, write_shrink_report


def _points():
    return [
        ShrinkPoint("a", 2.0, 0.99, 0.95, 100),
        ShrinkPoint("b", 4.0, 0.96, 0.90, 50),
        ShrinkPoint("c", 8.0, 0.93, 0.85, 25),
        ShrinkPoint("d", 16.0, 0.97, 0.80, 12),  # a non-monotone curve: a better point further out counts
        ShrinkPoint("e", 32.0, 0.50, 0.40, 6),
        ShrinkPoint("Q8_0", 3.8, 0.999, 0.98, 140, series="llama.cpp"),
    ]


def test_break_points_are_the_most_compressed_measured_points_keeping_the_threshold():
    ours = [p for p in _points() if p.series == "edgestill"]
    bp = break_points(ours, (0.95, 0.90, 0.999))
    assert bp["0.95"]["name"] == "d" and bp["0.95"]["compression_x_fp32"] == 16.0
    assert bp["0.90"]["name"] == "d"
    assert bp["1.00"] is None  # no point keeps 99.9%


def test_report_writes_json_png_and_html(tmp_path):
    result = write_shrink_report(tmp_path, _points(), {"title": "tiny"}, thresholds=(0.95, 0.60))
    saved = json.loads((tmp_path / "shrink_curve.json").read_text())
    assert saved["break_points"] == result["break_points"]
    assert saved["break_points"]["0.60"]["name"] == "d"  # the llama.cpp baseline never counts as a break point
    assert {p["series"] for p in saved["points"]} == {"edgestill", "llama.cpp"}
    assert (tmp_path / "shrink_curve.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and "16.00×" in page
