"""The distillation loop: read it top to bottom.

    for step in steps:
        rows   = this step's blocks (a seeded permutation per epoch; this rank's share under DDP)
        logits = student(blocks)
        loss   = alpha * T^2 * KL(teacher top-k || student) + (1 - alpha) * CE
        backward, clip, AdamW step
        every N steps: atomic checkpoint (student, optimizer, step, log)

The data order is a pure function of (seed, step), so a run killed at any point and resumed
from its last checkpoint replays exactly the steps an uninterrupted run would have taken.
Under `torchrun` the same loop runs with DistributedDataParallel (gloo, on CPU):
each rank takes an equal slice of the global batch and DDP averages the gradients.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from edgestill.config import DistillConfig
from edgestill.distill.losses import cross_entropy, forward_kl_topk, kd_objective
from edgestill.distill.teacher_cache import TopKCache, teacher_topk
from edgestill.errors import EdgestillError
from edgestill.progress import progress_bar


# --- where the teacher's distribution comes from -------------------------------------------------

@dataclass
class CachedTeacher:
    """Top-k log-probs read from a memory-mapped cache (the teacher ran once, offline)."""

    cache: TopKCache

    def topk(self, rows: np.ndarray, input_ids: torch.Tensor):
        return self.cache.get(rows)


@dataclass
class LiveTeacher:
    """Top-k log-probs computed by running the teacher on every batch (no cache)."""

    model: torch.nn.Module
    k: int

    def topk(self, rows: np.ndarray, input_ids: torch.Tensor):
        return teacher_topk(self.model, input_ids, self.k)


# --- distributed helpers ---------------------------------------------------------------------------

def dist_setup() -> tuple[int, int]:
    """(rank, world_size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # CPU training; a GPU device path would use NCCL
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_across_ranks(values: list[float]) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


# --- checkpoints -------------------------------------------------------------------------------------

def _save_checkpoint(ckpt_root: Path, student, optimizer, step: int, history: list[dict]) -> None:
    """Write ckpt-<step>/ completely, then atomically point LATEST at it, then drop older ones."""
    from safetensors.torch import save_model

    final = ckpt_root / f"ckpt-{step:06d}"
    tmp = ckpt_root / f".tmp-ckpt-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(student, str(tmp / "student.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = ckpt_root / "LATEST.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ckpt_root / "LATEST")
    for old in ckpt_root.glob("ckpt-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(ckpt_root: Path, student, optimizer) -> tuple[int, list[dict]]:
    from safetensors.torch import load_model

    latest = ckpt_root / "LATEST"
    if not latest.is_file():
        return 0, []
    path = ckpt_root / latest.read_text().strip()
    load_model(student, str(path / "student.safetensors"))
    # weights_only: the optimizer state is tensors and numbers; nothing else is unpickled.
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    return state["step"], state["history"]


# --- the loop -------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_rows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def batch_rows(step: int, batch_size: int, n_rows: int, seed: int) -> np.ndarray:
    """The global batch of `step`: consecutive slices of a fresh seeded permutation per epoch."""
    rows = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n_rows)
        rows.append(_epoch_order(seed, epoch, n_rows)[pos])
    return np.asarray(rows)


def learning_rate(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def validation_loss(model, blocks: np.ndarray, batch_size: int = 8) -> float:
    """Mean next-token CE of `model` over `blocks` (N, T)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(blocks[start : start + batch_size]).long()
        logits = model(input_ids=ids).logits[:, :-1]
        total += cross_entropy(logits, ids[:, 1:]).item() * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
    return total / max(count, 1)


def train_step(model, optimizer, teacher, blocks: np.ndarray, rows: np.ndarray, cfg: DistillConfig, trainable: list):
    """One optimizer step on `rows` of `blocks`; returns (loss, kd, ce, grad_norm) tensors."""
    input_ids = torch.from_numpy(blocks[rows]).long()  # (b, T)
    teacher_logprobs, teacher_ids = teacher.topk(rows, input_ids)  # (b, T-1, k) each
    model.train()
    logits = model(input_ids=input_ids).logits[:, :-1]  # (b, T-1, V)
    kd = forward_kl_topk(logits, teacher_logprobs, teacher_ids, cfg.temperature)
    ce = cross_entropy(logits, input_ids[:, 1:])
    loss = kd_objective(kd, ce, cfg.alpha, cfg.temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
    optimizer.step()
    return loss.detach(), kd.detach(), ce.detach(), grad_norm


def distill(student, teacher, blocks: np.ndarray, cfg: DistillConfig, run_dir: str | Path,
            val_blocks: np.ndarray | None = None, show_progress: bool = True) -> list[dict]:
    """Train `student` towards `teacher` (a CachedTeacher or LiveTeacher) on `blocks` (N, T).

    Checkpoints go to `run_dir/checkpoints`; an existing checkpoint there is resumed. Returns the
    per-step log (loss, kd, ce, lr, tokens/s and, every `eval_every` steps, val_loss).
    """
    rank, world = dist_setup()
    if cfg.batch_size % world:
        raise EdgestillError(f"distill.batch_size={cfg.batch_size} must be divisible by the {world} torchrun processes")
    if len(blocks) < cfg.batch_size:
        raise EdgestillError(
            f"corpus too small: the train split has {len(blocks)} blocks, fewer than one batch of {cfg.batch_size}; "
            "add text, lower distill.batch_size or data.seq_len, or raise data.max_train_tokens"
        )
    torch.manual_seed(cfg.seed)
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    log_path = run_dir / "train_log.jsonl"

    if cfg.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step, history = _load_checkpoint(ckpt_root, student, optimizer)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(h) + "\n" for h in history))  # drop steps after the checkpoint

    model = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student)
    local = cfg.batch_size // world
    seq_len = blocks.shape[1]
    bar = progress_bar(total=cfg.steps, initial=start_step, desc="distilling", unit="step", disable=not show_progress)
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        rows = batch_rows(step, cfg.batch_size, len(blocks), cfg.seed)[rank * local : (rank + 1) * local]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        loss, kd, ce, grad_norm = train_step(model, optimizer, teacher, blocks, rows, cfg, trainable)

        loss_v, kd_v, ce_v = _mean_across_ranks([loss.item(), kd.item(), ce.item()])
        record = {"step": step + 1, "loss": loss_v, "kd": kd_v, "ce": ce_v, "lr": learning_rate(step, cfg),
                  "grad_norm": float(grad_norm), "tokens_per_s": cfg.batch_size * seq_len / (time.perf_counter() - t0)}
        last = step + 1 == cfg.steps
        if rank == 0 and val_blocks is not None and len(val_blocks) and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            record["val_loss"] = validation_loss(student, val_blocks)
        history.append(record)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
                _save_checkpoint(ckpt_root, student, optimizer, step + 1, history)
        bar.set_postfix(loss=f"{loss_v:.3f}", kd=f"{kd_v:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
    bar.close()
    if dist.is_initialized():
        dist.barrier()
    student.eval()
    return history
