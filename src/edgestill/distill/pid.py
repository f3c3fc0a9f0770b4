"""KAKD: a PID controller for the KD weight (or temperature), and student-error-focused token weights.

Paper: KAKD, "bidirectional knowledge interaction" with PID control ([3] in docs/references.md). Its
text was not available, so both pieces are reconstructions [R] with every knob configurable:

1. `PIDController` adapts lambda (the KD weight alpha, or the temperature T) during training:

       e_t     = EMA( r* - L_KD / L_task )             r* = `setpoint`
       u_t     = Kp e_t + Ki sum(e) + Kd (e_t - e_{t-1})
       lambda  = clip(lambda_0 + u_t, lambda_min, lambda_max)

   with anti-windup: the integral stops growing while the output is saturated in the direction the
   error pushes (conditional integration) and is clamped to the range that can still move the output.
   The loop is negative feedback when raising lambda raises the measured ratio; for a plant that acts
   the other way give negative gains (a reverse-acting controller). Distillation is such a plant: a
   larger KD weight makes the student follow the teacher more and the text less, so L_KD / L_task
   falls. `kakd_alpha_controller` builds the reverse-acting controller the trainer uses.

       pid = PIDController(PIDConfig(setpoint=1.0, initial=0.9, max_value=1.0))
       alpha = pid.update(kd_loss.item(), ce_loss.item())        # once per step

2. `student_error_weights`: the "bidirectional" part. The student's per-token loss re-weights which
   tokens the teacher's knowledge is transferred on (focus on where the student is weak):
   w ~ loss^focus, normalised to mean 1 over unmasked tokens, detached.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from edgestill.errors import EdgestillError


@dataclass(frozen=True)
class PIDConfig:
    setpoint: float = 1.0  # r*: the wanted L_KD / L_task ratio
    kp: float = 0.5
    ki: float = 0.01
    kd: float = 0.1
    initial: float = 0.9  # lambda_0: the output when the error is 0
    min_value: float = 0.0
    max_value: float = 1.0  # lambda_max
    ema: float = 0.9  # smoothing of the error; 0 = no smoothing
    anti_windup: bool = True
    target: str = "kd_weight"  # what the output drives: kd_weight (alpha) or temperature

    def __post_init__(self):
        if self.target not in ("kd_weight", "temperature"):
            raise EdgestillError(f"PID target '{self.target}' is unknown; use kd_weight or temperature")
        if not self.min_value <= self.initial <= self.max_value:
            raise EdgestillError(f"PID initial={self.initial} must lie in [min_value={self.min_value}, "
                                 f"max_value={self.max_value}]")
        if not 0.0 <= self.ema < 1.0:
            raise EdgestillError(f"PID ema={self.ema} must be in [0, 1)")
        if self.target == "temperature" and self.min_value <= 0:
            raise EdgestillError("a PID-controlled temperature needs min_value > 0 (e.g. 1.0)")


class PIDController:
    """Discrete position-form PID; `update(kd_loss, task_loss)` returns the new lambda. See the module doc."""

    def __init__(self, cfg: PIDConfig = PIDConfig()):
        self.cfg = cfg
        self.error: float | None = None  # EMA-smoothed error
        self.integral = 0.0
        self.value = cfg.initial

    def update(self, kd_loss: float, task_loss: float) -> float:
        return self.update_error(self.cfg.setpoint - float(kd_loss) / max(float(task_loss), 1e-12))

    def update_error(self, raw_error: float) -> float:
        """One step from an error r* - measurement directly (for other measurements than L_KD / L_task)."""
        c = self.cfg
        prev = self.error
        self.error = raw_error if prev is None else c.ema * prev + (1.0 - c.ema) * raw_error
        derivative = 0.0 if prev is None else self.error - prev
        unclamped = c.initial + c.kp * self.error + c.ki * (self.integral + self.error) + c.kd * derivative
        push = self.error if c.ki >= 0 else -self.error  # the way integrating this error moves the output
        saturated_high = unclamped > c.max_value and push > 0
        saturated_low = unclamped < c.min_value and push < 0
        if not (c.anti_windup and (saturated_high or saturated_low)):
            self.integral += self.error
        if c.anti_windup and c.ki != 0:
            # never hold more integral than it takes to drive the output across its whole range on its own
            span = (c.max_value - c.min_value) / abs(c.ki)
            self.integral = min(max(self.integral, -span), span)
        u = c.kp * self.error + c.ki * self.integral + c.kd * derivative
        self.value = min(max(c.initial + u, c.min_value), c.max_value)
        return self.value

    def state_dict(self) -> dict:
        return {"error": self.error, "integral": self.integral, "value": self.value, "config": asdict(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        self.error, self.integral, self.value = state["error"], state["integral"], state["value"]


def kakd_alpha_controller(setpoint: float, initial: float) -> PIDController:
    """The KD-weight controller of the distillation loop: holds L_KD / L_CE at `setpoint` by moving alpha.

    Reverse-acting (negative gains): when the student already matches the teacher well relative to the text
    (ratio below r*), alpha falls and the text gets more weight; when KD lags (ratio above r*), alpha rises.
    """
    d = PIDConfig()
    return PIDController(PIDConfig(setpoint=setpoint, initial=initial, kp=-d.kp, ki=-d.ki, kd=-d.kd))


def student_error_weights(per_token_loss: torch.Tensor, mask: torch.Tensor | None = None, focus: float = 1.0,
                          max_weight: float | None = 10.0) -> torch.Tensor:
    """Per-token weights that emphasise where the student's loss is high: w ~ loss^focus, mean 1, detached.

    per_token_loss (B, T) >= 0, e.g. `cross_entropy_per_token` or the per-token divergence; `mask` (B, T)
    marks the tokens that count (masked tokens get weight 0). focus = 0 gives uniform weights, larger
    values focus harder. `max_weight` caps a single token's weight (then renormalises) so a few
    outliers cannot carry the whole batch.
    """
    if focus < 0:
        raise EdgestillError(f"student-error focus={focus} must be >= 0 (0 = uniform)")
    loss = per_token_loss.detach().float().clamp_min(0.0)
    m = torch.ones_like(loss) if mask is None else mask.to(loss.dtype)
    w = (loss + 1e-8).pow(focus) * m  # (B, T)
    w = w * m.sum() / w.sum().clamp_min(1e-12)
    if max_weight is not None:
        w = w.clamp(max=max_weight)
        w = w * m.sum() / w.sum().clamp_min(1e-12)
    return w
