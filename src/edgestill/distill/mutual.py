"""Online distillation with adaptive mutual learning: teacher and student train at the same time.

Paper: [10] in docs/references.md ("online" = simultaneous training, not learning during deployment).
The paper transfers responses, features and relations and adapts to the capacity gap; the exact
weighting was not available, so this is a reconstruction [R] with its knobs exposed:

    L_S = L_task(S) + lambda_TS (L_resp(S <- T) + L_feat + L_rel)
    L_T = L_task(T) + lambda_ST L_resp(T <- S)
    lambda_TS = sigmoid(k gap)            the weaker the student, the more it listens
    lambda_ST = gamma sigmoid(-k gap)     the teacher listens less, and only while it is weaker
    gap = Lbar_S - Lbar_T                 (gap="difference": losses on a scale of ~1, e.g. cross-entropy in nats)
        = log(Lbar_S / Lbar_T)            (gap="log_ratio": any scale, e.g. an MSE of 0.02 against 0.03, whose
                                           difference would leave both weights at their midpoint)
with Lbar the EMA of each model's task loss, gamma < 1, and every target detached (each model learns
from the other's current prediction, never through it). A frozen teacher simply ignores lambda_ST.

    weights = MutualWeights(MutualConfig(k=5.0, gamma=0.5))
    for batch in data:
        s_logits, t_logits = student(x), teacher(x)
        s_task, t_task = task_loss(s_logits), task_loss(t_logits)
        lam_ts, lam_st = weights.update(s_task.item(), t_task.item())
        s_kd, t_kd = mutual_kd_losses(s_logits, t_logits, LogitLossConfig())
        (s_task + lam_ts * s_kd).backward(); (t_task + lam_st * t_kd).backward()   # two optimizers
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgestill.distill.losses import LogitLossConfig, logit_loss
from edgestill.errors import EdgestillError


@dataclass(frozen=True)
class MutualConfig:
    k: float = 5.0  # sharpness of the sigmoid on the loss gap
    gamma: float = 0.5  # < 1: the teacher learns less from the student than the other way round
    ema: float = 0.9  # smoothing of the task losses; 0 = use the latest loss
    gap: str = "difference"  # or "log_ratio" (scale-free: regression losses)

    def __post_init__(self):
        if self.gap not in ("difference", "log_ratio"):
            raise EdgestillError(f"mutual-learning gap '{self.gap}': choose difference or log_ratio")
        if not 0.0 <= self.gamma < 1.0:
            raise EdgestillError(f"mutual-learning gamma={self.gamma} must be in [0, 1) (the teacher's KD weight cap)")
        if not 0.0 <= self.ema < 1.0:
            raise EdgestillError(f"mutual-learning ema={self.ema} must be in [0, 1)")
        if self.k < 0:
            raise EdgestillError(f"mutual-learning k={self.k} must be >= 0")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class MutualWeights:
    """Tracks EMA task losses of student and teacher; `update` returns (lambda_TS, lambda_ST)."""

    def __init__(self, cfg: MutualConfig = MutualConfig()):
        self.cfg = cfg
        self.student_loss: float | None = None
        self.teacher_loss: float | None = None

    def update(self, student_loss: float, teacher_loss: float) -> tuple[float, float]:
        a = self.cfg.ema
        s, t = float(student_loss), float(teacher_loss)
        self.student_loss = s if self.student_loss is None else a * self.student_loss + (1 - a) * s
        self.teacher_loss = t if self.teacher_loss is None else a * self.teacher_loss + (1 - a) * t
        return self.weights()

    def weights(self) -> tuple[float, float]:
        if self.student_loss is None:
            return 0.5, 0.5 * self.cfg.gamma  # no evidence yet: the value at equal losses
        if self.cfg.gap == "log_ratio":
            eps = 1e-12
            gap = math.log(max(self.student_loss, eps) / max(self.teacher_loss, eps))
        else:
            gap = self.student_loss - self.teacher_loss
        return _sigmoid(self.cfg.k * gap), self.cfg.gamma * _sigmoid(-self.cfg.k * gap)

    def state_dict(self) -> dict:
        return {"student_loss": self.student_loss, "teacher_loss": self.teacher_loss}

    def load_state_dict(self, state: dict) -> None:
        self.student_loss, self.teacher_loss = state["student_loss"], state["teacher_loss"]


def mutual_kd_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     cfg: LogitLossConfig = LogitLossConfig(), mask: torch.Tensor | None = None):
    """(student <- teacher, teacher <- student) response losses; each side's target is the other's detached
    prediction, so the first only trains the student and the second only the teacher."""
    student_kd = logit_loss(student_logits, cfg, teacher_logits=teacher_logits.detach(), mask=mask)
    teacher_kd = logit_loss(teacher_logits, cfg, teacher_logits=student_logits.detach(), mask=mask)
    return student_kd, teacher_kd
