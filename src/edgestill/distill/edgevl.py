"""EdgeVL ([6] in docs/references.md): a vision-language image tower brought to a small int8 student that reads
another visual modality, with no labels.

    teacher   a CLIP-style image tower aligned to the frozen text encoder's class-name prompts: cross-entropy over
              cosine similarities / temperature, on the seen classes' first-view images (the one labelled step;
              skipped when the user brings an aligned teacher)
    stage 1   dual-modality distillation: the student reads the second view (or, with probability
              1 - second_share, the first) and matches the frozen teacher's unit embedding of the paired first view,
              L1 loss, no labels
    stage 2   quantization-aware contrastive training: the stage-1 student with int8 fake quantization
              (quant/qat_int8.py), trained on L1 to the teacher + a batch-hard triplet loss on pseudo-labels (the
              teacher's zero-shot class of the first view among the seen prompts), so int8 keeps the feature space
    rgb-only  the baseline: stage 1 with second_share = 0 (the student never sees the second view)

Each fit keeps the state with the best validation loss (label-free for the students: their own loss on the
validation images) and reports its history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgestill.errors import EdgestillError
from edgestill.progress import progress_bar


@dataclass
class FitConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3

    def check(self, who: str) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise EdgestillError(f"{who}: epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1 and "
                                 f"lr ({self.lr}) > 0")


@dataclass
class TeacherFitConfig(FitConfig):
    epochs: int = 25  # 8 left MNIST's teacher at 0.85 seen-class accuracy; 25 reach 0.98 (first try, seed 0)
    lr: float = 1e-3
    temperature: float = 0.05  # of the cosine logits


@dataclass
class Stage1Config(FitConfig):
    second_share: float = 0.5  # probability that a training image is shown in the second view

    def check(self, who: str = "stage1") -> None:
        super().check(who)
        if not 0 <= self.second_share <= 1:
            raise EdgestillError(f"{who}.second_share={self.second_share} must be in [0, 1]")


@dataclass
class Stage2Config(Stage1Config):
    epochs: int = 10
    lr: float = 5e-4
    margin: float = 0.2  # triplet margin, in cosine distance
    triplet_weight: float = 1.0  # loss = L1 to the teacher + triplet_weight * triplet


def embedding_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of unit embeddings (EdgeVL's stage-1 loss)."""
    return (student - teacher).abs().sum(-1).mean()


def batch_hard_triplet(emb: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """For each anchor: relu(d(hardest positive) - d(hardest negative) + margin), cosine distance, over the
    anchors that have both a positive and a negative in the batch (0 when none has)."""
    d = 1 - emb @ emb.T
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    pos = same & ~eye
    valid = pos.any(1) & (~same).any(1)
    if not bool(valid.any()):
        return emb.sum() * 0
    hardest_pos = d.masked_fill(~pos, -math.inf).amax(1)
    hardest_neg = d.masked_fill(same, math.inf).amin(1)
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()


def _cosine_lr(opt, base: float, epoch: int, epochs: int) -> None:
    for group in opt.param_groups:
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def fit(model: nn.Module, n: int, step_loss, val_loss, cfg: FitConfig, seed: int, desc: str) -> dict:
    """Adam with a cosine schedule over cfg.epochs; step_loss(model, batch indices) -> loss; val_loss(model) ->
    float. The model ends in its best validation state. Returns {epochs, best_epoch, best_val, history}."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best, best_state, best_epoch, history = math.inf, None, -1, []
    bar = progress_bar(total=cfg.epochs * math.ceil(n / cfg.batch_size), desc=desc, unit="step")
    for epoch in range(cfg.epochs):
        _cosine_lr(opt, cfg.lr, epoch, cfg.epochs)
        model.train()
        order, total = rng.permutation(n), 0.0
        for i in range(0, n, cfg.batch_size):
            loss = step_loss(model, order[i:i + cfg.batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(order[i:i + cfg.batch_size])
            bar.update(1)
        model.eval()
        with torch.no_grad():
            val = float(val_loss(model))
        history.append({"epoch": epoch, "train_loss": total / n, "val_loss": val})
        bar.set_postfix(val=f"{val:.4f}")
        if val < best:
            best, best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return {"epochs": cfg.epochs, "best_epoch": best_epoch, "best_val": best, "history": history}


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def train_teacher(tower: nn.Module, x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray,
                  text: np.ndarray, cfg: TeacherFitConfig, seed: int) -> dict:
    """Align `tower` to the text embeddings `text` (seen classes, rows): y / vy index those rows. Validation
    loss: 1 - zero-shot accuracy on (vx, vy)."""
    text_t = _t(text)

    def logits(model, images):
        return model(images) @ text_t.T / cfg.temperature

    def step(model, idx):
        return F.cross_entropy(logits(model, _t(x[idx])), _t(y[idx]))

    def val(model):
        pred = torch.cat([logits(model, _t(vx[i:i + 512])).argmax(1) for i in range(0, len(vx), 512)])
        return 1 - float((pred == _t(vy)).float().mean())

    return fit(tower, len(x), step, val, cfg, seed, "teacher (align to prompts)")


def pick_views(first: np.ndarray, second: np.ndarray, idx: np.ndarray, share: float, rng) -> np.ndarray:
    """The batch `idx`, each image in the second view with probability `share`."""
    use_second = rng.random(len(idx)) < share
    return np.where(use_second[:, None, None, None], second[idx], first[idx])


def distill_stage(student: nn.Module, first: np.ndarray, second: np.ndarray, target: np.ndarray,
                  val: tuple[np.ndarray, np.ndarray, np.ndarray], cfg: Stage1Config, seed: int, desc: str,
                  pseudo: np.ndarray | None = None, margin: float = 0.0, triplet_weight: float = 0.0) -> dict:
    """Stage 1 (pseudo is None) or stage 2 (`student` prepared for QAT, pseudo-labels given): the student reads
    each image in the second view with probability cfg.second_share and matches the teacher's embedding
    `target` of its first view. Validation: the same loss on the validation images, each view weighted by
    its share (val = (first, second, target))."""
    rng = np.random.default_rng(seed + 7919)
    target_t = _t(target)
    pseudo_t = None if pseudo is None else _t(pseudo)

    def step(model, idx):
        emb = model(_t(pick_views(first, second, idx, cfg.second_share, rng)))
        loss = embedding_l1(emb, target_t[idx])
        if pseudo_t is not None and triplet_weight > 0:
            loss = loss + triplet_weight * batch_hard_triplet(emb, pseudo_t[idx], margin)
        return loss

    vfirst, vsecond, vtarget = (_t(a) for a in val)

    def val_loss(model):
        loss = 0.0
        for images, weight in ((vfirst, 1 - cfg.second_share), (vsecond, cfg.second_share)):
            if weight > 0:
                loss += weight * float(embedding_l1(model(images), vtarget))
        return loss

    return fit(student, len(first), step, val_loss, cfg, seed, desc)
