"""Online distillation of a sequence regressor: teacher and student train at the same time ([10] in
docs/references.md), with response, feature and relation transfer and adaptive mutual learning.

    method    teacher                                   student
    alone     -                                         task loss only
    offline   trained first, alone, then frozen         task + lambda (response + feature + relation)
    online    trains at the same time, task loss only   task + lambda (response + feature + relation)
    mutual    task + lambda_ST response(T <- S)         task + lambda_TS (response + feature + relation)

    response  MSE between the predictions (the other model's, detached)
    feature   1 - cos(projector(student feature), teacher feature): a linear projector, trained with the
              student and not exported, maps the student's feature into the teacher's width
    relation  RKD (distill/features.py): distances (all pairs) + 2 x angles (triplets of the first
              `relation_rows` rows) of the batch's features
    lambda    fixed `weight` for offline/online; for mutual, MutualWeights (distill/mutual.py): the weaker the
              student (EMA task loss), the more it listens, and the teacher listens to the student only while
              the teacher is the weaker one, at most gamma

Each model keeps its best state by validation RMSE; training stops once neither has improved for more than
`patience` epochs in a row. The loop checkpoints every epoch (safetensors, the optimizer's tensors, the RNG)
and resumes from there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgestill.distill.features import rkd_angle_loss, rkd_distance_loss
from edgestill.distill.mutual import MutualConfig, MutualWeights
from edgestill.errors import EdgestillError
from edgestill.files import atomic_path
from edgestill.progress import progress_bar

METHODS = ("alone", "offline", "online", "mutual")


@dataclass
class OnlineKDConfig:
    method: str = "mutual"  # alone, offline, online, mutual
    weight: float = 1.0  # lambda for offline / online (mutual adapts it)
    response: float = 1.0
    feature: float = 0.5
    relation: float = 0.5
    relation_rows: int = 64  # the angle term is cubic in the rows it sees
    mutual_k: float = 5.0  # MutualConfig (distill/mutual.py): sharpness of the sigmoid on the loss gap
    mutual_gamma: float = 0.5  # the cap on the teacher's weight for the student's response
    mutual_ema: float = 0.9
    mutual_gap: str = "log_ratio"  # regression MSEs are small numbers: compare them as a ratio, not a difference

    def __post_init__(self):
        self.check()

    def check(self) -> MutualConfig:
        if self.method not in METHODS:
            raise EdgestillError(f"kd.method '{self.method}': choose {', '.join(METHODS)}")
        for name in ("weight", "response", "feature", "relation"):
            if getattr(self, name) < 0:
                raise EdgestillError(f"kd.{name}={getattr(self, name)} must be >= 0")
        return MutualConfig(k=self.mutual_k, gamma=self.mutual_gamma, ema=self.mutual_ema, gap=self.mutual_gap)


def response_loss(student_pred: torch.Tensor, teacher_pred: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student_pred, teacher_pred.detach())


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, projector: nn.Module) -> torch.Tensor:
    return (1 - F.cosine_similarity(projector(student_feat), teacher_feat.detach(), dim=-1)).mean()


def relation_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, rows: int = 64) -> torch.Tensor:
    angle = rkd_angle_loss(student_feat[:rows], teacher_feat[:rows]) if min(rows, len(student_feat)) >= 3 else 0.0
    return rkd_distance_loss(student_feat, teacher_feat) + 2 * angle


def transfer_loss(s_pred, s_feat, t_pred, t_feat, projector: nn.Module, cfg: OnlineKDConfig) -> torch.Tensor:
    """The student's distillation term: weighted response + feature + relation transfer from the teacher."""
    loss = cfg.response * response_loss(s_pred, t_pred)
    if cfg.feature:
        loss = loss + cfg.feature * feature_loss(s_feat, t_feat, projector)
    if cfg.relation and len(s_feat) >= 2:
        loss = loss + cfg.relation * relation_loss(s_feat, t_feat.detach(), cfg.relation_rows)
    return loss


