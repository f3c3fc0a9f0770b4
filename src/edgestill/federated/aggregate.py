"""How the server combines the clients' predictions on the public transfer set: one target distribution per text.

    mean          the average of the clients' probabilities (FedMD's consensus)
    median        per label, the median of the clients' probabilities, renormalised
    trimmed_mean  per label, the mean after dropping the `trim` largest and `trim` smallest, renormalised
    agreement     MTAKD's weighting: a client that disagrees with the others at a text gets a small weight there

The robust ones reuse distill/multi_teacher.py (`trimmed_target`, `agreement_target`), the same code the decoder job
uses to combine several teachers. Each client's share of the target is returned for the record: a malicious client
that robust aggregation outvotes shows a share well under 1/K.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgestill.distill.multi_teacher import AgreementConfig, agreement_target, average_target, trimmed_target
from edgestill.errors import EdgestillError

AGGREGATIONS = ("mean", "median", "trimmed_mean", "agreement")


def check_aggregation(method: str, clients: int, trim: int) -> None:
    if method not in AGGREGATIONS:
        raise EdgestillError(f"aggregation '{method}' is unknown; choose one of {', '.join(AGGREGATIONS)}")
    if method in ("median", "agreement") and clients < 3:
        raise EdgestillError(f"aggregation={method} needs at least 3 clients to outvote one (got {clients}); use more "
                             "clients or aggregation=mean")
    if method == "trimmed_mean" and not 0 < 2 * trim < clients:
        raise EdgestillError(f"aggregation=trimmed_mean with trim={trim} drops {2 * trim} of {clients} clients per label; "
                             f"trim must be at least 1 and leave one client (at most {(clients - 1) // 2})")


def aggregate_logits(client_logits: torch.Tensor, method: str, trim: int = 1, tau: float = 0.1,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, N, C) client logits -> (target log-probs (N, C), each client's mean share of the target (K,))."""
    k = client_logits.shape[0]
    check_aggregation(method, k, trim)
    if method == "mean":
        return average_target(client_logits, temperature), torch.full((k,), 1.0 / k)
    if method == "agreement":
        result = agreement_target(client_logits, AgreementConfig(tau=tau, temperature=temperature))
        return result.target_logprobs, result.weights.mean(1)
    logprobs = F.log_softmax(client_logits.detach().float() / temperature, dim=-1)  # (K, N, C)
    target, share = trimmed_target(logprobs, (k - 1) // 2 if method == "median" else trim)
    return target, share.mean(1)
