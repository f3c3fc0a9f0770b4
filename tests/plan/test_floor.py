"""The feasibility floor: a budget even the smallest plannable student misses fails in milliseconds, before any
measurement, naming the least budget that would do (as the cost model predicts it); a budget at the floor passes."""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import pytest

from edgestill.errors import EdgestillError
from edgestill.plan.allocate import (Budget, check_budget, default_depths, default_widths, parse_bytes, plan,
                                     student_floor)
from edgestill.plan.cost import StudentShape, predict
from plan_fixtures import calib_batches, kernel_bound_device, tiny2, tiny2_dir, toy_device  # noqa: F401  (fixtures)

FORMATS = ("q8_0", "q5_0", "q4_0")


@pytest.fixture
def no_measurement(monkeypatch):
    """Every measurement plan() could make raises: a test using this proves none was started."""
    def measured(*args, **kwargs):
        raise AssertionError("a measurement ran although the budget is impossible")

    for target in ("edgestill.plan.sensitivity.layer_sensitivity", "edgestill.plan.sensitivity.model_logits",
                   "edgestill.plan.sensitivity.mean_kl", "edgestill.models.slice.block_influence"):
        monkeypatch.setattr(target, measured)


def mb_up(n: int) -> str:
    """What the message must print for a floor of n bytes: MB rounded up to a tenth (never below the floor)."""
    return f"{math.ceil(n / 1e5) / 10:.1f}MB"


def kb_up(n: int) -> str:
    return f"{math.ceil(n / 1e2) / 10:.1f}KB"


def smallest(model, depth: int, width: int) -> StudentShape:
    return dataclasses.replace(StudentShape.from_config(model.config), layers=depth, intermediate=width)


def test_an_impossible_ram_budget_fails_before_any_measurement(tiny2, calib_batches, toy_device, no_measurement):
    expected = predict(smallest(tiny2, 1, 64), {}, toy_device, "q4_0")  # fewest layers, narrowest FFN, lowest bits
    with pytest.raises(EdgestillError) as e:
        plan(tiny2, toy_device, Budget(max_ram_bytes=parse_bytes("1MB")), calib_batches, formats=FORMATS,
             depths=[2, 1], widths=[128, 64])
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("no student can meet the budget on toy (peak RAM <= 1MB (--max-memory)): ")
    assert "(1 layer, FFN 64, all q4_0)" in message
    assert f"needs a {kb_up(expected.file_bytes)} file and {mb_up(expected.peak_ram_bytes)} peak RAM" in message
    assert f"raise --max-memory to at least {mb_up(expected.peak_ram_bytes)}" in message


def test_a_tiny_file_budget_fails_before_any_measurement(tiny2, calib_batches, toy_device, no_measurement):
    expected = predict(smallest(tiny2, 2, 128), {}, toy_device, "q4_0", metadata_bytes=5000)
    least = f"raise --max-file-size to at least {kb_up(expected.file_bytes)}"
    with pytest.raises(EdgestillError, match=re.escape(least)):
        plan(tiny2, toy_device, Budget(max_file_bytes=1000), calib_batches, formats=FORMATS, depths=[2], widths=[128],
             metadata_bytes=5000)


def test_the_least_budget_named_is_met_and_one_byte_less_is_not(tiny2, toy_device):
    shape = StudentShape.from_config(tiny2.config)
    floor = student_floor(shape, toy_device, FORMATS, [2, 1], [128, 64])
    expected = predict(smallest(tiny2, 1, 64), {}, toy_device, "q4_0")
    assert floor.bound.file_bytes == expected.file_bytes and floor.bound.peak_ram_bytes == expected.peak_ram_bytes
    for field, value in (("max_ram_bytes", expected.peak_ram_bytes), ("max_file_bytes", expected.file_bytes)):
        check_budget(shape, toy_device, Budget(**{field: value}), FORMATS, [2, 1], [128, 64])
        with pytest.raises(EdgestillError, match="no student can meet the budget"):
            check_budget(shape, toy_device, Budget(**{field: value - 1}), FORMATS, [2, 1], [128, 64])
    # the value the line suggests, typed back as the user would, passes
    try:
        check_budget(shape, toy_device, Budget(max_ram_bytes=1000), FORMATS, [2, 1], [128, 64])
    except EdgestillError as e:
        suggested = re.search(r"raise --max-memory to at least (\S+)", str(e)).group(1)
    check_budget(shape, toy_device, Budget(max_ram_bytes=parse_bytes(suggested)), FORMATS, [2, 1], [128, 64])


def test_a_budget_at_the_floor_is_planned(tiny2, calib_batches, toy_device):
    """The floor is reachable: plan() finds the smallest student when the budget is exactly its peak RAM."""
    ram = predict(smallest(tiny2, 1, 64), {}, toy_device, "q4_0").peak_ram_bytes
    plans = plan(tiny2, toy_device, Budget(max_ram_bytes=ram), calib_batches, formats=("q8_0", "q4_0"),
                 depths=[2, 1], widths=[128, 64])
    assert [(p.shape.layers, p.shape.intermediate, p.prediction.peak_ram_bytes) for p in plans] == [(1, 64, ram)]


