"""Distillation losses: small functions over (B, T, V) logits that a training loop sums.

Teacher distributions come either as full logits or as a top-k cache: the teacher's k largest
log-probabilities per position (normalised over the full vocabulary) and their vocabulary ids.
The top-k probabilities are then exact and the rest of the vocabulary collapses into one
"tail" bucket, so the top-k loss equals the dense one when k covers the vocabulary.

Beyond forward KL, `logit_loss(student_logits, LogitLossConfig(kind=...), ...)` computes reverse KL
(MiniLLM), skew KL and skew reverse KL (DistiLLM), generalized JSD (GKD) and total variation,
on dense teacher logits or on the top-k cache:

    cfg = LogitLossConfig(kind="skew_kl", skew=0.1, temperature=1.0)
    kd = logit_loss(logits, cfg, topk_logprobs=lp, topk_ids=ids, mask=labels != -100)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgestill.errors import EdgestillError

IGNORE_INDEX = -100


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE; `labels` (B, T) are already aligned with the logits, -100 is ignored."""
    return F.cross_entropy(student_logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense KL(p_T || q_T) per token, averaged over unmasked positions. (B, T, V) inputs.

    Teacher zeros (-inf logits) contribute nothing (0 log 0 = 0), with finite gradients.
    """
    log_p, log_q = aligned_logprobs(student_logits, teacher_logits, temperature=temperature)
    return _masked_mean(kl_div(log_p, log_q), mask)  # (B, T) -> ()


def forward_kl_topk(student_logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_ids: torch.Tensor,
                    temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q) from a cached teacher top-k.

    student_logits (B, T, V); topk_logprobs, topk_ids (B, T, k), the teacher's log-probabilities
    over the full vocabulary at temperature 1.

    At T = 1 the distribution is the teacher's exact top-k probabilities plus a tail bucket
    holding the remaining mass, compared with the student's probabilities of the same k ids plus
    the student's own tail. At T != 1 the teacher's tempered tail is unknown from the cache, so
    both sides are renormalised over the k ids (the usual top-k KD approximation).
    """
    s = student_logits.float()
    t_top = topk_logprobs.float()
    ids = topk_ids.long()
    if temperature == 1.0:
        log_q_all = F.log_softmax(s, dim=-1)  # (B, T, V)
        log_q_top = log_q_all.gather(-1, ids)  # (B, T, k)
        log_p_top = t_top  # (B, T, k)
        # Tail = everything outside the k ids. logsumexp over the masked student logits is exact
        # and stays finite where the top-k mass is ~1.
        masked = s.scatter(-1, ids, float("-inf"))
        log_q_tail = torch.logsumexp(masked, dim=-1) - torch.logsumexp(s, dim=-1)  # (B, T)
        p_tail = (1.0 - log_p_top.exp().sum(-1)).clamp_min(0.0)  # (B, T)
        kl_top = (log_p_top.exp() * _safe_diff(log_p_top, log_q_top)).sum(-1)  # ids with p = 0 (a trimmed vocabulary's)
        # No tail term where the teacher's tail is empty (k covers the vocabulary: p_tail is rounding noise)
        # or the student's is (-inf): 0 * log 0 = 0 by convention.
        valid = (p_tail > 1e-6) & torch.isfinite(log_q_tail)
        kl_tail = torch.where(valid, p_tail * (p_tail.clamp_min(1e-30).log() - log_q_tail.clamp_min(-1e30)), torch.zeros_like(p_tail))
        per_token = kl_top + kl_tail
    else:
        log_p = F.log_softmax(t_top / temperature, dim=-1)
        log_q = F.log_softmax(s.gather(-1, ids) / temperature, dim=-1)
        per_token = (log_p.exp() * _safe_diff(log_p, log_q)).sum(-1)
    return _masked_mean(per_token, mask)


def kd_objective(kd: torch.Tensor, ce: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """The base KD loss (docs/references.md [hinton2015]): alpha * T^2 * KL + (1 - alpha) * CE."""
    return alpha * temperature**2 * kd + (1.0 - alpha) * ce


# --- the divergence family: one alignment step, then small functions of (log_p, log_q) --------------
#
# `aligned_logprobs` turns (student logits, teacher dense logits | teacher top-k) into two log-prob
# tensors over the same buckets: the vocabulary for dense teachers, the k cached ids plus one tail
# bucket for a top-k teacher (no tail when k covers the vocabulary, so top-k equals dense there).
# Each divergence below is then a function of those two tensors, per position: (..., n) -> (...).
# All of them follow 0 * log 0 = 0, so buckets where both sides have no mass (-inf) contribute
# nothing and never produce NaN gradients.

# The teacher's tail bucket from an fp16 cache can round to <= 0 although the true mass is positive;
# a floor keeps the reverse-direction divergences finite there (it changes the loss by ~1e-6 at most).
TAIL_FLOOR = 1e-6


@dataclass(frozen=True)
class LogitLossConfig:
    """Which divergence between teacher p and student q, and its knobs (plain fields: round-trips to YAML).

    kind:
      forward_kl       KL(p || q), mode covering (Hinton et al. 2015)
      reverse_kl       KL(q || p), mode seeking (MiniLLM, Gu et al. 2024)
      skew_kl          KL(p || a p + (1-a) q)            (DistiLLM, Ko et al. 2024), a = `skew`
      skew_reverse_kl  KL(q || (1-a) p + a q)            (DistiLLM), a = `skew`
      jsd              b KL(p || M) + (1-b) KL(q || M), M = b p + (1-b) q (GKD, Agarwal et al. 2024), b = `beta`
      total_variation  1/2 sum |p - q|                   (DistiLLM's and GKD's comparison baseline)
    temperature: both distributions are softened by T before the divergence (the caller scales by T^2).
    """

    kind: str = "forward_kl"
    temperature: float = 1.0
    skew: float = 0.1
    beta: float = 0.5

    def __post_init__(self):
        if self.kind not in DIVERGENCES:
            raise EdgestillError(f"unknown distillation loss '{self.kind}'; use one of {', '.join(LOGIT_LOSS_KINDS)}")
        if not self.temperature > 0:
            raise EdgestillError(f"distillation temperature={self.temperature} must be > 0")
        if not 0.0 <= self.skew < 1.0:
            raise EdgestillError(f"skew={self.skew} must be in [0, 1) (DistiLLM uses 0.1; 0 is plain KL)")
        if not 0.0 < self.beta < 1.0:
            raise EdgestillError(f"jsd beta={self.beta} must be strictly between 0 and 1 (GKD uses 0.1 to 0.9)")


def _safe_diff(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log_a - log_b where a > 0, else 0 (the term is multiplied by a = 0 anyway; avoids inf - inf)."""
    keep = log_a > float("-inf")
    return torch.where(keep, log_a - torch.where(keep, log_b, torch.zeros_like(log_b)), torch.zeros_like(log_a))


def kl_div(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum a (log a - log b) over the last dim; inf where a > 0 = b (that is the true value)."""
    return (log_a.exp() * _safe_diff(log_a, log_b)).sum(-1)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1 - w) b), stable, and -inf (with zero gradient) where both are -inf."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    x = log_a + math.log(weight_a)
    y = log_b + math.log1p(-weight_a)
    m = torch.maximum(x, y)
    finite = torch.isfinite(m)
    m0 = torch.where(finite, m, torch.zeros_like(m)).detach()  # any constant shift gives the same value
    s = (x - m0).exp() + (y - m0).exp()
    s = torch.where(finite, s, torch.ones_like(s))
    return torch.where(finite, m0 + s.log(), m)


def forward_kl_div(log_p, log_q):
    return kl_div(log_p, log_q)


def reverse_kl_div(log_p, log_q):
    return kl_div(log_q, log_p)


def skew_kl_div(log_p, log_q, skew: float = 0.1):
    """KL(p || a p + (1-a) q): finite wherever p has mass, even where q = 0 (DistiLLM)."""
    return kl_div(log_p, log_mixture(log_p, log_q, skew))


def skew_reverse_kl_div(log_p, log_q, skew: float = 0.1):
    """KL(q || (1-a) p + a q) (DistiLLM)."""
    return kl_div(log_q, log_mixture(log_p, log_q, 1.0 - skew))


def jsd_div(log_p, log_q, beta: float = 0.5):
    """Generalized JSD: b KL(p || M) + (1-b) KL(q || M), M = b p + (1-b) q (GKD). beta -> 1 seeks modes."""
    log_m = log_mixture(log_p, log_q, beta)
    return beta * kl_div(log_p, log_m) + (1.0 - beta) * kl_div(log_q, log_m)


def total_variation_div(log_p, log_q):
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


# The divergences by name: `distill.loss` in a recipe, LogitLossConfig.kind here. A new divergence is a function
# of (log_p, log_q, cfg) above plus its entry here (and its test); config validation reads these names.
DIVERGENCES = {
    "forward_kl": lambda log_p, log_q, cfg: forward_kl_div(log_p, log_q),
    "reverse_kl": lambda log_p, log_q, cfg: reverse_kl_div(log_p, log_q),
    "skew_kl": lambda log_p, log_q, cfg: skew_kl_div(log_p, log_q, cfg.skew),
    "skew_reverse_kl": lambda log_p, log_q, cfg: skew_reverse_kl_div(log_p, log_q, cfg.skew),
    "jsd": lambda log_p, log_q, cfg: jsd_div(log_p, log_q, cfg.beta),
    "total_variation": lambda log_p, log_q, cfg: total_variation_div(log_p, log_q),
}
LOGIT_LOSS_KINDS = tuple(DIVERGENCES)


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, cfg: LogitLossConfig) -> torch.Tensor:
    """The divergence `cfg.kind` between teacher log_p and student log_q, per position: (..., n) -> (...)."""
    return DIVERGENCES[cfg.kind](log_p, log_q, cfg)  # cfg.kind was checked when the config was made


