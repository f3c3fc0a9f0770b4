"""MTAKD: weighting several teachers by how much each agrees with the others (and robust aggregation: median and
trimmed mean, `trimmed_target`).

Paper: "MTAKD: multi-teacher agreement knowledge distillation" ([4] in docs/references.md). The paper
weights teachers per input by their "dynamic agreement" and applies the weights to predictions (AWKD),
spatial attention (AAKD) and embedding relations (RAKD). Its exact formula was not available, so this
is a reconstruction [R] with every knob exposed:

    a_k(x) = mean_{j != k} (1 - JS(p_k(x), p_j(x)))      agreement of teacher k with the others
    w_k(x) = softmax_k(a_k(x) / tau)                      tau ~ 0.1
    target = sum_k w_k(x) p_k(x)                          the distribution the student learns
    strength(x) = mean_k a_k(x)                           optional: how much to trust the target at x

"x" is a token for decoders ((K, B, T, V) logits give (K, B, T) weights) and a sample for classifiers
((K, B, C) give (K, B)). JS is the symmetric Jensen-Shannon divergence in bits (in [0, 1], so the
agreement is in [0, 1]); `js_in_bits=False` uses nats. A teacher that disagrees with the rest (broken,
off-domain, or simply wrong at x) gets a small weight there; the weights come back for logging/plots.

    result = agreement_target([t1_logits, t2_logits, t3_logits], AgreementConfig(tau=0.1))
    kd = divergence(result.target_logprobs, log_softmax(student_logits / T, -1), LogitLossConfig()).mean()
    log["teacher_weights"] = result.weights.mean(dim=(1, 2)).tolist()   # (K,)

In the decoder distillation loop (`teacher.extra` in a recipe) the teachers come from a joint top-k
cache (distill/teacher_cache.py): each teacher's exact log-probs on a common support of U ids per
position (the union of their top-k ids, filled up to U), plus its own tail bucket 1 - sum. `TeacherMixer`
weights the teachers per token on those U + 1 buckets and returns the mixed target on the U ids, which
the usual top-k losses then treat like a single teacher's cache (the target's tail is sum_k w_k tail_k).
Agreement is measured at temperature 1; at distill.temperature != 1 the mixed target is softened over the
U ids like any top-k cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgestill.distill.losses import TAIL_FLOOR, jsd_div
from edgestill.errors import EdgestillError


@dataclass(frozen=True)
class AgreementConfig:
    tau: float = 0.1  # softmax temperature of the weights: small = trust the majority sharply
    temperature: float = 1.0  # teachers' distributions are softened by this before comparison and mixing
    js_in_bits: bool = True

    def __post_init__(self):
        if not self.tau > 0 or not self.temperature > 0:
            raise EdgestillError(f"agreement tau={self.tau} and temperature={self.temperature} must both be > 0")


@dataclass
class AgreementResult:
    target_logprobs: torch.Tensor  # (..., V) log sum_k w_k p_k
    weights: torch.Tensor  # (K, ...) w_k, sums to 1 over K
    agreement: torch.Tensor  # (K, ...) a_k in [0, 1]
    strength: torch.Tensor  # (...) mean_k a_k


def pairwise_js(teacher_logprobs: torch.Tensor, in_bits: bool = True) -> torch.Tensor:
    """(K, ..., V) log-probs -> (K, K, ...) symmetric Jensen-Shannon divergences."""
    k = teacher_logprobs.shape[0]
    a = teacher_logprobs.unsqueeze(1).expand(k, k, *teacher_logprobs.shape[1:])  # (K, K, ..., V)
    b = teacher_logprobs.unsqueeze(0).expand_as(a)
    js = jsd_div(a, b, beta=0.5)  # (K, K, ...)
    return js / math.log(2) if in_bits else js


def agreement_weights(teacher_logprobs: torch.Tensor, cfg: AgreementConfig = AgreementConfig()):
    """(weights, agreement), each (K, ...), from K teachers' log-probs (K, ..., V). No gradient."""
    k = teacher_logprobs.shape[0]
    if k < 2:
        raise EdgestillError(f"agreement weighting needs at least 2 teachers, got {k}")
    with torch.no_grad():
        js = pairwise_js(teacher_logprobs.float(), cfg.js_in_bits)  # (K, K, ...); diagonal is 0
        agreement = (1.0 - js).sum(1) - 1.0  # drop the j = k term (1 - 0)
        agreement = agreement / (k - 1)  # (K, ...)
        weights = F.softmax(agreement / cfg.tau, dim=0)  # (K, ...)
    return weights, agreement


def agreement_target(teacher_logits: Sequence[torch.Tensor] | torch.Tensor,
                     cfg: AgreementConfig = AgreementConfig()) -> AgreementResult:
    """The agreement-weighted target distribution of K teachers: logits (K, ..., V) or a list of K (..., V).

    Teachers must share the label space / vocabulary. The target is detached (teachers are not trained here).
    """
    logits = torch.stack(list(teacher_logits)) if not isinstance(teacher_logits, torch.Tensor) else teacher_logits
    logprobs = F.log_softmax(logits.detach().float() / cfg.temperature, dim=-1)  # (K, ..., V)
    weights, agreement = agreement_weights(logprobs, cfg)
    target = torch.logsumexp(weights.clamp_min(1e-30).log().unsqueeze(-1) + logprobs, dim=0)  # (..., V)
    return AgreementResult(target_logprobs=target, weights=weights, agreement=agreement, strength=agreement.mean(0))


