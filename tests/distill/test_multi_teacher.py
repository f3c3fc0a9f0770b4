"""MTAKD agreement weighting: a corrupted teacher gets a small weight and the weighted target beats plain
averaging; weights are per token for decoders and per sample for classifiers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgestill.distill.losses import LogitLossConfig, divergence
from edgestill.distill.multi_teacher import (
    AgreementConfig,
    TeacherMixer,
    agreement_target,
    average_target,
    pairwise_js,
    trimmed_target,
)
from edgestill.errors import EdgestillError

B, T, V = 4, 6, 50


def _teachers(corruption: str, seed: int = 0):
    """Two good teachers (a shared truth plus small noise) and one corrupted one; returns (truth, (3, B, T, V))."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(B, T, V, generator=g) * 3
    good = [truth + 0.3 * torch.randn(B, T, V, generator=g) for _ in range(2)]
    if corruption == "shuffled":
        bad = truth[..., torch.randperm(V, generator=g)]
    else:
        bad = truth + 6.0 * torch.randn(B, T, V, generator=g)
    return truth, torch.stack([*good, bad])


@pytest.mark.parametrize("corruption", ["shuffled", "noisy"])
def test_corrupted_teacher_gets_small_weight_and_target_beats_averaging(corruption):
    truth, logits = _teachers(corruption)
    res = agreement_target(logits, AgreementConfig(tau=0.1))
    assert res.weights.shape == (3, B, T)  # per token
    torch.testing.assert_close(res.weights.sum(0), torch.ones(B, T))
    mean_w = res.weights.mean(dim=(1, 2))
    assert mean_w[2] < 0.5 / 3, mean_w  # well below 1/K
    assert (mean_w[:2] > 1 / 3).all()
    assert (res.agreement[2] < res.agreement[:2]).all()  # at every token
    # the weighted target is closer to the truth than the plain average
    log_truth = F.log_softmax(truth, -1)
    kl = lambda target: divergence(log_truth, target, LogitLossConfig()).mean()  # noqa: E731
    assert kl(res.target_logprobs) < 0.5 * kl(average_target(logits))
    torch.testing.assert_close(res.target_logprobs.exp().sum(-1), torch.ones(B, T))


def test_agreeing_teachers_get_equal_weights():
    g = torch.Generator().manual_seed(1)
    same = torch.randn(B, T, V, generator=g).expand(3, B, T, V)
    res = agreement_target(same)
    torch.testing.assert_close(res.weights, torch.full((3, B, T), 1 / 3))
    torch.testing.assert_close(res.agreement, torch.ones(3, B, T))
    torch.testing.assert_close(res.strength, torch.ones(B, T))


def test_per_sample_weights_for_classifiers_and_list_input():
    g = torch.Generator().manual_seed(2)
    truth = torch.randn(8, 10, generator=g) * 3
    teachers = [truth + 0.2 * torch.randn(8, 10, generator=g), truth + 0.2 * torch.randn(8, 10, generator=g),
                -truth]
    res = agreement_target(teachers)
    assert res.weights.shape == (3, 8) and res.strength.shape == (8,)
    assert (res.weights[2] < 0.05).all()


def test_tau_controls_sharpness():
    _, logits = _teachers("noisy")
    sharp = agreement_target(logits, AgreementConfig(tau=0.05)).weights.mean(dim=(1, 2))[2]
    soft = agreement_target(logits, AgreementConfig(tau=1.0)).weights.mean(dim=(1, 2))[2]
    assert sharp < soft < 1 / 3


def test_js_bounds_and_symmetry():
    _, logits = _teachers("noisy")
    js = pairwise_js(F.log_softmax(logits, -1))  # (3, 3, B, T)
    assert js.shape == (3, 3, B, T)
    assert js.diagonal(dim1=0, dim2=1).abs().max() < 1e-6
    torch.testing.assert_close(js, js.transpose(0, 1))
    assert js.min() >= -1e-6 and js.max() <= 1.0
    disjoint = torch.full((2, 1, 4), -1e9)
    disjoint[0, 0, 0] = 0.0
    disjoint[1, 0, 1] = 0.0
    assert pairwise_js(F.log_softmax(disjoint, -1))[0, 1].item() == pytest.approx(1.0, abs=1e-5)  # 1 bit


def test_needs_two_teachers_and_valid_tau():
    with pytest.raises(EdgestillError, match="2 teachers"):
        agreement_target(torch.randn(1, 2, 5))
    with pytest.raises(EdgestillError, match="tau"):
        AgreementConfig(tau=0.0)


@pytest.mark.parametrize("corruption", ["shuffled", "noisy"])
def test_median_shuns_a_corrupted_teacher_and_beats_averaging(corruption):
    truth, logits = _teachers(corruption)
    lp = F.log_softmax(logits, -1)
    target, share = trimmed_target(lp, trim=1)
    torch.testing.assert_close(target.exp().sum(-1), torch.ones(B, T))
    torch.testing.assert_close(share.sum(0), torch.ones(B, T))
    assert share.mean(dim=(1, 2))[2] < 0.5 / 3  # the corrupted teacher is rarely the median where the mass is
    log_truth = F.log_softmax(truth, -1)
    kl = lambda target: divergence(log_truth, target, LogitLossConfig()).mean()  # noqa: E731
    assert kl(target) < 0.5 * kl(average_target(logits))


def test_trimmed_mean_is_the_mean_of_the_middle_values_renormalised():
    g = torch.Generator().manual_seed(3)
    lp = F.log_softmax(torch.randn(5, 2, 7, generator=g) * 2, -1)  # 5 teachers, 2 samples, 7 classes
    target, share = trimmed_target(lp, trim=1)
    p = lp.exp()
    expected = torch.empty(2, 7)
    for i in range(2):
        for c in range(7):
            expected[i, c] = sum(sorted(p[:, i, c].tolist())[1:4]) / 3  # the 3 middle of 5
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(target.exp(), expected)
    torch.testing.assert_close(trimmed_target(lp, trim=0)[0], average_target(lp))  # trim 0 is the plain average
    with pytest.raises(EdgestillError, match="more than 4 teachers, got 3"):
        trimmed_target(lp[:3], trim=2)
    with pytest.raises(EdgestillError, match="unknown; use agreement, average, median, trimmed_mean"):
        TeacherMixer("mode")
