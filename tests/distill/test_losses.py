"""Distillation losses: top-k KL vs dense KL, numerical safety, CE, the KD objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgestill.distill.losses import IGNORE_INDEX, cross_entropy, forward_kl, forward_kl_topk, kd_objective

B, T, V = 2, 5, 37


def _teacher_topk(teacher_logits: torch.Tensor, k: int):
    logp = F.log_softmax(teacher_logits.float(), dim=-1)
    return torch.topk(logp, k, dim=-1)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_full_vocab_equals_dense(logits, temperature):
    student, teacher = logits
    lp, ids = _teacher_topk(teacher, V)
    dense = forward_kl(student, teacher, temperature=temperature)
    topk = forward_kl_topk(student, lp, ids, temperature=temperature)
    assert dense.item() > 0.01  # the two distributions really differ
    torch.testing.assert_close(topk, dense, atol=1e-5, rtol=1e-5)


def test_topk_with_one_token_tail_equals_dense(logits):
    """k = V - 1 at T = 1: the tail bucket is a single token, so the bucketed KL is exactly the dense one."""
    student, teacher = logits
    lp, ids = _teacher_topk(teacher, V - 1)
    dense = forward_kl(student, teacher)
    torch.testing.assert_close(forward_kl_topk(student, lp, ids), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_equals_dense_under_mask(logits, temperature):
    student, teacher = logits
    mask = torch.ones(B, T)
    mask[0, 2:] = 0
    # T = 1: one-token tail ; T != 1: the full vocabulary
    lp, ids = _teacher_topk(teacher, V - 1 if temperature == 1.0 else V)
    dense = forward_kl(student, teacher, temperature=temperature, mask=mask)
    torch.testing.assert_close(forward_kl_topk(student, lp, ids, temperature=temperature, mask=mask), dense,
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dense, forward_kl(student, teacher, temperature=temperature), atol=1e-4)  # mask mattered


def test_dense_kl_zero_for_identical_logits(logits):
    student, _ = logits
    assert forward_kl(student, student).abs().item() < 1e-6
    lp, ids = _teacher_topk(student, 5)
    assert forward_kl_topk(student, lp, ids).abs().item() < 1e-5


@pytest.mark.parametrize("k", [1, 4, 16])
def test_topk_below_vocab_is_nonnegative(logits, k):
    student, teacher = logits
    lp, ids = _teacher_topk(teacher, k)
    kl = forward_kl_topk(student, lp, ids)
    assert torch.isfinite(kl)
    # Bucketing the tail is a coarsening: by the data-processing inequality it never exceeds the dense KL.
    assert 0.0 <= kl.item() <= forward_kl(student, teacher).item() + 1e-5


def test_topk_close_to_dense_for_peaked_teacher(logits):
    student, _ = logits
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(B, T, V, generator=g)
    teacher[..., :4] += 20.0  # almost all mass on 4 tokens
    lp, ids = _teacher_topk(teacher, 4)
    assert (lp.exp().sum(-1) > 0.999).all()
    dense = forward_kl(student, teacher)
    topk = forward_kl_topk(student, lp, ids)
    assert topk.item() == pytest.approx(dense.item(), abs=1e-2, rel=1e-2)


def test_topk_finite_when_student_puts_no_mass_on_some_tokens(logits):
    student, teacher = logits
    student = student.clone()
    student[..., 10:] = -1e4  # ~zero probability for most of the vocabulary, including the tail
    lp, ids = _teacher_topk(teacher, 8)
    for temperature in (1.0, 2.0):
        kl = forward_kl_topk(student.clone().requires_grad_(), lp, ids, temperature=temperature)
        assert torch.isfinite(kl), temperature
        assert kl.item() > 0
    # the student puts everything on the teacher's top k: the tail bucket is ~0 on both sides
    s2 = torch.full((B, T, V), -1e4)
    s2.scatter_(-1, ids, lp)
    kl = forward_kl_topk(s2.requires_grad_(), lp, ids)
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(s2.grad).all()


def test_topk_fp16_cache_inputs_work(logits):
    """The cache stores float16 log-probs and int32 ids; the loss upcasts and matches the fp32 result."""
    student, teacher = logits
    lp, ids = _teacher_topk(teacher, 8)
    kl = forward_kl_topk(student, lp.half(), ids.int())
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, forward_kl_topk(student, lp, ids), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("alpha, temperature", [(0.9, 1.0), (0.5, 2.0), (0.0, 3.0), (1.0, 0.5)])
def test_kd_objective_formula(alpha, temperature):
    kd, ce = torch.tensor(0.7), torch.tensor(2.3)
    expected = alpha * temperature**2 * 0.7 + (1 - alpha) * 2.3
    assert kd_objective(kd, ce, alpha, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_matches_torch(logits):
    student, _ = logits
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 0] = IGNORE_INDEX
    expected = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(student, labels), expected)
    # and the ignored position really is ignored
    labels2 = labels.clone()
    labels2[1, 0] = 0
    assert not torch.allclose(cross_entropy(student, labels2), expected)


def test_cross_entropy_half_logits_upcast(logits):
    student, _ = logits
    labels = torch.zeros(B, T, dtype=torch.long)
    out = cross_entropy(student.half(), labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.cross_entropy(student.reshape(-1, V), labels.reshape(-1)), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradient_flows_to_student_logits(logits, temperature):
    student, teacher = logits
    student = student.clone().requires_grad_()
    lp, ids = _teacher_topk(teacher, 8)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    loss = kd_objective(forward_kl_topk(student, lp, ids, temperature=temperature), cross_entropy(student, labels),
                        0.9, temperature)
    loss.backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum().item() > 0
    # a small step against the gradient lowers the loss
    with torch.no_grad():
        stepped = student - 0.1 * student.grad
        after = kd_objective(forward_kl_topk(stepped, lp, ids, temperature=temperature),
                             cross_entropy(stepped, labels), 0.9, temperature)
    assert after.item() < loss.item()


def test_topk_gradient_matches_dense_with_one_token_tail(logits):
    student, teacher = logits
    lp, ids = _teacher_topk(teacher, V - 1)
    s1 = student.clone().requires_grad_()
    s2 = student.clone().requires_grad_()
    forward_kl_topk(s1, lp, ids).backward()
    forward_kl(s2, teacher).backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-6, rtol=1e-4)
