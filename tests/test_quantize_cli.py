"""`edgestill quantize`: post-training RTN / GPTQ of the teacher, exported to GGUF and evaluated."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_overrides
from edgestill.cli import main

_TRAINING_ONLY = ("distill.", "student.")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_teacher(method, tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / method
    overrides = [o for o in tiny_overrides(tiny_model_dir, tiny_corpus, out) if not o.startswith(_TRAINING_ONLY)]
    assert main(["quantize", "--method", method, "--type", "q4_0", *overrides, "distill.batch_size=4"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["student"]["artifact"].endswith("student.gguf")
    assert m["student"]["params"] == m["teacher"]["params"]  # the whole teacher, only quantized
    assert m["student"]["bytes"] < m["teacher"]["bytes"] / 4  # 4.5 bits per weight vs fp32 (+ f32 norms)
    assert 0 < m["retention"] <= 1.5 and m["top1_agreement"] > 0.5
    assert {r["format"]["format"] for r in json.loads((out / "quant_report.json").read_text())} == {"GGUFQ4_0"}


def test_quantize_refuses_an_unknown_method(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "awq", "--teacher", str(tiny_model_dir)])