def test_an_unreachable_speed_names_the_fastest_student(tiny2, toy_device):
    shape = StudentShape.from_config(tiny2.config)
    fastest = predict(smallest(tiny2, 1, 64), {}, toy_device, "q4_0").decode_tokens_per_s  # memory-bound: q4_0
    with pytest.raises(EdgestillError) as e:
        check_budget(shape, toy_device, Budget(min_decode_tokens_per_s=1e9), FORMATS, [2, 1], [128, 64])
    said = float(re.search(r"lower --min-decode-tokens-per-s to at most ([0-9.]+)", str(e.value)).group(1))
    assert fastest * 0.99 <= said <= fastest
    assert "decode >= 1e+09 tok/s (--min-decode-tokens-per-s)" in str(e.value)


def test_the_floor_takes_each_units_fastest_format_for_speed(tiny2, kernel_bound_device):
    """Where q8_0 decodes faster than q4_0, a speed only all-q8_0 reaches is not refused (never a false refusal)."""
    shape = StudentShape.from_config(tiny2.config)
    q8 = predict(smallest(tiny2, 1, 128), {}, kernel_bound_device, "q8_0")
    q4 = predict(smallest(tiny2, 1, 128), {}, kernel_bound_device, "q4_0")
    assert q8.decode_tokens_per_s > q4.decode_tokens_per_s and q8.file_bytes > q4.file_bytes
    floor = check_budget(shape, kernel_bound_device, Budget(min_decode_tokens_per_s=q8.decode_tokens_per_s),
                         ("q8_0", "q4_0"), [1], [128])
    assert floor.bound.file_bytes == q4.file_bytes
    assert floor.bound.decode_tokens_per_s == pytest.approx(q8.decode_tokens_per_s)


def test_the_floor_follows_the_cost_models_fallbacks_and_an_untied_embedding(toy_device):
    # hidden 80: no 32-weight block divides the rows, so every matrix with 80 inputs is stored f16 whatever is asked;
    # q4_k falls back to q5_0 on rows of 64 (not 256), so q4_0 is smaller although its nominal bits are the same
    shape = StudentShape(layers=3, hidden=80, intermediate=128, heads=4, kv_heads=2, vocab=300, tied=False)
    floor = student_floor(shape, toy_device, ("q8_0", "q4_k", "q4_0"), [3, 2], [128, 64])
    expected = predict(dataclasses.replace(shape, layers=2, intermediate=64), {}, toy_device, "q4_0")
    assert floor.bound.file_bytes == expected.file_bytes and floor.bound.peak_ram_bytes == expected.peak_ram_bytes
    assert set(floor.formats.values()) == {"q4_0"}
    only_k = student_floor(shape, toy_device, ("q8_0", "q4_k"), [2], [64])
    assert only_k.bound.file_bytes == predict(dataclasses.replace(shape, layers=2, intermediate=64), {}, toy_device,
                                              "q4_k").file_bytes


def test_the_floor_is_below_every_candidate(toy_device):
    shape = StudentShape(layers=4, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=500)
    depths, widths = default_depths(shape.layers), default_widths(shape.intermediate)
    floor = student_floor(shape, toy_device, FORMATS, depths, widths)
    for depth in depths:
        for width in widths:
            for fmt in FORMATS:
                p = predict(dataclasses.replace(shape, layers=depth, intermediate=width), {}, toy_device, fmt)
                assert p.file_bytes >= floor.bound.file_bytes and p.peak_ram_bytes >= floor.bound.peak_ram_bytes
                assert p.decode_tokens_per_s <= floor.bound.decode_tokens_per_s * (1 + 1e-12)
                assert p.prefill_tokens_per_s <= floor.bound.prefill_tokens_per_s * (1 + 1e-12)


def test_bad_depths_are_still_refused_before_any_measurement(tiny2, calib_batches, toy_device, no_measurement):
    with pytest.raises(EdgestillError, match="depth 5 is outside 1..2"):
        plan(tiny2, toy_device, Budget(), calib_batches, depths=[5])
    with pytest.raises(EdgestillError, match="width 999 is outside 1..128"):
        plan(tiny2, toy_device, Budget(), calib_batches, widths=[999])


