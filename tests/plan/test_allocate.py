"""Bit allocation and planning: budgets are never exceeded, tighter budgets never predict less loss,
infeasible budgets name the nearest plan, and plans are QuantConfigs that quantize_ accepts."""

from __future__ import annotations

import json

import pytest

from edgestill.errors import EdgestillError
from edgestill.plan.allocate import Budget, Plan, allocate, parse_bytes, plan, plan_dict
from edgestill.plan.cost import StudentShape, predict
from edgestill.plan.sensitivity import Sensitivity, unit_names
from edgestill.quant.fake_quant import quantize_
from plan_fixtures import calib_batches, kernel_bound_device, tiny2, tiny2_dir, toy_device  # noqa: F401  (fixtures)

SHAPE = StudentShape(layers=6, hidden=512, intermediate=1536, heads=8, kv_heads=4, vocab=8000)
FORMATS = ("f16", "q8_0", "q5_0", "q4_0")


def fake_sensitivity(shape: StudentShape) -> Sensitivity:
    """Layer i is (i+1) times as sensitive; lower bits cost more (q4_0 = 10x q8_0)."""
    base = {"f16": 0.0, "q8_0": 0.001, "q5_0": 0.006, "q4_0": 0.01}
    kl = {u: {f: v * (i + 1) for f, v in base.items()} for i, u in enumerate(unit_names(shape.layers))}
    return Sensitivity(units=list(kl), formats=list(FORMATS), kl=kl)


def test_allocator_never_exceeds_the_memory_budget(toy_device):
    sens = fake_sensitivity(SHAPE)
    full = predict(SHAPE, {}, toy_device, "f16").peak_ram_bytes
    low = predict(SHAPE, {}, toy_device, "q4_0").peak_ram_bytes
    previous_kl = -1.0
    for frac in [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.38, 0.36, 0.35, 0.34]:
        budget = Budget(max_ram_bytes=int(full * frac))
        if budget.max_ram_bytes < low:
            with pytest.raises(EdgestillError):
                allocate(SHAPE, sens, toy_device, budget, FORMATS)
            continue
        formats, pred, kl = allocate(SHAPE, sens, toy_device, budget, FORMATS)
        assert pred.peak_ram_bytes <= budget.max_ram_bytes
        assert kl >= previous_kl  # a tighter budget never buys a better predicted quality
        previous_kl = kl
    assert previous_kl > 0


def test_least_sensitive_layers_are_lowered_first(toy_device):
    sens = fake_sensitivity(SHAPE)
    full = predict(SHAPE, {}, toy_device, "f16").file_bytes
    formats, pred, _ = allocate(SHAPE, sens, toy_device, Budget(max_file_bytes=int(full * 0.85)), FORMATS)
    bits = [FORMATS.index(formats[u]) for u in unit_names(SHAPE.layers)[:-1]]
    assert bits == sorted(bits, reverse=True)  # layer 0 (least sensitive) at least as low as layer 5
    assert pred.file_bytes <= full * 0.85


def _jumpy_sensitivity(shape: StudentShape) -> Sensitivity:
    """Layer 0 loses almost nothing more at q4_0 than at q8_0, so the lowering jumps it straight to q4_0 (the best KL
    per byte freed), freeing far more than a budget just under f16 needs; every other unit is 100x as sensitive."""
    kl = {u: {"f16": 0.0, "q8_0": 0.1, "q5_0": 0.6, "q4_0": 1.0} for u in unit_names(shape.layers)}
    kl["model.layers.0"] = {"f16": 0.0, "q8_0": 0.001, "q5_0": 0.0011, "q4_0": 0.0012}
    return Sensitivity(units=list(kl), formats=list(FORMATS), kl=kl)


