"""KAKD's PID controller on a simulated plant (settles a setpoint step; anti-windup vs windup under
saturation) and the student-error-focused token weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edgestill.distill.pid import PIDConfig, PIDController, kakd_alpha_controller, student_error_weights
from edgestill.errors import EdgestillError


def _simulate(cfg: PIDConfig, setpoints: list[float], gain: float = 2.0, lag: float = 0.2, reverse: bool = False):
    """A first-order plant: the measured ratio y moves 20% of the way to gain * lambda each step
    (reverse: to gain * (1 - lambda), a plant where more lambda lowers the ratio, as KD weight does to KD/CE)."""
    pid = PIDController(cfg)
    y, ys, lams = 1.0, [], []
    for r in setpoints:
        pid.cfg = dataclasses.replace(cfg, setpoint=r)
        lam = pid.update(kd_loss=y, task_loss=1.0)
        y += lag * (gain * ((1.0 - lam) if reverse else lam) - y)
        ys.append(y)
        lams.append(lam)
    return ys, lams, pid


def _settling_step(ys: list[float], target: float, tol: float) -> int:
    """First index after which y stays within tol of target (len(ys) if never)."""
    for i in range(len(ys)):
        if all(abs(v - target) < tol for v in ys[i:]):
            return i
    return len(ys)


def test_settles_a_setpoint_step_with_default_gains():
    ys, lams, _ = _simulate(PIDConfig(), [0.8] * 400 + [1.4] * 400)
    assert abs(ys[399] - 0.8) < 0.02
    assert abs(ys[-1] - 1.4) < 0.02
    assert max(ys[400:]) < 1.4 + 0.1 * (1.4 - 0.8)  # overshoot under 10% of the step
    assert all(0.0 <= lam <= 1.0 for lam in lams)


def test_anti_windup_recovers_from_saturation_much_faster():
    """Phase 1 asks for a ratio the plant cannot reach (y <= 2), so lambda sits at lambda_max; then the setpoint
    drops to a reachable value. Without anti-windup the integral piled up during saturation keeps lambda
    pinned long after the step."""
    setpoints = [3.0] * 500 + [1.0] * 1000
    ys_aw, lams_aw, pid_aw = _simulate(PIDConfig(anti_windup=True), setpoints)
    ys_wu, lams_wu, pid_wu = _simulate(PIDConfig(anti_windup=False), setpoints)
    assert lams_aw[499] == lams_wu[499] == 1.0  # both saturated
    settle_aw = _settling_step(ys_aw[500:], 1.0, 0.05)
    settle_wu = _settling_step(ys_wu[500:], 1.0, 0.05)
    assert settle_aw < 300
    assert settle_wu > 2 * settle_aw, (settle_aw, settle_wu)
    assert all(lam == 1.0 for lam in lams_wu[500:700])  # wound up: still pinned 200 steps after the step
    assert lams_aw[520] < 1.0  # leaves saturation as soon as the smoothed error turns
    assert abs(ys_aw[-1] - 1.0) < 0.01


def test_reverse_acting_controller_settles_and_unwinds():
    """The distillation plant: more KD weight, lower KD/CE. The trainer's controller has negative gains; it
    must settle there, and anti-windup must hold when the unreachable setpoint saturates it at the floor."""
    cfg = kakd_alpha_controller(setpoint=1.0, initial=0.9).cfg
    assert cfg.kp < 0 and cfg.ki < 0 and cfg.kd < 0
    ys, lams, _ = _simulate(cfg, [0.8] * 400 + [1.4] * 400, reverse=True)
    assert abs(ys[399] - 0.8) < 0.02 and abs(ys[-1] - 1.4) < 0.02
    setpoints = [3.0] * 500 + [1.0] * 1000  # y <= 2 here: lambda sits at 0 during phase 1
    ys_aw, lams_aw, _ = _simulate(cfg, setpoints, reverse=True)
    ys_wu, lams_wu, _ = _simulate(dataclasses.replace(cfg, anti_windup=False), setpoints, reverse=True)
    assert lams_aw[499] < 0.02 and lams_wu[499] == 0.0  # at (or at the edge of) the floor
    settle_aw, settle_wu = _settling_step(ys_aw[500:], 1.0, 0.05), _settling_step(ys_wu[500:], 1.0, 0.05)
    assert settle_aw < 300 and settle_wu > 2 * settle_aw, (settle_aw, settle_wu)
    # the positive-gain controller on this plant runs away to a bound instead (what the loop must not use)
    ys_bad, lams_bad, _ = _simulate(PIDConfig(setpoint=1.0), [1.0] * 400, reverse=True)
    assert lams_bad[-1] in (0.0, 1.0) and abs(ys_bad[-1] - 1.0) > 0.5


def test_integral_is_bounded_with_anti_windup():
    ys, lams, pid = _simulate(PIDConfig(anti_windup=True, ki=0.05), [5.0] * 2000)
    assert abs(pid.integral) <= 1.0 / 0.05 + 1e-9
    _, _, wound = _simulate(PIDConfig(anti_windup=False, ki=0.05), [5.0] * 2000)
    assert wound.integral > 1000


def test_drives_temperature_within_bounds():
    cfg = PIDConfig(target="temperature", initial=2.0, min_value=1.0, max_value=4.0)
    pid = PIDController(cfg)
    values = [pid.update(kd_loss=k, task_loss=1.0) for k in [0.1] * 50 + [10.0] * 50]
    assert all(1.0 <= v <= 4.0 for v in values)
    assert values[49] > 2.0 and values[-1] == 1.0  # small KD loss -> more weight; large -> the floor


def test_state_dict_round_trip_continues_identically():
    a = PIDController(PIDConfig())
    for k in (0.5, 0.7, 1.3):
        a.update(k, 1.0)
    b = PIDController(PIDConfig())
    b.load_state_dict(a.state_dict())
    assert [a.update(0.9, 1.0) for _ in range(3)] == [b.update(0.9, 1.0) for _ in range(3)]


@pytest.mark.parametrize("kw, word", [({"target": "lr"}, "target"), ({"initial": 2.0}, "initial"),
                                      ({"ema": 1.0}, "ema"), ({"target": "temperature", "min_value": 0.0}, "min_value")])
def test_bad_configs(kw, word):
    with pytest.raises(EdgestillError, match=word):
        PIDConfig(**kw)


def test_student_error_weights():
    loss = torch.tensor([[0.1, 1.0, 3.0, 0.5], [2.0, 0.2, 0.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    w = student_error_weights(loss, mask)
    assert not w.requires_grad
    assert w[1, 3] == 0  # masked
    assert (w * mask).sum().item() == pytest.approx(mask.sum().item(), rel=1e-6)  # mean 1 over counted tokens
    flat_w, flat_l = w[mask.bool()], loss.detach()[mask.bool()]
    order = flat_l.argsort()
    assert (flat_w[order].diff() >= 0).all()  # more loss, more weight
    assert flat_w.max() > 2.0 and flat_w.min() < 0.1
    uniform = student_error_weights(loss, mask, focus=0.0)
    torch.testing.assert_close(uniform, mask.float())
    capped = student_error_weights(torch.tensor([[100.0, 0.1, 0.1, 0.1]]), max_weight=2.0)
    assert capped.mean().item() == pytest.approx(1.0)
    assert capped.max() < student_error_weights(torch.tensor([[100.0, 0.1, 0.1, 0.1]]), max_weight=None).max()