def average_target(teacher_logits: Sequence[torch.Tensor] | torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Plain averaging of the teachers' probabilities (the baseline agreement weighting is compared with)."""
    logits = torch.stack(list(teacher_logits)) if not isinstance(teacher_logits, torch.Tensor) else teacher_logits
    logprobs = F.log_softmax(logits.detach().float() / temperature, dim=-1)
    return torch.logsumexp(logprobs, dim=0) - math.log(logprobs.shape[0])


def with_tail_bucket(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """(..., U) log-probs of U ids -> (..., U + 1) with the rest of the mass as one tail bucket (floored)."""
    lp = topk_logprobs.float()
    tail = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR)
    return torch.cat([lp, tail.log()], dim=-1)


def trimmed_target(teacher_logprobs: torch.Tensor, trim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust aggregation ([trimmed-mean] in docs/references.md): per bucket (an id, or the tail), drop the `trim`
    largest and `trim` smallest of the K teachers' probabilities and average the rest, then renormalise. trim =
    (K - 1) // 2 is the median. (K, ..., N) log-probs over N buckets that sum to 1 -> (target log-probs (..., N),
    each teacher's share of the target (K, ...): the target mass of the buckets where it was kept, split evenly
    among the kept teachers; the shares sum to 1 over K)."""
    k = teacher_logprobs.shape[0]
    if not 0 <= 2 * trim < k:
        raise EdgestillError(f"trimming {trim} teacher(s) from each end needs more than {2 * trim} teachers, got {k}")
    p = teacher_logprobs.float().exp()
    values, order = p.sort(dim=0)
    kept = values[trim:k - trim].mean(0)  # (..., N)
    target = kept / kept.sum(-1, keepdim=True).clamp_min(1e-30)
    mask = torch.zeros_like(p).scatter_(0, order[trim:k - trim], 1.0)  # (K, ..., N): 1 where teacher k was kept
    share = (mask * target.unsqueeze(0)).sum(-1) / (k - 2 * trim)
    return target.clamp_min(1e-30).log(), share


WEIGHTINGS = ("agreement", "average", "median", "trimmed_mean")


@dataclass
class TeacherMixer:
    """Mixes K teachers given on a common support into one target, per token (MTAKD [4]).

    weighting: "agreement" (w = softmax(agreement / tau), see the module doc), "average" (w = 1/K), or the robust
    aggregations "median" and "trimmed_mean" (drop the `trim` highest and lowest teacher probabilities of each id,
    average the rest: `trimmed_target`; their weights are each teacher's share of the target).
    `combine` returns the target log-probs on the support's ids and keeps the weights of the last call.
    """

    weighting: str = "agreement"
    tau: float = 0.1
    trim: int = 1

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise EdgestillError(f"teacher weighting '{self.weighting}' is unknown; use {', '.join(WEIGHTINGS)}")
        AgreementConfig(tau=self.tau)  # validates tau
        if self.trim < 1:
            raise EdgestillError(f"teacher trim={self.trim} must be >= 1 (the teachers dropped at each end of each id)")

    @torch.no_grad()
    def combine(self, teacher_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, B, T, U) teachers' log-probs on shared ids -> (target log-probs (B, T, U), weights (K, B, T))."""
        lp = teacher_logprobs.float()
        n_teachers = lp.shape[0]
        if self.weighting in ("median", "trimmed_mean") and n_teachers > 1:
            trim = (n_teachers - 1) // 2 if self.weighting == "median" else self.trim
            target, share = trimmed_target(with_tail_bucket(lp), trim)  # on U ids + the tail
            return target[..., :-1], share
        if self.weighting == "average" or n_teachers == 1:
            weights = torch.full(lp.shape[:-1], 1.0 / n_teachers)  # (K, B, T)
        else:
            weights, _ = agreement_weights(with_tail_bucket(lp), AgreementConfig(tau=self.tau))  # (K, B, T)
        target = torch.logsumexp(weights.clamp_min(1e-30).log().unsqueeze(-1) + lp, dim=0)  # (B, T, U)
        return target, weights


def plot_teacher_weights(history: list[dict], names: list[str], path, weighting: str = "agreement") -> None:
    """Mean weight per teacher over training steps (from the `teacher_weights` of a train log) as a PNG."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgestill.evaluate.report import save_figure

    rows = [h for h in history if "teacher_weights" in h]
    if not rows:
        return
    steps = [h["step"] for h in rows]
    weights = list(zip(*(h["teacher_weights"] for h in rows)))  # K series
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, series in zip(names, weights):
        ax.plot(steps, series, label=Path(name).name or name)  # folder or file name, not the whole path
    ax.axhline(1.0 / len(weights), color="grey", linestyle=":", linewidth=1, label=f"1/K = {1.0 / len(weights):.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("mean teacher weight (per token)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Teacher weights ({weighting})" if weighting != "agreement" else "MTAKD: agreement weight of each teacher")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