def test_the_refill_pass_spends_what_a_jump_freed(toy_device):
    full = predict(SHAPE, {}, toy_device, "f16").file_bytes
    layer = 2 * (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1536) // 2  # ~ bytes of one layer's Linears in f16
    formats, pred, kl = allocate(SHAPE, _jumpy_sensitivity(SHAPE), toy_device, Budget(max_file_bytes=full - layer // 10),
                                 FORMATS)
    lowered = {u: f for u, f in formats.items() if f != "f16"}
    assert lowered == {"model.layers.0": "q8_0"}, lowered  # jumped to q4_0, then raised back as far as the budget allows
    assert kl == pytest.approx(0.001)


@pytest.mark.parametrize("frac", [0.85, 0.7, 0.55, 0.45])
@pytest.mark.parametrize("sensitivity", [fake_sensitivity, _jumpy_sensitivity])
def test_no_bytes_a_better_format_could_use_are_left_over(toy_device, frac, sensitivity):
    """The refill pass: after allocation, raising any one unit to any format it measures better in breaks the budget."""
    sens = sensitivity(SHAPE)
    budget = Budget(max_file_bytes=int(predict(SHAPE, {}, toy_device, "f16").file_bytes * frac))
    formats, pred, kl = allocate(SHAPE, sens, toy_device, budget, FORMATS)
    assert pred.file_bytes <= budget.max_file_bytes
    for u, cur in formats.items():
        for f in FORMATS[:FORMATS.index(cur)]:
            if sens.kl[u][f] >= sens.kl[u][cur]:
                continue
            default, plan_ = plan_dict({**formats, u: f})
            assert budget.violations(predict(SHAPE, plan_, toy_device, default)), (u, cur, f)


def test_speed_budget_is_met(toy_device):
    sens = fake_sensitivity(SHAPE)
    slow = predict(SHAPE, {}, toy_device, "f16").decode_tokens_per_s
    fast = predict(SHAPE, {}, toy_device, "q4_0").decode_tokens_per_s
    target = (slow + fast) / 2
    _, pred, _ = allocate(SHAPE, sens, toy_device, Budget(min_decode_tokens_per_s=target), FORMATS)
    assert pred.decode_tokens_per_s >= target


def test_plan_ranks_feasible_students_and_they_quantize(tiny2, calib_batches, toy_device):
    from edgestill.plan.cost import gguf_bytes

    shape = StudentShape.from_config(tiny2.config)
    budget = Budget(max_file_bytes=int(gguf_bytes(shape, {}, "q8_0")["file"]))
    plans = plan(tiny2, toy_device, budget, calib_batches, formats=("f16", "q8_0", "q4_0"), depths=[2, 1],
                 widths=[128, 64])
    assert plans and [p.predicted_kl for p in plans] == sorted(p.predicted_kl for p in plans)
    for p in plans:
        assert p.prediction.file_bytes <= budget.max_file_bytes
        assert p.prediction.peak_ram_bytes <= toy_device.ram_bytes.value
        assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))).to_dict() == p.to_dict()
    best = plans[0]
    if best.shape.layers == 2 and best.shape.intermediate == 128:
        report = quantize_(tiny2, best.quant_config(), step="convert")
        assert len(report) == 2 * 7 + 1


