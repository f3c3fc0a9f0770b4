"""What a client and the server do in one round of federated bidirectional distillation (FedMD-style, LBKD's setting,
[2] in docs/references.md). Pure torch: flower.py runs these on Flower's simulation engine.

    client k, round r:  CE on its own labelled texts  +  alpha * T^2 KL(server's target || client) on the public texts
                        (from round 2 on: the server -> client direction), then its logits on the public texts
    server, round r:    T^2 KL(aggregated client target || server) on the public texts (client -> server direction),
                        then its logits on the public texts, sent to the clients in round r + 1

Only logits on the public texts cross the network; the public texts carry no labels. Both loops are
`train_classifier` (distill/classifier.py): AdamW with warmup, the best validation state kept.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edgestill.distill.classifier import TrainConfig, kd_logits_loss, train_classifier
from edgestill.errors import EdgestillError
from edgestill.models.encoder import tokenize

NO_LABEL = -100  # public rows: no gold label, only the KD term sees them


def partition(labels: list[str], clients: int, seed: int) -> list[list[int]]:
    """Row indices dealt to `clients` shards, stratified by label (each label's rows shuffled, then dealt round-robin
    from a rotating start), so every shard has each label in the data's proportions."""
    if clients < 1:
        raise EdgestillError(f"federated.clients={clients}: give at least 2 clients")
    rng = np.random.default_rng(seed)
    shards: list[list[int]] = [[] for _ in range(clients)]
    start = 0
    for label in sorted(set(labels)):
        rows = np.flatnonzero(np.asarray(labels) == label)
        rng.shuffle(rows)
        for j, i in enumerate(rows):
            shards[(start + j) % clients].append(int(i))
        start = (start + len(rows)) % clients
    too_small = [k for k, s in enumerate(shards) if not s]
    if too_small:
        raise EdgestillError(f"{len(labels)} training rows cannot give each of {clients} clients a shard; use fewer "
                             "clients (federated.clients) or more data")
    return [sorted(s) for s in shards]


def client_round(model, tokenizer, texts: list[str], ids: np.ndarray, public: list[str], target: np.ndarray | None,
                 val: dict, val_ids: np.ndarray, train: TrainConfig, alpha: float, temperature: float,
                 desc: str = "client") -> dict:
    """One client's round, in place: CE on (texts, ids) and, when the server sent a `target` (its logits (N, C) on
    `public`), KD towards it on the public texts. Returns train_classifier's record."""
    with_public = target is not None and alpha > 0
    all_texts = list(texts) + (list(public) if with_public else [])
    labels = np.concatenate([np.asarray(ids, dtype=np.int64),
                             np.full(len(public) if with_public else 0, NO_LABEL, dtype=np.int64)])
    enc = tokenize(tokenizer, all_texts, train.max_len)
    n_own = len(texts)
    soft = torch.from_numpy(np.asarray(target, dtype=np.float32)) if with_public else None

    def loss_fn(m, batch, y, idx):
        logits = m(**batch).logits
        gold = y >= 0
        ce = F.cross_entropy(logits[gold], y[gold]) if gold.any() else logits.sum() * 0.0
        if not with_public:
            return ce, {"ce": ce.item()}
        rows = np.asarray(idx)
        pub = rows >= n_own  # the public texts of this batch
        kl = (kd_logits_loss(logits[torch.from_numpy(pub)], soft[rows[pub] - n_own], temperature) if pub.any()
              else logits.sum() * 0.0)
        return (1 - alpha) * ce + alpha * kl, {"ce": ce.item(), "kl": kl.item()}

    return train_classifier(model, enc, labels, val, val_ids, train, loss_fn, desc=desc)


def server_round(model, tokenizer, public: list[str], target: torch.Tensor, val: dict, val_ids: np.ndarray,
                 train: TrainConfig, temperature: float, desc: str = "server") -> dict:
    """The server's round, in place: KD towards the aggregated target (log-probs (N, C)) on the public texts."""
    enc = tokenize(tokenizer, public, train.max_len)
    labels = np.full(len(public), NO_LABEL, dtype=np.int64)
    soft = target.detach().float()

    def loss_fn(m, batch, y, idx):
        kl = kd_logits_loss(m(**batch).logits, soft[np.asarray(idx)], temperature)
        return kl, {"kl": kl.item()}

    return train_classifier(model, enc, labels, val, val_ids, train, loss_fn, desc=desc)


def public_logits(model, tokenizer, public: list[str], max_len: int) -> np.ndarray:
    """(N, C) float32 logits on the public texts: what a party sends."""
    from edgestill.evaluate.classification import predict_logits

    model.eval()
    return predict_logits(model, tokenize(tokenizer, public, max_len), desc="public logits").astype(np.float32)
