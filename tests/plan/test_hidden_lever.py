"""The hidden-channel cut as a planner lever (--hidden-sizes): priced, measured and chosen like depth and FFN width,
and executed by the run config the plan makes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgestill.errors import EdgestillError
from edgestill.plan.allocate import Budget, candidate_hiddens, plan, student_floor
from edgestill.plan.cost import StudentShape, predict
from plan_fixtures import calib_batches, tiny2, tiny2_dir, toy_device  # noqa: F401  (fixtures)

FORMATS = ("q8_0", "q4_0")


def narrow(model, depth: int, width: int, hidden: int) -> StudentShape:
    shape = StudentShape.from_config(model.config)
    return dataclasses.replace(shape, layers=depth, intermediate=width, hidden=hidden, head_dim=shape.dim_per_head)


def test_candidate_hidden_sizes_are_validated():
    teacher = StudentShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=300)
    assert candidate_hiddens(teacher) == [64] and candidate_hiddens(teacher, [32, 64, 32]) == [64, 32]
    for bad in (48, 96, 0):
        with pytest.raises(EdgestillError, match="must be a multiple of 32 .* below the teacher's 64; use 32"):
            candidate_hiddens(teacher, [bad])
    # SmolLM2's 9 heads: transformers needs hidden % heads == 0, GGUF blocks of 32, so 288 is the only cut
    smollm = StudentShape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, head_dim=64)
    assert candidate_hiddens(smollm, [576, 288]) == [576, 288]
    with pytest.raises(EdgestillError, match="multiple of 288 .* 9 for the teacher's heads.*; use 288$"):
        candidate_hiddens(smollm, [576, 384])


def test_a_narrower_hidden_lowers_the_floor(tiny2, toy_device):
    shape = StudentShape.from_config(tiny2.config)
    full = student_floor(shape, toy_device, FORMATS, [1], [64])
    cut = student_floor(shape, toy_device, FORMATS, [1], [64], hiddens=[64, 32])
    assert cut.bound.file_bytes == predict(narrow(tiny2, 1, 64, 32), {}, toy_device, "q4_0").file_bytes
    assert cut.bound.file_bytes < full.bound.file_bytes
    assert cut.describe() == "1 layer, hidden 32, FFN 64, all q4_0"


def test_the_planner_cuts_hidden_channels_when_only_that_fits_and_measures_that_cut(tiny2, calib_batches, toy_device):
    from edgestill.models.slice import slice_decoder
    from edgestill.models.width import prune_width
    from edgestill.plan.sensitivity import mean_kl, model_logits

    file = predict(narrow(tiny2, 1, 64, 32), {}, toy_device, "q4_0").file_bytes  # the floor with the cut
    kwargs = dict(formats=FORMATS, depths=[2, 1], widths=[128, 64])
    with pytest.raises(EdgestillError, match="no student can meet the budget"):  # the teacher's hidden cannot
        plan(tiny2, toy_device, Budget(max_file_bytes=file), calib_batches, **kwargs)
    plans = plan(tiny2, toy_device, Budget(max_file_bytes=file), calib_batches, hiddens=[64, 32], **kwargs)
    assert [(p.shape.layers, p.shape.intermediate, p.shape.hidden) for p in plans] == [(1, 64, 32)]
    cut = [p for p in plans if p.shape.hidden == 32]
    assert cut and ", hidden 32," in cut[0].summary()
    best = cut[0]
    student = prune_width(slice_decoder(tiny2, best.layers, allow_full=True), calib_batches, hidden_size=32,
                          **({"intermediate_size": best.shape.intermediate} if best.shape.intermediate < 128 else {}))
    reference = model_logits(tiny2, calib_batches)
    assert best.structural_kl == pytest.approx(mean_kl(student, calib_batches, reference), rel=1e-6)
    assert best.shape.head_dim == 16  # the teacher's heads and head width are kept


def test_a_plan_with_a_narrower_hidden_sets_student_hidden_size(tiny2, calib_batches, toy_device):
    from edgestill.config import ShrinkConfig
    from edgestill.jobs.plan import point_config

    file = predict(narrow(tiny2, 2, 128, 32), {}, toy_device, "q4_0").file_bytes
    best = [p for p in plan(tiny2, toy_device, Budget(max_file_bytes=file), calib_batches, formats=FORMATS,
                            depths=[2], widths=[128], hiddens=[64, 32]) if p.shape.hidden == 32][0]
    cfg = point_config(ShrinkConfig(), best, Path("out"), 128, 64)
    assert cfg.student.hidden_size == 32 and cfg.student.intermediate_size is None
    assert point_config(ShrinkConfig(), best, Path("out"), 128, 32).student.hidden_size is None