def test_a_trimmed_vocabulary_plan_prices_the_cut_and_measures_the_trimmed_students_kl(tiny2, calib_batches, toy_device):
    """plan(vocab_keep=...): a budget only the trim meets is met at full depth, every candidate has the kept rows, and
    a sliced candidate's structural KL is what the trimmed student it describes really scores (its own renumbered ids
    and cut head) against the teacher renormalised over the kept tokens."""
    import copy
    import dataclasses

    import torch
    import torch.nn.functional as F

    from edgestill.models.slice import slice_decoder
    from edgestill.models.vocab import VocabTrim, trim_embeddings_
    from edgestill.plan.cost import gguf_bytes

    shape = StudentShape.from_config(tiny2.config)
    used = sorted({int(i) for b in calib_batches for i in b.flatten()})
    keep = sorted(set(used) | {0, 1, 2})  # the calibration text's tokens and the specials
    trimmed_shape = dataclasses.replace(shape, vocab=len(keep))
    budget = Budget(max_file_bytes=int(gguf_bytes(trimmed_shape, {}, "q4_0")["file"]))
    assert budget.max_file_bytes < gguf_bytes(shape, {}, "q4_0")["file"]  # the untrimmed teacher cannot fit
    kwargs = dict(formats=("q8_0", "q4_0"), depths=[2, 1], widths=[128])
    assert all(p.shape.layers == 1 for p in plan(tiny2, toy_device, budget, calib_batches, **kwargs))
    plans = plan(tiny2, toy_device, budget, calib_batches, vocab_keep=keep, **kwargs)
    assert {p.shape.vocab for p in plans} == {len(keep)}
    best = next(p for p in plans if p.shape.layers == 2)  # full depth fits once the embedding is cut
    assert best.structural_kl == 0.0  # the trim alone changes nothing over the kept tokens
    assert best.vocab["size"] == len(keep) and best.vocab["teacher_size"] == shape.vocab
    assert 0.0 < best.vocab["teacher_mass_trimmed"] < 1.0
    assert "vocabulary" in best.summary() and Plan.from_dict(json.loads(json.dumps(best.to_dict()))).vocab == best.vocab
    if not any(p.shape.layers == 1 for p in plans):
        plans = plan(tiny2, toy_device, Budget(max_file_bytes=10**9), calib_batches, vocab_keep=keep, **kwargs)
    sliced = next(p for p in plans if p.shape.layers == 1)

    trim = VocabTrim(tuple(keep), (), shape.vocab)
    student = trim_embeddings_(slice_decoder(copy.deepcopy(tiny2), sliced.layers), trim).eval()
    table = torch.as_tensor(trim.new_ids())
    total = 0.0
    with torch.no_grad():
        for ids in calib_batches:
            ref = F.log_softmax(tiny2(input_ids=ids).logits.double()[..., keep], -1)
            out = F.log_softmax(student(input_ids=table[ids]).logits.double(), -1)
            total += float((ref.exp() * (ref - out)).sum())
    assert sliced.structural_kl == pytest.approx(total / sum(b.numel() for b in calib_batches), rel=1e-5)
    with pytest.raises(EdgestillError, match="vocab_keep must hold token ids"):
        plan(tiny2, toy_device, budget, calib_batches, vocab_keep=[shape.vocab], **kwargs)


def test_an_infeasible_budget_names_the_nearest_plan(tiny2, calib_batches, kernel_bound_device):
    """The floor check passes a budget some mix might meet; if the greedy finds none, the nearest is named.

    On this device q8_0 decodes faster than q4_0: the file limit needs all q4_0, the speed all q8_0.
    """
    from edgestill.plan.allocate import student_floor

    shape = StudentShape.from_config(tiny2.config)
    floor = student_floor(shape, kernel_bound_device, ("q8_0", "q4_0"), [2, 1], [128])
    budget = Budget(max_file_bytes=floor.bound.file_bytes, min_decode_tokens_per_s=floor.bound.decode_tokens_per_s)
    with pytest.raises(EdgestillError, match=r"nearest: \d+ layers.*it would need (max_file_bytes|min_decode)"):
        plan(tiny2, kernel_bound_device, budget, calib_batches, formats=("q8_0", "q4_0"), depths=[2, 1], widths=[128])


def test_parse_bytes():
    assert parse_bytes("300MB") == 300_000_000 and parse_bytes("1GiB") == 2**30 and parse_bytes(5) == 5
    assert parse_bytes("1.5 mb") == 1_500_000 and parse_bytes("2e3KB") == 2_000_000 and parse_bytes(None) is None
    for nonsense in ("lots", "MB", "", "5 parsecs", "1.2.3MB"):
        with pytest.raises(EdgestillError, match="is not a size; write e.g. 300MB"):
            parse_bytes(nonsense)
    for impossible in ("-5MB", "0", "0KB", "0.0001KB", "1e400", 0, -5):
        with pytest.raises(EdgestillError, match="is not a usable size: a budget must be at least 1 byte"):
            parse_bytes(impossible)


@pytest.mark.parametrize("field", ["max_ram_bytes", "max_file_bytes", "min_decode_tokens_per_s",
                                   "min_prefill_tokens_per_s"])
@pytest.mark.parametrize("value", [0, -1, float("nan")])
def test_a_zero_or_negative_budget_is_refused_at_once(field, value):
    with pytest.raises(EdgestillError, match=f"the budget's {field} .* is {value}: a limit must be positive"):
        Budget(**{field: value})
    with pytest.raises(EdgestillError, match="must be positive"):
        Budget.from_dict({field: value})
    assert getattr(Budget(**{field: 1}), field) == 1
