"""Distillation losses: small functions over (B, T, V) logits that a training loop sums.

Teacher distributions come either as full logits or as a top-k cache: the teacher's k largest
log-probabilities per position (normalised over the full vocabulary) and their vocabulary ids.
The top-k probabilities are then exact and the rest of the vocabulary collapses into one
"tail" bucket, so the top-k loss equals the dense one when k covers the vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    """Dense KL(p_T || q_T) per token, averaged over unmasked positions. (B, T, V) inputs."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
    return _masked_mean(per_token, mask)


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
        kl_top = (log_p_top.exp() * (log_p_top - log_q_top)).sum(-1)
        # No tail term where the teacher's tail is empty (k covers the vocabulary: p_tail is rounding noise)
        # or the student's is (-inf): 0 * log 0 = 0 by convention.
        valid = (p_tail > 1e-6) & torch.isfinite(log_q_tail)
        kl_tail = torch.where(valid, p_tail * (p_tail.clamp_min(1e-30).log() - log_q_tail.clamp_min(-1e30)), torch.zeros_like(p_tail))
        per_token = kl_top + kl_tail
    else:
        log_p = F.log_softmax(t_top / temperature, dim=-1)
        log_q = F.log_softmax(s.gather(-1, ids) / temperature, dim=-1)
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return _masked_mean(per_token, mask)


def kd_objective(kd: torch.Tensor, ce: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """The base KD loss of shared/METHODS.md: alpha * T^2 * KL + (1 - alpha) * CE."""
    return alpha * temperature**2 * kd + (1.0 - alpha) * ce
