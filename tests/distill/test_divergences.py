"""The divergence family of distill/losses.py: reference formulas, mode seeking vs covering,
finiteness where a side has zeros, top-k = dense when k covers the vocabulary, YAML configs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from edgestill.distill.losses import (LOGIT_LOSS_KINDS, LogitLossConfig, aligned_logprobs, cross_entropy,
                                      cross_entropy_per_token, divergence, forward_kl_topk, logit_loss)
from edgestill.errors import EdgestillError

B, T, V = 2, 5, 37
ALL = [LogitLossConfig(kind=k) for k in LOGIT_LOSS_KINDS] + [LogitLossConfig(kind="jsd", beta=0.9),
                                                            LogitLossConfig(kind="skew_kl", skew=0.3)]


def _id(cfg):
    return f"{cfg.kind}-{cfg.skew}-{cfg.beta}"


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2


def _reference(p: torch.Tensor, q: torch.Tensor, cfg: LogitLossConfig) -> torch.Tensor:
    """Textbook formulas on probabilities in float64 (no zeros here)."""
    def kl(a, b):
        return (a * (a / b).log()).sum(-1)
    a, b = cfg.skew, cfg.beta
    return {
        "forward_kl": lambda: kl(p, q),
        "reverse_kl": lambda: kl(q, p),
        "skew_kl": lambda: kl(p, a * p + (1 - a) * q),
        "skew_reverse_kl": lambda: kl(q, (1 - a) * p + a * q),
        "jsd": lambda: b * kl(p, b * p + (1 - b) * q) + (1 - b) * kl(q, b * p + (1 - b) * q),
        "total_variation": lambda: 0.5 * (p - q).abs().sum(-1),
    }[cfg.kind]()


@pytest.mark.parametrize("cfg", ALL, ids=_id)
def test_matches_reference_formula(logits, cfg):
    student, teacher = logits
    log_p, log_q = aligned_logprobs(student, teacher)
    got = divergence(log_p, log_q, cfg)
    want = _reference(log_p.double().exp(), log_q.double().exp(), cfg).float()
    assert got.shape == (B, T)
    assert got.min().item() > 1e-3  # the distributions differ, so the check is not vacuous
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert divergence(log_q, log_q, cfg).abs().max().item() < 1e-5  # zero for identical inputs


def test_known_relations(logits):
    student, teacher = logits
    log_p, log_q = aligned_logprobs(student, teacher)
    d = lambda **kw: divergence(log_p, log_q, LogitLossConfig(**kw))  # noqa: E731
    torch.testing.assert_close(d(kind="reverse_kl"), divergence(log_q, log_p, LogitLossConfig(kind="forward_kl")))
    torch.testing.assert_close(d(kind="skew_kl", skew=0.0), d(kind="forward_kl"))
    torch.testing.assert_close(d(kind="skew_reverse_kl", skew=0.0), d(kind="reverse_kl"))
    jsd = d(kind="jsd", beta=0.5)
    assert (jsd <= math.log(2) + 1e-6).all()
    torch.testing.assert_close(jsd, divergence(log_q, log_p, LogitLossConfig(kind="jsd", beta=0.5)))  # symmetric
    tv = d(kind="total_variation")
    assert ((tv >= 0) & (tv <= 1)).all()
    # Pinsker: TV <= sqrt(KL / 2)
    assert (tv <= (d(kind="forward_kl") / 2).sqrt() + 1e-6).all()


# --- mode seeking vs mode covering ----------------------------------------------------------------------

VOCAB_1D = 64
MODES = (16.0, 48.0)


def _bimodal_teacher() -> torch.Tensor:
    v = torch.arange(VOCAB_1D, dtype=torch.float32)
    p = sum(torch.exp(-((v - m) ** 2) / (2 * 3.0**2)) for m in MODES)
    return p.log().view(1, 1, VOCAB_1D)  # log of unnormalised probabilities = valid logits


def _fit_gaussian_student(cfg: LogitLossConfig, steps: int = 400) -> tuple[float, float, torch.Tensor]:
    """A unimodal student logits(v) = -(v - mu)^2 / (2 sigma^2) fitted by Adam; returns (mu, sigma, q)."""
    teacher = _bimodal_teacher()
    v = torch.arange(VOCAB_1D, dtype=torch.float32)
    mu = torch.tensor(22.0, requires_grad=True)  # off-centre, nearer the left mode
    log_sigma = torch.tensor(math.log(4.0), requires_grad=True)
    opt = torch.optim.Adam([mu, log_sigma], lr=0.05)
    for _ in range(steps):
        student = (-((v - mu) ** 2) / (2 * log_sigma.exp() ** 2)).view(1, 1, VOCAB_1D)
        loss = logit_loss(student, cfg, teacher_logits=teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = F.softmax(student.detach().view(-1), dim=-1)
    return mu.item(), log_sigma.exp().item(), q


def _mass_near(q: torch.Tensor, mode: float, radius: float = 6.0) -> float:
    v = torch.arange(VOCAB_1D, dtype=torch.float32)
    return q[(v - mode).abs() <= radius].sum().item()


def test_forward_kl_covers_both_modes():
    mu, sigma, q = _fit_gaussian_student(LogitLossConfig(kind="forward_kl"))
    assert MODES[0] + 4 < mu < MODES[1] - 4, mu  # pulled off the nearer mode towards the middle
    assert sigma > 10.0, sigma  # wide enough to cover both
    left, right = _mass_near(q, MODES[0]), _mass_near(q, MODES[1])
    assert left > 0.1 and right > 0.1 and 0.5 < left / right < 2.0


@pytest.mark.parametrize("cfg", [LogitLossConfig(kind="reverse_kl"), LogitLossConfig(kind="jsd", beta=0.9)], ids=_id)
def test_reverse_kl_and_jsd_lock_onto_one_mode(cfg):
    mu, sigma, q = _fit_gaussian_student(cfg)
    nearest = min(MODES, key=lambda m: abs(m - mu))
    other = max(MODES, key=lambda m: abs(m - mu))
    assert abs(mu - nearest) < 2.0, mu
    assert sigma < 5.0, sigma  # about the width of one mode (3)
    assert _mass_near(q, nearest) > 0.9
    assert _mass_near(q, other) < 0.01


# --- zeros on one side -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["skew_kl", "skew_reverse_kl", "jsd", "reverse_kl", "total_variation"])
def test_finite_where_student_has_zero_mass(logits, kind):
    student, teacher = logits
    student = student.clone()
    student[..., 10:] = float("-inf")  # q = 0 on most of the vocabulary, where p > 0
    s = student.requires_grad_()
    cfg = LogitLossConfig(kind=kind)
    loss = logit_loss(s, cfg, teacher_logits=teacher)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(s.grad).all()
    # the same through a top-k cache whose tail the student does not reach either
    lp, ids = torch.topk(F.log_softmax(teacher, -1), 8, dim=-1)
    s2 = student.detach().clone().requires_grad_()
    loss2 = logit_loss(s2, cfg, topk_logprobs=lp, topk_ids=ids)
    loss2.backward()
    assert torch.isfinite(loss2) and torch.isfinite(s2.grad).all()


def test_forward_kl_is_infinite_where_student_has_zero_mass(logits):
    """The contrast that makes skew KL worth having: plain KL(p || q) blows up where q = 0 < p."""
    student, teacher = logits
    student = student.clone()
    student[..., 10:] = float("-inf")
    log_p, log_q = aligned_logprobs(student, teacher)
    assert torch.isinf(divergence(log_p, log_q, LogitLossConfig(kind="forward_kl"))).all()
    assert torch.isfinite(divergence(log_p, log_q, LogitLossConfig(kind="skew_kl"))).all()


@pytest.mark.parametrize("kind", ["forward_kl", "skew_kl", "skew_reverse_kl", "jsd"])
def test_finite_where_teacher_has_zero_mass(logits, kind):
    student, teacher = logits
    teacher = teacher.clone()
    teacher[..., :5] = float("-inf")
    s = student.clone().requires_grad_()
    loss = logit_loss(s, LogitLossConfig(kind=kind), teacher_logits=teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_no_nan_gradient_where_both_sides_are_zero(logits):
    student, teacher = logits
    student, teacher = student.clone(), teacher.clone()
    student[..., :4] = float("-inf")
    teacher[..., :4] = float("-inf")
    for cfg in ALL:
        s = student.clone().requires_grad_()
        loss = logit_loss(s, cfg, teacher_logits=teacher)
        loss.backward()
        assert torch.isfinite(loss), cfg.kind
        assert torch.isfinite(s.grad).all(), cfg.kind
        assert s.grad.abs().sum() > 0, cfg.kind


# --- top-k = dense --------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("cfg", ALL, ids=_id)
def test_topk_with_full_vocab_equals_dense(logits, cfg, temperature):
    student, teacher = logits
    cfg = dataclasses.replace(cfg, temperature=temperature)
    lp, ids = torch.topk(F.log_softmax(teacher, -1), V, dim=-1)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    dense = logit_loss(s1, cfg, teacher_logits=teacher, mask=mask)
    topk = logit_loss(s2, cfg, topk_logprobs=lp, topk_ids=ids, mask=mask)
    assert dense.item() > 1e-3
    torch.testing.assert_close(topk, dense, atol=1e-5, rtol=1e-5)
    dense.backward()
    topk.backward()
    torch.testing.assert_close(s2.grad, s1.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("cfg", ALL, ids=_id)
def test_topk_with_one_token_tail_equals_dense(cfg):
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    lp, ids = torch.topk(F.log_softmax(teacher, -1), V - 1, dim=-1)
    torch.testing.assert_close(logit_loss(student, cfg, topk_logprobs=lp, topk_ids=ids),
                               logit_loss(student, cfg, teacher_logits=teacher), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("cfg", ALL, ids=_id)
def test_topk_is_a_coarsening(logits, cfg, k):
    """Merging buckets never increases an f-divergence (data processing): 0 <= top-k <= dense."""
    student, teacher = logits
    lp, ids = torch.topk(F.log_softmax(teacher, -1), k, dim=-1)
    topk = logit_loss(student, cfg, topk_logprobs=lp, topk_ids=ids)
    assert 0.0 <= topk.item() <= logit_loss(student, cfg, teacher_logits=teacher).item() + 1e-4


def test_forward_kind_is_the_existing_topk_loss(logits):
    """The default objective must stay bit-identical: kind=forward_kl goes through forward_kl_topk, and the
    bucket formula agrees with it."""
    student, teacher = logits
    lp, ids = torch.topk(F.log_softmax(teacher, -1), 8, dim=-1)
    cfg = LogitLossConfig()
    assert torch.equal(logit_loss(student, cfg, topk_logprobs=lp, topk_ids=ids), forward_kl_topk(student, lp, ids))
    log_p, log_q = aligned_logprobs(student, topk_logprobs=lp, topk_ids=ids)
    torch.testing.assert_close(divergence(log_p, log_q, cfg).mean(), forward_kl_topk(student, lp, ids))


def test_fp16_cache_whose_topk_sums_past_one_stays_finite(logits):
    student, _ = logits
    teacher = torch.full((B, T, V), -30.0)
    teacher[..., 0] = 30.0  # p(top) rounds to 1 in fp16: the tail is <= 0 after rounding
    lp, ids = torch.topk(F.log_softmax(teacher, -1), 4, dim=-1)
    for cfg in ALL:
        loss = logit_loss(student, cfg, topk_logprobs=lp.half(), topk_ids=ids.int())
        assert torch.isfinite(loss), cfg.kind


def test_token_weights_reweight_positions(logits):
    student, teacher = logits
    cfg = LogitLossConfig(kind="reverse_kl")
    log_p, log_q = aligned_logprobs(student, teacher)
    per_token = divergence(log_p, log_q, cfg)
    w = torch.zeros(B, T)
    w[0, 1] = 1.0
    torch.testing.assert_close(logit_loss(student, cfg, teacher_logits=teacher, token_weights=w), per_token[0, 1] / (B * T))


def test_cross_entropy_per_token_matches_mean():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = -100
    per = cross_entropy_per_token(s, labels)
    assert per[0, 0] == 0
    torch.testing.assert_close(per.sum() / (labels != -100).sum(), cross_entropy(s, labels))


# --- configs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", ALL, ids=_id)
def test_config_round_trips_through_yaml(cfg):
    text = yaml.safe_dump(dataclasses.asdict(cfg))
    assert LogitLossConfig(**yaml.safe_load(text)) == cfg


@pytest.mark.parametrize("kw, word", [({"kind": "kl"}, "reverse_kl"), ({"kind": "jsd", "beta": 1.0}, "beta"),
                                      ({"kind": "skew_kl", "skew": 1.0}, "skew"), ({"temperature": 0.0}, "temperature")])
def test_bad_configs_raise_a_clear_error(kw, word):
    with pytest.raises(EdgestillError, match=word):
        LogitLossConfig(**kw)