@dataclass
class TrainSchedule:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-2  # the student's: a ~1k-parameter conv net wants a large step
    teacher_lr: float = 1e-3
    patience: int = 6  # stop after more than this many epochs in a row without a better validation RMSE (either model)
    seed: int = 0
    lr_schedule: str = "cosine"  # constant, or cosine: each epoch's lr decays from lr towards 0 over `epochs`

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.teacher_lr <= 0 or self.patience < 0:
            raise EdgestillError(f"train: epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1, lr and "
                                 f"teacher_lr > 0, patience >= 0")
        if self.lr_schedule not in ("constant", "cosine"):
            raise EdgestillError(f"train.lr_schedule '{self.lr_schedule}': choose constant or cosine")

    def lr_factor(self, epoch: int) -> float:
        """The multiplier on both learning rates in `epoch` (a function of the epoch only, so a resumed run
        continues the same schedule)."""
        if self.lr_schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Predictions as fractions of the RUL cap."""
    model.eval()
    out = [model(torch.from_numpy(x[i:i + batch_size]))[0] for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, dtype=np.float64) - target) ** 2)))


class _Best:
    def __init__(self, model: nn.Module | None):
        self.model = model
        self.rmse = math.inf
        self.epoch = -1
        self.state = None if model is None else {k: v.clone() for k, v in model.state_dict().items()}

    def offer(self, value: float, epoch: int) -> bool:
        if self.model is None or not value < self.rmse:
            return False
        self.rmse, self.epoch = value, epoch
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}
        return True


def _save(path: Path, models: dict, optimizers: dict, bests: dict, meta: dict) -> None:
    """One atomic checkpoint folder: each model's current and best weights, the optimizers, the loop's state."""
    from safetensors.torch import save_file

    with atomic_path(path, "writing a training checkpoint", is_dir=True) as tmp:
        for name, model in models.items():
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / f"{name}.safetensors"))
            if bests.get(name) is not None and bests[name].state is not None:
                save_file({k: v.contiguous() for k, v in bests[name].state.items()}, str(tmp / f"{name}.best.safetensors"))
        for name, opt in optimizers.items():
            torch.save(opt.state_dict(), tmp / f"{name}.optimizer.pt")
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))  # dropout masks continue exactly
        (tmp / "state.json").write_text(json.dumps(meta))


def _load(path: Path, models: dict, optimizers: dict, bests: dict) -> dict | None:
    from safetensors.torch import load_file

    if not (path / "state.json").is_file():
        return None
    meta = json.loads((path / "state.json").read_text())
    for name, model in models.items():
        model.load_state_dict(load_file(str(path / f"{name}.safetensors")))
        best_file = path / f"{name}.best.safetensors"
        if bests.get(name) is not None and best_file.is_file():
            bests[name].state = load_file(str(best_file))
            bests[name].rmse, bests[name].epoch = meta["best"][name]["rmse"], meta["best"][name]["epoch"]
    for name, opt in optimizers.items():
        # weights_only: the optimizer state is tensors and numbers we wrote; nothing else is unpickled
        opt.load_state_dict(torch.load(path / f"{name}.optimizer.pt", weights_only=True))
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    return meta


def train(student: nn.Module | None, teacher: nn.Module | None, train_x: np.ndarray, train_y: np.ndarray,
          val_x: np.ndarray, val_y: np.ndarray, cfg: OnlineKDConfig, sched: TrainSchedule,
          checkpoint: Path | None = None, desc: str = "training") -> dict:
    """Train `student` and/or `teacher` (targets `*_y` are fractions of the RUL cap) as `cfg.method` says.

    alone: pass only the model to train (student or teacher, the other None). offline: the teacher is frozen
    (already trained). online / mutual: both train. Returns the history and each model's best validation RMSE
    (fraction of cap); each trained model is left in its best state.
    """
    method = cfg.method
    mutual_cfg = cfg.check()
    sched.check()
    if method == "alone" and (student is None) == (teacher is None):
        raise EdgestillError("method 'alone' trains exactly one model: pass a student or a teacher, not both")
    if method != "alone" and (student is None or teacher is None):
        raise EdgestillError(f"method '{method}' needs both a teacher and a student")
    trains_teacher = teacher is not None and method in ("alone", "online", "mutual")
    trains_student = student is not None
    torch.manual_seed(sched.seed)
    projector = None
    models, optimizers, bests = {}, {}, {}
    if trains_student:
        params = list(student.parameters())
        if method != "alone":
            projector = nn.Linear(student.feature_dim, teacher.feature_dim)
            params += list(projector.parameters())
            models["projector"] = projector
        models["student"] = student
        optimizers["student"] = torch.optim.AdamW(params, lr=sched.lr, weight_decay=1e-4)
        bests["student"] = _Best(student)
    if trains_teacher:
        models["teacher"] = teacher
        optimizers["teacher"] = torch.optim.AdamW(teacher.parameters(), lr=sched.teacher_lr, weight_decay=1e-4)
        bests["teacher"] = _Best(teacher)
    weights = MutualWeights(mutual_cfg)
    history: list[dict] = []
    start, stale = 0, 0
    if checkpoint is not None:
        meta = _load(checkpoint, models, optimizers, bests)
        if meta is not None:
            if meta["method"] != method:
                raise EdgestillError(f"{checkpoint} holds a '{meta['method']}' run, not '{method}'; use another "
                                     f"output folder or delete it")
            start, stale, history = meta["epoch"] + 1, meta["stale"], meta["history"]
            weights.load_state_dict(meta["weights"])
    xt, yt = torch.from_numpy(train_x), torch.from_numpy(train_y)
    n = len(yt)
    frozen = None  # offline: the frozen teacher's outputs on every training window, computed once
    if teacher is not None and not trains_teacher:
        teacher.eval()
        with torch.no_grad():
            parts = [teacher(xt[i:i + 1024]) for i in range(0, n, 1024)]
        frozen = (torch.cat([p for p, _ in parts]), torch.cat([f for _, f in parts]))
    steps_per_epoch = max(1, math.ceil(n / sched.batch_size))
    bar = progress_bar(total=sched.epochs * steps_per_epoch, desc=desc, unit="step", initial=start * steps_per_epoch)
    for epoch in range(start, sched.epochs):
        if stale > sched.patience:
            break
        order = torch.from_numpy(np.random.default_rng([sched.seed, epoch]).permutation(n))
        for name, opt in optimizers.items():
            base = sched.teacher_lr if name == "teacher" else sched.lr
            for group in opt.param_groups:
                group["lr"] = base * sched.lr_factor(epoch)
        sums: dict[str, float] = {}
        for models_ in models.values():
            models_.train()
        for b in range(steps_per_epoch):
            rows = order[b * sched.batch_size:(b + 1) * sched.batch_size]
            x, y = xt[rows], yt[rows]
            cached = None if frozen is None else (frozen[0][rows], frozen[1][rows])
            logs = _step(student, teacher, projector, x, y, cfg, optimizers, weights, trains_teacher, cached)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
        record = {"epoch": epoch, **{k: v / steps_per_epoch for k, v in sums.items()}}
        improved = False
        for name in bests:
            value = rmse(predict(models[name], val_x), val_y)
            record[f"{name}_val_rmse"] = value
            improved |= bests[name].offer(value, epoch)
        stale = 0 if improved else stale + 1
        history.append(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k.endswith("val_rmse")})
        if checkpoint is not None:
            _save(checkpoint, models, optimizers, bests, {
                "method": method, "epoch": epoch, "stale": stale, "history": history, "weights": weights.state_dict(),
                "best": {k: {"rmse": b.rmse, "epoch": b.epoch} for k, b in bests.items()}})
    bar.close()
    for name, best in bests.items():
        if best.state is not None:
            models[name].load_state_dict(best.state)
    return {"history": history, "epochs": len(history),
            "best": {name: {"val_rmse": b.rmse, "epoch": b.epoch} for name, b in bests.items()}}


def _step(student, teacher, projector, x, y, cfg: OnlineKDConfig, optimizers: dict, weights: MutualWeights,
          trains_teacher: bool, cached: tuple | None = None) -> dict:
    logs = {}
    t_pred = t_feat = None
    if cached is not None:  # a frozen teacher's outputs for these rows (train computes them once)
        t_pred, t_feat = cached
    elif teacher is not None:  # a teacher that trains alongside
        t_pred, t_feat = teacher(x)
    if student is None:  # the teacher alone
        t_task = F.mse_loss(t_pred, y)
        optimizers["teacher"].zero_grad(set_to_none=True)
        t_task.backward()
        optimizers["teacher"].step()
        return {"teacher_task": t_task.item()}
    s_pred, s_feat = student(x)
    s_task = F.mse_loss(s_pred, y)
    loss = s_task
    lam_ts, lam_st = cfg.weight, 0.0
    if cfg.method == "mutual":
        t_task_value = F.mse_loss(t_pred.detach(), y).item()
        lam_ts, lam_st = weights.update(s_task.item(), t_task_value)
    if teacher is not None:
        kd = transfer_loss(s_pred, s_feat, t_pred, t_feat, projector, cfg)
        loss = loss + lam_ts * kd
        logs["kd"] = kd.item()
        logs["lambda_ts"] = lam_ts
    optimizers["student"].zero_grad(set_to_none=True)
    loss.backward()
    optimizers["student"].step()
    logs["student_task"] = s_task.item()
    if trains_teacher:
        t_loss = F.mse_loss(t_pred, y)
        logs["teacher_task"] = t_loss.item()
        if cfg.method == "mutual":
            t_loss = t_loss + lam_st * cfg.response * response_loss(t_pred, s_pred)
            logs["lambda_st"] = lam_st
        optimizers["teacher"].zero_grad(set_to_none=True)
        t_loss.backward()
        optimizers["teacher"].step()
    return logs


def stream_update(student: nn.Module, teacher: nn.Module, x: np.ndarray, order: list[int], lr: float = 1e-2,
                  batch: int = 16) -> np.ndarray:
    """Learning after deployment, without labels: windows arrive one at a time in `order`; each is predicted
    first (the error counted is always on data the student has not learned from: prequential), then the student
    takes a step towards the teacher's prediction of the last `batch` arrivals. Returns the predictions in
    arrival order (fractions of the cap)."""
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    teacher.eval()
    seen: list[int] = []
    out = np.zeros(len(order), dtype=np.float32)
    xt = torch.from_numpy(x)
    for j, row in enumerate(order):
        student.eval()
        with torch.no_grad():
            out[j] = student(xt[row:row + 1])[0].item()
        seen.append(row)
        recent = xt[seen[-batch:]]
        with torch.no_grad():
            target = teacher(recent)[0]
        student.train()
        loss = F.mse_loss(student(recent)[0], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    student.eval()
    return out