def test_plan_hints_at_fewer_layers_only_when_they_would_fit(toy_device):
    shape = StudentShape(layers=8, hidden=256, intermediate=512, heads=4, kv_heads=2, vocab=300)
    one = predict(dataclasses.replace(shape, layers=1), {}, toy_device, "q4_0").file_bytes
    two = predict(dataclasses.replace(shape, layers=2), {}, toy_device, "q4_0").file_bytes
    with pytest.raises(EdgestillError, match=re.escape(f"with --depths 1 the smallest needs a {kb_up(one)} file")):
        check_budget(shape, toy_device, Budget(max_file_bytes=(one + two) // 2), FORMATS, [2], [512])
    with pytest.raises(EdgestillError) as e:
        check_budget(shape, toy_device, Budget(max_file_bytes=one - 1), FORMATS, [2], [512])
    assert "--depths" not in str(e.value)


# --- shrink --device and sweep: the same floor, before the corpus is read or anything measured --------------

def test_shrink_for_a_device_fails_before_reading_the_text(tiny_model_dir, tiny_corpus, tmp_path, capsys, monkeypatch,
                                                           no_measurement):
    from conftest import load_tiny_teacher, tiny_overrides
    from edgestill.cli import main
    from edgestill.plan.load import load_device

    def read(*args, **kwargs):
        raise AssertionError("the corpus was tokenized although the budget is impossible")

    monkeypatch.setattr("edgestill.jobs.plan.corpus_blocks", read)
    teacher = load_tiny_teacher(tiny_model_dir)
    depth = min(default_depths(teacher.config.num_hidden_layers))
    width = min(default_widths(teacher.config.intermediate_size))
    expected = predict(smallest(teacher, depth, width), {}, load_device("rpi5"), "q4_0")
    out = tmp_path / "x"
    capsys.readouterr()  # loading the teacher above may draw a progress bar
    assert main(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=2), "--device", "rpi5",
                 "--max-memory", "1KB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "on rpi5-8gb (peak RAM <= 1KB (--max-memory))" in err
    assert f"({depth} layers, FFN {width}, all q4_0)" in err
    assert f"raise --max-memory to at least {mb_up(expected.peak_ram_bytes)}" in err
    assert "--depths" not in err and "--context" not in err  # shrink has neither option
    assert not out.exists()


def _sweep_inputs(tiny_model_dir, tiny_corpus, tmp_path):
    import numpy as np

    from conftest import load_tiny_teacher, tiny_overrides
    from edgestill.config import load_config

    cfg = load_config(overrides=tiny_overrides(tiny_model_dir, tiny_corpus, tmp_path / "unused", steps=2))
    teacher = load_tiny_teacher(tiny_model_dir)
    blocks = np.arange(4 * 16).reshape(4, 16) % teacher.config.vocab_size
    return cfg, teacher, blocks


def test_the_sweep_drops_an_impossible_budget_before_measuring(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch,
                                                                caplog):
    import edgestill.plan.sensitivity as sensitivity
    from edgestill.jobs.sweep import SweepSettings, make_plans

    cfg, teacher, blocks = _sweep_inputs(tiny_model_dir, tiny_corpus, tmp_path)
    real = sensitivity.layer_sensitivity

    def measured_after_the_warning(*args, **kwargs):
        assert any("dropped before planning" in r.getMessage() for r in caplog.records), "measured before the check"
        return real(*args, **kwargs)

    monkeypatch.setattr("edgestill.plan.sensitivity.layer_sensitivity", measured_after_the_warning)
    settings = SweepSettings(budgets=[0.5, 1e-5], device="rpi5-8gb", calibration_blocks=2)
    recorded: list = []
    with caplog.at_level(logging.WARNING, logger="edgestill"):
        plans = make_plans(cfg, settings, teacher, blocks, 0, dropped=recorded)
    assert [p["budget_fraction"] for p in plans] == [0.5]
    assert [d["budget_fraction"] for d in recorded] == [1e-5] and "no student can meet" in recorded[0]["reason"]
    dropped = [r.getMessage() for r in caplog.records if "dropped before planning" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].startswith("budget 1/100000 of the teacher dropped before planning: ")
    assert "(--budgets 1e-05 of the teacher)" in dropped[0] and "use --budgets no tighter than 1/" in dropped[0]


def test_a_sweep_with_no_possible_budget_fails_at_once(tiny_model_dir, tiny_corpus, tmp_path, no_measurement):
    from edgestill.plan.load import load_device
    from edgestill.jobs.sweep import SweepSettings, make_plans
    from edgestill.plan.allocate import DEFAULT_FORMATS as TRAIN_FORMATS

    cfg, teacher, blocks = _sweep_inputs(tiny_model_dir, tiny_corpus, tmp_path)
    shape = StudentShape.from_config(teacher.config)
    floor = student_floor(shape, load_device("rpi5-8gb"), TRAIN_FORMATS)
    teacher_bytes = 4 * sum(p.numel() for p in teacher.parameters())
    with pytest.raises(EdgestillError) as e:
        make_plans(cfg, SweepSettings(budgets=[1e-5, 1e-6], device="rpi5-8gb"), teacher, blocks, 0)
    message = str(e.value)
    assert message.startswith("no budget of the sweep can be met: no student can meet the budget on rpi5-8gb")
    assert "\n" not in message and "(--budgets 1e-05 of the teacher)" in message  # the loosest budget's reason
    n = int(re.search(r"no tighter than 1/(\d+) of the teacher", message).group(1))
    assert int(teacher_bytes / n) >= floor.bound.file_bytes > int(teacher_bytes / (n + 1))
