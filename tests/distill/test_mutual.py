"""Adaptive mutual learning: the weights move in the right direction, targets are detached, and a
co-trained pair on a toy task gets closer while both learn."""

from __future__ import annotations

import pytest
import torch

from edgestill.distill.losses import LogitLossConfig
from edgestill.distill.mutual import MutualConfig, MutualWeights, mutual_kd_losses
from edgestill.errors import EdgestillError


def test_weaker_student_listens_more_and_teacher_less():
    w = MutualWeights(MutualConfig(k=5.0, gamma=0.5, ema=0.0))
    ts_equal, st_equal = w.update(1.0, 1.0)
    assert ts_equal == pytest.approx(0.5) and st_equal == pytest.approx(0.25)
    ts_weak, st_weak = w.update(2.0, 1.0)  # student worse than teacher
    assert ts_weak > 0.99 and st_weak < 0.01
    ts_strong, st_strong = w.update(1.0, 2.0)  # student better than teacher
    assert ts_strong < 0.01 and st_strong > 0.49
    assert st_strong < 0.5  # gamma caps the teacher's weight


def test_weights_are_monotone_in_the_gap_and_smoothed():
    cfg = MutualConfig(k=2.0, gamma=0.8, ema=0.0)
    gaps = [-1.0, -0.3, 0.0, 0.4, 1.5]
    pairs = [MutualWeights(cfg).update(1.0 + g, 1.0) for g in gaps]
    ts = [p[0] for p in pairs]
    st = [p[1] for p in pairs]
    assert ts == sorted(ts) and st == sorted(st, reverse=True)
    smooth = MutualWeights(MutualConfig(ema=0.9))
    smooth.update(1.0, 1.0)
    lam_ts, _ = smooth.update(3.0, 1.0)  # one bad step barely moves the EMA
    assert smooth.student_loss == pytest.approx(1.2)
    assert 0.5 < lam_ts < MutualWeights(MutualConfig(ema=0.0)).update(3.0, 1.0)[0]


def test_targets_are_detached():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 11, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 11, generator=g, requires_grad=True)
    s_kd, t_kd = mutual_kd_losses(s, t, LogitLossConfig(kind="jsd"))
    s_kd.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    t_kd.backward()
    assert t.grad.abs().sum() > 0


def test_co_training_pulls_the_pair_together():
    """A 'teacher' and a 'student' logit table fitted to noisy labels with mutual terms end closer to each
    other than when each is fitted alone."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (64,), generator=g)

    def run(mutual: bool):
        torch.manual_seed(0)
        s = torch.zeros(64, 5, requires_grad=True)
        t = (torch.randn(64, 5) * 0.1).requires_grad_()
        opt = torch.optim.SGD([s, t], lr=20.0)
        w = MutualWeights(MutualConfig(gamma=0.5))
        for _ in range(100):
            s_logits = 0.3 * s  # a handicapped (slow-learning) student
            ce_s = torch.nn.functional.cross_entropy(s_logits, labels)
            ce_t = torch.nn.functional.cross_entropy(t, labels)
            lam_ts, lam_st = w.update(ce_s.item(), ce_t.item()) if mutual else (0.0, 0.0)
            s_kd, t_kd = mutual_kd_losses(s_logits.unsqueeze(0), t.unsqueeze(0))
            loss = ce_s + lam_ts * s_kd + ce_t + lam_st * t_kd
            opt.zero_grad()
            loss.backward()
            opt.step()
        return mutual_kd_losses((0.3 * s).unsqueeze(0), t.unsqueeze(0))[0].item(), ce_t.item(), lam_ts, lam_st

    gap_mutual, teacher_ce_mutual, lam_ts, lam_st = run(True)
    gap_alone, teacher_ce_alone, _, _ = run(False)
    assert gap_mutual < 0.7 * gap_alone
    assert lam_ts > 0.5 > lam_st  # the handicapped student is the weaker one
    assert teacher_ce_mutual < teacher_ce_alone + 0.05  # listening to the student did not hurt the teacher much


def test_log_ratio_gap_adapts_on_small_regression_losses():
    diff = MutualWeights(MutualConfig(k=5.0, gamma=0.5, ema=0.0))
    ratio = MutualWeights(MutualConfig(k=5.0, gamma=0.5, ema=0.0, gap="log_ratio"))
    d_ts, d_st = diff.update(0.03, 0.02)  # an MSE half again the teacher's
    r_ts, r_st = ratio.update(0.03, 0.02)
    assert d_ts == pytest.approx(0.5, abs=0.02)  # the difference barely moves the weights
    assert r_ts == pytest.approx(1 / (1 + 1.5 ** -5)) and r_st == pytest.approx(0.5 / (1 + 1.5 ** 5))
    assert ratio.update(3.0, 2.0) == pytest.approx((r_ts, r_st))  # scale-free
    with pytest.raises(EdgestillError, match="gap 'ratio'"):
        MutualConfig(gap="ratio")


def test_bad_gamma():
    with pytest.raises(EdgestillError, match="gamma"):
        MutualConfig(gamma=1.0)