def aligned_logprobs(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                     topk_logprobs: torch.Tensor | None = None, topk_ids: torch.Tensor | None = None,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_p teacher, log_q student) over the same buckets, each (B, T, n), in float32.

    Dense teacher (`teacher_logits` (B, T, V)): both log-softmaxed at T over the vocabulary.
    Top-k teacher (`topk_logprobs`, `topk_ids` (B, T, k), log p over the full vocabulary at T = 1):
      T = 1: the k exact probabilities plus one tail bucket with the rest of the mass on each side
             (no tail bucket when k covers the vocabulary, so the result is the dense one);
      T != 1: the teacher's tempered tail is unknown, so both sides are renormalised over the k ids.
    """
    s = student_logits.float()
    if teacher_logits is not None:
        return F.log_softmax(teacher_logits.float() / temperature, dim=-1), F.log_softmax(s / temperature, dim=-1)
    if topk_logprobs is None or topk_ids is None:
        raise ValueError("pass teacher_logits, or topk_logprobs together with topk_ids")
    t_top = topk_logprobs.float()
    ids = topk_ids.long()
    if temperature != 1.0:
        return F.log_softmax(t_top / temperature, dim=-1), F.log_softmax(s.gather(-1, ids) / temperature, dim=-1)
    log_z = torch.logsumexp(s, dim=-1, keepdim=True)  # (B, T, 1)
    log_q_top = s.gather(-1, ids) - log_z  # (B, T, k)
    if ids.shape[-1] >= s.shape[-1]:
        return t_top, log_q_top
    log_q_tail = torch.logsumexp(s.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True) - log_z  # (B, T, 1)
    p_tail = (1.0 - t_top.exp().sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR)  # (B, T, 1)
    return torch.cat([t_top, p_tail.log()], dim=-1), torch.cat([log_q_top, log_q_tail], dim=-1)


def logit_loss(student_logits: torch.Tensor, cfg: LogitLossConfig, teacher_logits: torch.Tensor | None = None,
               topk_logprobs: torch.Tensor | None = None, topk_ids: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Divergence `cfg` between the teacher (dense logits or cached top-k) and the student, averaged over
    unmasked positions; `token_weights` (B, T) re-weight positions (e.g. `pid.student_error_weights`).

    Forward KL from a top-k cache goes through `forward_kl_topk` above, so the default objective of the
    trainer is unchanged bit for bit.
    """
    if cfg.kind == "forward_kl" and teacher_logits is None and token_weights is None:
        return forward_kl_topk(student_logits, topk_logprobs, topk_ids, cfg.temperature, mask)
    log_p, log_q = aligned_logprobs(student_logits, teacher_logits, topk_logprobs, topk_ids, cfg.temperature)
    per_token = divergence(log_p, log_q, cfg)  # (B, T)
    if token_weights is not None:
        per_token = per_token * token_weights.to(per_token.dtype)
    return _masked_mean(per_token, mask)


def cross_entropy_per_token(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE per position (B, T); 0 where the label is -100."""
    ce = F.cross_entropy(student_logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none")
    return ce.view(labels.shape)
