"""The distillation loop: read it top to bottom.

    for step in steps:
        rows   = this step's blocks (a seeded permutation per epoch; this rank's share under DDP)
        [on-policy: with probability lambda, replace them by the student's own continuations]
        [several teachers: mix their top-k per token by agreement (MTAKD) or equally, log the weights]
        logits = student(blocks)
        loss   = alpha * T^2 * D(teacher top-k || student) + (1 - alpha) * CE
                 [+ hidden-state MSE + attention-relation KL, with the live teacher]
        backward, clip, AdamW step
        [PID: move alpha towards the wanted KD/CE ratio]
        every N steps: atomic checkpoint (student, optimizer, step, log, method state)
        every eval_every steps (and at step 0, the student as cut): held-out KL to the teacher; the best
            state so far is kept in checkpoints/best
    the student returned is the kept state (`distill.select`: val_kl, fidelity first, by default)

How many steps: `distill.steps`, or what `distill.budget` buys (a token count, or a time measured on the first steps:
distill/budget.py, resolved once and kept in RUN/budget.json).
D is forward KL by default; `distill.loss` picks reverse KL, skew KL, JSD... (distill/losses.py).
The bracketed parts are off by default and switched on by DistillConfig fields (see `Methods`).

The data order is a pure function of (seed, step), so a run killed at any point and resumed
from its last checkpoint replays exactly the steps an uninterrupted run would have taken.
Under `torchrun` the same loop runs with DistributedDataParallel (gloo, on CPU):
each rank takes an equal slice of the global batch and DDP averages the gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from edgestill.distill.budget import TrainBudget, probe_steps
from edgestill.distill.features import CaptureQKV, HiddenStateMSE, minilm_relation_loss, sliced_layer_map, uniform_layer_map
from edgestill.distill.losses import LogitLossConfig, cross_entropy, cross_entropy_per_token, kd_objective, logit_loss
from edgestill.distill.multi_teacher import TeacherMixer, plot_teacher_weights
from edgestill.distill.on_policy import OnPolicyBatches, OnPolicyConfig
from edgestill.distill.pid import PIDController, kakd_alpha_controller, student_error_weights
from edgestill.distill.teacher_cache import TopKCache, UnionTopKCache, teacher_topk, teachers_union_topk
from edgestill.errors import EdgestillError
from edgestill.files import atomic_path, write_text_atomic
from edgestill.progress import progress_bar

if TYPE_CHECKING:  # the recipe schema sits above the library: imported for type hints only
    from edgestill.config import DistillConfig

log = logging.getLogger("edgestill")


# --- where the teacher's distribution comes from -------------------------------------------------

@dataclass
class CachedTeacher:
    """Top-k log-probs read from a memory-mapped cache (the teacher ran once, offline).

    `model` is optional: methods that need more than the cached logits (hidden states, attention
    relations, scoring the student's own samples) run it live when it is given.
    """

    cache: TopKCache
    model: torch.nn.Module | None = None

    def topk(self, rows: np.ndarray, input_ids: torch.Tensor):
        return self.cache.get(rows)


@dataclass
class LiveTeacher:
    """Top-k log-probs computed by running the teacher on every batch (no cache)."""

    model: torch.nn.Module
    k: int

    def topk(self, rows: np.ndarray, input_ids: torch.Tensor):
        return teacher_topk(self.model, input_ids, self.k)


@dataclass
class MultiTeacher:
    """K teachers sharing one tokenizer (MTAKD): every teacher's log-probs on a common set of ids per position.

    From a joint cache (`cache`, built once by `build_union_topk_cache`) or, without one, by running all
    `models` (primary first) on every batch. `topk` returns (log-probs (K, b, T-1, U), ids (b, T-1, U));
    the trainer mixes them into one target (`TeacherMixer`). `model` is the primary teacher, for methods
    that need it live (hidden states, attention relations). `names` label the logged weights.
    """

    names: list[str]
    k: int
    cache: UnionTopKCache | None = None
    models: list | None = None
    model: torch.nn.Module | None = None

    def __post_init__(self):
        if self.cache is None and not self.models:
            raise ValueError("MultiTeacher needs a cache or the teacher models")
        if self.model is None and self.models:
            self.model = self.models[0]

    def topk(self, rows: np.ndarray, input_ids: torch.Tensor):
        if self.cache is not None:
            return self.cache.get(rows)
        return teachers_union_topk(self.models, input_ids, self.k)


def needs_live_teacher(cfg: DistillConfig) -> bool:
    """True when the configured methods need the teacher model at training time, not just its top-k cache."""
    return cfg.hidden_mse_weight > 0 or cfg.attention_relation_weight > 0 or cfg.on_policy_fraction > 0


@torch.no_grad()
def _run_teacher_live(model, input_ids: torch.Tensor, k: int, hidden_states: bool, qkv: CaptureQKV | None):
    """One teacher forward: (top-k log-probs, ids) as `teacher_topk` computes them, plus hidden states / Q,K,V."""
    with qkv if qkv is not None else contextlib.nullcontext():
        out = model(input_ids=input_ids, output_hidden_states=hidden_states)
    logits = out.logits[:, :-1].float()  # (B, T-1, V)
    values, ids = torch.topk(logits, k, dim=-1)  # (B, T-1, k)
    return values - torch.logsumexp(logits, dim=-1, keepdim=True), ids, out.hidden_states, qkv.outputs if qkv else None


# --- the optional methods a DistillConfig switches on -------------------------------------------------

@dataclass
class Methods:
    """Everything beyond plain top-k KD, built once from the config (all off by default).

    logit:      which divergence the KD term uses
    alpha:      the KD weight of the current step (cfg.alpha, or the PID controller's output)
    pid:        KAKD controller moving alpha after every step
    on_policy:  GKD/DistiLLM batches replaced by student samples
    hidden_mse: learned projections for hidden-state MSE (trained with the student)
    student_qkv, teacher_qkv: hooks capturing the last layer's Q/K/V for MiniLMv2 relations
    teacher_model: the live teacher, when a method needs one
    teachers:   MTAKD mixer of several teachers (a MultiTeacher source); teacher_weights: its last mean weights
    vocab:      a student with a trimmed vocabulary (models/vocab.VocabMap): it reads its own ids, and the teacher's
                targets are mapped into its vocabulary
    compiled:   the student under torch.compile (distill.compile): the training forward runs through it
    """

    logit: LogitLossConfig
    alpha: float
    pid: PIDController | None = None
    on_policy: OnPolicyBatches | None = None
    hidden_mse: HiddenStateMSE | None = None
    student_qkv: CaptureQKV | None = None
    teacher_qkv: CaptureQKV | None = None
    teacher_model: torch.nn.Module | None = None
    teachers: TeacherMixer | None = None
    teacher_weights: list[float] | None = None
    vocab: object | None = None
    compiled: torch.nn.Module | None = None

    @classmethod
    def from_config(cls, cfg: DistillConfig, student=None, teacher=None, layers: list[int] | None = None) -> "Methods":
        """`layers`: the teacher blocks a sliced student kept (pairs its hidden states with theirs); None: a uniform map."""
        methods = cls(logit=LogitLossConfig(kind=cfg.loss, temperature=cfg.temperature, skew=cfg.skew, beta=cfg.beta),
                      alpha=cfg.alpha)
        for name in ("hidden_mse_weight", "attention_relation_weight", "token_focus"):
            if getattr(cfg, name) < 0:
                raise EdgestillError(f"distill.{name}={getattr(cfg, name)} must be >= 0 (0 switches it off)")
        if cfg.pid:
            methods.pid = kakd_alpha_controller(cfg.pid_setpoint, cfg.alpha)
        if needs_live_teacher(cfg):
            methods.teacher_model = getattr(teacher, "model", None)
            if methods.teacher_model is None:
                wanted = [f"distill.{n}" for n in ("hidden_mse_weight", "attention_relation_weight", "on_policy_fraction")
                          if getattr(cfg, n) > 0]
                raise EdgestillError(f"{' and '.join(wanted)} need(s) the teacher model at training time, not only its "
                                     "top-k cache; set distill.cache_teacher=false")
        if isinstance(teacher, MultiTeacher):
            methods.teachers = TeacherMixer(cfg.teacher_weighting, cfg.agreement_tau, cfg.teacher_trim)
            if cfg.on_policy_fraction > 0 and teacher.cache is not None:
                raise EdgestillError("distill.on_policy_fraction with teacher.extra needs every teacher live to score "
                                     "the student's samples; set distill.cache_teacher=false")
        if cfg.on_policy_fraction > 0:
            methods.on_policy = OnPolicyBatches(OnPolicyConfig(
                fraction=cfg.on_policy_fraction, adaptive=cfg.on_policy_adaptive,
                prompt_tokens=cfg.on_policy_prompt_tokens, seed=cfg.seed))
        if cfg.hidden_mse_weight > 0:
            n_s, n_t = student.config.num_hidden_layers, methods.teacher_model.config.num_hidden_layers
            layer_map = sliced_layer_map(layers, n_t) if layers is not None else uniform_layer_map(n_s, n_t)
            methods.hidden_mse = HiddenStateMSE(student.config.hidden_size, methods.teacher_model.config.hidden_size,
                                                layer_map)
        if cfg.attention_relation_weight > 0:
            methods.student_qkv = CaptureQKV(student)
            methods.teacher_qkv = CaptureQKV(methods.teacher_model)
        if cfg.compile:  # compiled lazily, on the first call; the module itself stays as it is (state dict, eval)
            if student is None:
                raise ValueError("distill.compile needs the student: build Methods once with it and pass it to every "
                                 "train_step, or each step would compile again")
            methods.compiled = torch.compile(student)
        return methods

    def parameters(self) -> list:
        """Trainable parameters of the methods themselves (the hidden-state projections)."""
        return list(self.hidden_mse.parameters()) if self.hidden_mse is not None else []

    def state_dict(self) -> dict:
        return {"alpha": self.alpha,
                "pid": self.pid.state_dict() if self.pid else None,
                "on_policy": self.on_policy.state_dict() if self.on_policy else None,
                "hidden_mse": self.hidden_mse.state_dict() if self.hidden_mse else None}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = state["alpha"]
        for name in ("pid", "on_policy", "hidden_mse"):
            if getattr(self, name) is not None and state.get(name) is not None:
                getattr(self, name).load_state_dict(state[name])


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

def save_checkpoint(ckpt_root: Path, student, optimizer, step: int, history: list[dict],
                     methods: Methods | None = None) -> None:
    """Write ckpt-<step>/ completely, then atomically point LATEST at it, then drop older ones."""
    from safetensors.torch import save_model

    final = ckpt_root / f"ckpt-{step:06d}"
    # the weights and AdamW's two moments: about 3x the student's fp32 bytes (the previous checkpoint stays meanwhile)
    needed = 3 * sum(p.numel() * p.element_size() for p in student.parameters())
    with atomic_path(final, "writing a checkpoint", needed_bytes=needed, is_dir=True) as tmp:
        save_model(student, str(tmp / "student.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}))
        if methods is not None:
            torch.save(methods.state_dict(), tmp / "methods.pt")  # PID, on-policy buffer, projections
    write_text_atomic(ckpt_root / "LATEST", final.name, "writing a checkpoint")
    for old in ckpt_root.glob("ckpt-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)


def _save_best(ckpt_root: Path, student, record: dict) -> None:
    """Keep `student` as checkpoints/best (weights, then best.json naming its step and scores), atomically."""
    from safetensors.torch import save_model

    best = ckpt_root / "best"
    needed = sum(p.numel() * p.element_size() for p in student.parameters())
    with atomic_path(best, "keeping the best checkpoint", needed_bytes=needed, is_dir=True) as tmp:
        save_model(student, str(tmp / "student.safetensors"))
        (tmp / "best.json").write_text(json.dumps(record))


def _read_best(ckpt_root: Path) -> dict | None:
    path = ckpt_root / "best" / "best.json"
    return json.loads(path.read_text()) if path.is_file() else None


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether `distill` has checkpointed in `run_dir` (a rerun resumes from there)."""
    return (Path(run_dir) / "checkpoints" / "LATEST").is_file()


def load_checkpoint(ckpt_root: Path, student, optimizer, methods: Methods | None = None) -> tuple[int, list[dict]]:
    from safetensors.torch import load_model

    latest = ckpt_root / "LATEST"
    if not latest.is_file():
        return 0, []
    path = ckpt_root / latest.read_text().strip()
    load_model(student, str(path / "student.safetensors"))
    # weights_only: the optimizer state is tensors and numbers; nothing else is unpickled.
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if methods is not None and (path / "methods.pt").is_file():
        methods.load_state_dict(torch.load(path / "methods.pt", weights_only=True))
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


SELECT_ON = {"val_kl": "kl_teacher_student", "val_loss": "val_loss"}  # distill.select -> the score it minimises


def held_out_scores(student, reference, blocks: np.ndarray, batch_size: int = 8, vocab=None) -> dict:
    """What checkpoint selection reads: the student's held-out CE and, with a `reference` (the teacher model),
    its KL(teacher || student) and top-1 agreement on the same blocks (the report's definitions; `vocab`: the
    student's VocabMap when its vocabulary is trimmed)."""
    if reference is None:
        return {"val_loss": validation_loss(student, blocks, batch_size, vocab)}
    from edgestill.evaluate.metrics import compare_lm

    summary = compare_lm(reference, student, blocks, batch_size, vocab)["summary"]
    return {"val_loss": math.log(summary["student_perplexity"]), "kl_teacher_student": summary["kl_teacher_student"],
            "top1_agreement": summary["top1_agreement"]}


@torch.no_grad()
def validation_loss(model, blocks: np.ndarray, batch_size: int = 8, vocab=None) -> float:
    """Mean next-token CE of `model` over `blocks` (N, T) (per teacher token for a trimmed vocabulary's `vocab`)."""
    if vocab is not None:
        from edgestill.evaluate.metrics import token_nll

        return float(token_nll(model, blocks, batch_size, desc="validation", vocab=vocab).mean())
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(blocks[start : start + batch_size]).long()
        logits = model(input_ids=ids).logits[:, :-1]
        total += cross_entropy(logits, ids[:, 1:]).item() * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
    return total / max(count, 1)


def train_step(model, optimizer, teacher, blocks: np.ndarray, rows: np.ndarray, cfg: DistillConfig, trainable: list,
               methods: Methods | None = None, step: int = 0, rank: int = 0):
    """One optimizer step on `rows` of `blocks`; returns (loss, kd, ce, grad_norm) tensors.

    `methods` (built from `cfg` when omitted) adds whatever the config switched on; `step` and `rank`
    seed the on-policy coin and sampling.
    """
    methods = methods if methods is not None else Methods.from_config(cfg)
    student = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    input_ids = torch.from_numpy(blocks[rows]).long()  # (b, T)
    kd_mask = None  # (b, T-1): the positions the KD term counts; None = all
    if methods.on_policy is not None:
        input_ids, kd_mask = methods.on_policy.draw(step, input_ids, student, rank)  # sampled without gradient
    on_policy = kd_mask is not None
    want_hidden = methods.hidden_mse is not None
    teacher_hidden = teacher_qkv = None
    if methods.teacher_model is not None:
        teacher_logprobs, teacher_ids, teacher_hidden, teacher_qkv = _run_teacher_live(
            methods.teacher_model, input_ids, cfg.top_k, want_hidden, methods.teacher_qkv)
    if methods.teacher_model is None or methods.teachers is not None:
        teacher_logprobs, teacher_ids = teacher.topk(rows, input_ids)  # (b, T-1, k) each; several teachers: (K, b, T-1, U)
    if methods.teachers is not None:  # MTAKD: one target per token, mixed from the K teachers on shared ids
        teacher_logprobs, weights = methods.teachers.combine(teacher_logprobs)  # (b, T-1, U), (K, b, T-1)
        methods.teacher_weights = weights.mean(dim=(1, 2)).tolist()
    model.train()
    student_ids = input_ids if methods.vocab is None else methods.vocab.student_ids(input_ids)
    with methods.student_qkv if methods.student_qkv is not None else contextlib.nullcontext(), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        forward = methods.compiled if methods.compiled is not None else model
        out = forward(input_ids=student_ids, output_hidden_states=want_hidden)
    logits = out.logits[:, :-1].float()  # (b, T-1, V); the losses in fp32 whatever the forward's precision
    labels = student_ids[:, 1:]  # (b, T-1)
    kd_logits = logits
    if methods.vocab is not None:  # the teacher's targets in the student's vocabulary, trimmed ids in a column of no mass
        teacher_logprobs, teacher_ids = methods.vocab.teacher_topk(teacher_logprobs, teacher_ids)
        kd_logits = methods.vocab.with_dummy_column(logits)

    token_weights = None
    if cfg.token_focus > 0:  # KAKD: transfer more where the student is weak
        token_weights = student_error_weights(cross_entropy_per_token(logits.detach(), labels), kd_mask, cfg.token_focus)
    kd = logit_loss(kd_logits, methods.logit, topk_logprobs=teacher_logprobs, topk_ids=teacher_ids, mask=kd_mask,
                    token_weights=token_weights)
    ce = cross_entropy(logits, labels)
    if on_policy:  # the student's own text has no labels worth fitting: divergence only (GKD)
        loss = cfg.temperature**2 * kd
    else:
        loss = kd_objective(kd, ce, methods.alpha, cfg.temperature)
    if methods.hidden_mse is not None:
        loss = loss + cfg.hidden_mse_weight * methods.hidden_mse(out.hidden_states, teacher_hidden)
    if methods.student_qkv is not None:
        loss = loss + cfg.attention_relation_weight * minilm_relation_loss(
            methods.student_qkv.outputs, teacher_qkv, cfg.relation_heads, causal=True)

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    _average_method_grads(methods)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
    optimizer.step()
    return loss.detach(), kd.detach(), ce.detach(), grad_norm


def _average_method_grads(methods: Methods) -> None:
    """DDP averages the student's gradients; the methods' own parameters (projections) are averaged here."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for p in methods.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def _from_rank0(value: float) -> float:
    """The value rank 0 holds, on every rank (validation runs on rank 0 only)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


# --- a training budget (distill.budget) -> the number of steps -------------------------------------

BUDGET_FILE = "budget.json"


def _budgeted_steps(cfg: DistillConfig, budget: TrainBudget | None, run_dir: Path, tokens_per_step: int,
                    rank: int = 0) -> tuple[DistillConfig, bool]:
    """(cfg with the steps the budget buys, whether a time budget still has to be measured).

    A budget already resolved for this run (RUN/budget.json, same budget and batch) is reused as it is, so a resumed
    run keeps the total its first attempt chose."""
    if budget is None:
        return cfg, False
    recorded = run_dir / BUDGET_FILE
    if recorded.is_file():
        r = json.loads(recorded.read_text())
        if r.get("budget") == budget.text and r.get("tokens_per_step") == tokens_per_step:
            log.info("distill.budget=%s: %d steps, as resolved when this run started (%s)", budget.text, r["steps"], recorded)
            return dataclasses.replace(cfg, steps=int(r["steps"])), False
    if budget.tokens is None:
        return cfg, True
    steps = budget.steps_for_tokens(tokens_per_step)
    _warn_inside_warmup(budget, steps, cfg)
    if rank == 0:
        _write_budget(run_dir, budget, steps, tokens_per_step, measured=None)
    log.info("distill.budget=%s: %d steps of %d tokens", budget.text, steps, tokens_per_step)
    return dataclasses.replace(cfg, steps=steps), False


def _warn_inside_warmup(budget: TrainBudget, steps: int, cfg: DistillConfig) -> None:
    if steps <= cfg.warmup_steps:
        log.warning("distill.budget=%s buys %d steps, no more than the %d warm-up steps: the learning rate never reaches "
                    "distill.lr=%g (raise the budget, or lower distill.warmup_steps)", budget.text, steps,
                    cfg.warmup_steps, cfg.lr)


def _write_budget(run_dir: Path, budget: TrainBudget, steps: int, tokens_per_step: int, measured: dict | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / BUDGET_FILE, json.dumps(
        {"budget": budget.text, "kind": "tokens" if budget.tokens is not None else "time",
         "budget_tokens": budget.tokens, "budget_seconds": budget.seconds, "steps": steps,
         "tokens_per_step": tokens_per_step, "train_tokens": steps * tokens_per_step, "measured": measured}, indent=1))


def _record_attempt(run_dir: Path, from_step: int, to_step: int, seconds: float) -> None:
    path = run_dir / BUDGET_FILE
    if path.is_file():
        record = json.loads(path.read_text())
        record.setdefault("attempts", []).append({"from_step": from_step, "to_step": to_step, "loop_s": seconds})
        write_text_atomic(path, json.dumps(record, indent=1))


def _resolve_time_budget(cfg: DistillConfig, budget: TrainBudget, run_dir: Path, tokens_per_step: int,
                         timed: list[dict], done: int, t_begin: float, eval_s: float | None, rank: int, student,
                         reference, val_blocks, save_checkpoint, vocab=None) -> DistillConfig:
    """Fix the total steps of a time budget from the probe steps (`timed`), one evaluation and one checkpoint, all
    measured here, and the time distillation has spent since `t_begin`; rank 0 decides, every rank gets its answer."""
    total, error = 0, None
    if rank == 0:
        seconds = [tokens_per_step / r["tokens_per_s"] for r in timed]
        step_s = float(np.median(seconds[1:] if len(seconds) > 1 else seconds))  # the first step carries one-off costs
        if eval_s is None:  # the start was not evaluated here (resumed, or distill.select=last): time one evaluation
            t = time.perf_counter()
            if val_blocks is not None and len(val_blocks):
                held_out_scores(student, reference, val_blocks, vocab=vocab)
            eval_s = time.perf_counter() - t
        t = time.perf_counter()
        save_checkpoint()  # keeps the probe steps, and says what a checkpoint costs
        ckpt_s = time.perf_counter() - t
        spent_s = time.perf_counter() - t_begin
        try:
            total = budget.steps_for_time(done, spent_s, step_s, eval_s, cfg.eval_every if val_blocks is not None else 0,
                                          ckpt_s, cfg.checkpoint_every, done + 1)
        except EdgestillError as e:
            error, total = e, -1
        measured = {"step_s": step_s, "eval_s": eval_s, "checkpoint_s": ckpt_s, "probe_steps": len(timed),
                    "spent_s_before_resolving": spent_s, "eval_every": cfg.eval_every,
                    "checkpoint_every": cfg.checkpoint_every}
        if error is None:
            _warn_inside_warmup(budget, total, cfg)
            _write_budget(run_dir, budget, total, tokens_per_step, measured)
            log.info("distill.budget=%s: %d steps = %d tokens (measured here: %.2f s per step, %.1f s per evaluation "
                     "every %d steps, %.1f s per checkpoint)", budget.text, total, total * tokens_per_step, step_s,
                     eval_s, cfg.eval_every, ckpt_s)
    total = int(_from_rank0(float(total)))
    if total < 0:
        raise error or EdgestillError(f"distill.budget={budget.text} is too small to train this student (rank 0 said why)")
    return dataclasses.replace(cfg, steps=total)


def distill(student, teacher, blocks: np.ndarray, cfg: DistillConfig, run_dir: str | Path,
            val_blocks: np.ndarray | None = None, show_progress: bool = True, layers: list[int] | None = None,
            reference: torch.nn.Module | None = None, vocab=None) -> list[dict]:
    """Train `student` towards `teacher` (a CachedTeacher, LiveTeacher or MultiTeacher) on `blocks` (N, T).

    `layers`: for a student sliced out of the teacher, the teacher blocks it kept (aligns hidden-state MSE).

    Checkpoints go to `run_dir/checkpoints`; an existing checkpoint there is resumed. Returns the
    per-step log (loss, kd, ce, lr, tokens/s and, every `eval_every` steps, val_loss; with several
    teachers `teacher_weights`, plotted to `run_dir/teacher_weights.png`).

    `reference`: the teacher model the student is judged against. With it and `val_blocks`, every evaluation
    (step 0 included) also scores held-out KL(teacher || student) and top-1 agreement, and `cfg.select`
    decides which evaluated state the student ends in: val_kl (fidelity first: training that moves the
    student away from the teacher is not kept), val_loss, or last. The choice is written to
    `run_dir/selection.json`.

    `vocab`: the student's VocabMap when its vocabulary is trimmed (models/vocab.py): `blocks` stay the teacher's ids,
    every token of them kept, and the student reads its own.
    """
    rank, world = dist_setup()
    if cfg.compile and world > 1:
        raise EdgestillError(f"distill.compile=true is for one process; this run has {world} torchrun processes: set "
                             "distill.compile=false, or run without torchrun")
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
    methods = Methods.from_config(cfg, student, teacher, layers)
    if vocab is not None and methods.on_policy is not None:
        raise EdgestillError("distill.on_policy_fraction needs the teacher to score the student's own samples, which "
                             "are in the student's trimmed vocabulary; set student.trim_vocab=false or "
                             "distill.on_policy_fraction=0")
    methods.vocab = vocab
    trainable = [p for p in student.parameters() if p.requires_grad] + methods.parameters()
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step, history = load_checkpoint(ckpt_root, student, optimizer, methods)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(log_path, "".join(json.dumps(h) + "\n" for h in history))  # drop steps after the checkpoint

    select = _selection_mode(cfg.select, reference, val_blocks)
    t_begin = time.perf_counter()  # what a time budget counts from
    eval_s = None
    if rank == 0 and select != "last" and _read_best(ckpt_root) is None:  # the student as cut is a candidate
        start = _scores(held_out_scores(student, reference, val_blocks, vocab=vocab))
        eval_s = time.perf_counter() - t_begin
        _save_best(ckpt_root, student, {"step": start_step, **start, "start": {"step": start_step, **start}})

    budget = TrainBudget.parse(cfg.budget)
    seq_len = blocks.shape[1]
    cfg, probing = _budgeted_steps(cfg, budget, run_dir, cfg.batch_size * seq_len, rank)
    model = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student)
    local = cfg.batch_size // world

    def one_step(step: int, last: bool) -> dict:
        t0 = time.perf_counter()
        rows = batch_rows(step, cfg.batch_size, len(blocks), cfg.seed)[rank * local : (rank + 1) * local]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        alpha = methods.alpha
        loss, kd, ce, grad_norm = train_step(model, optimizer, teacher, blocks, rows, cfg, trainable, methods, step, rank)

        loss_v, kd_v, ce_v = _mean_across_ranks([loss.item(), kd.item(), ce.item()])
        record = {"step": step + 1, "loss": loss_v, "kd": kd_v, "ce": ce_v, "lr": learning_rate(step, cfg),
                  "grad_norm": float(grad_norm), "tokens_per_s": cfg.batch_size * seq_len / (time.perf_counter() - t0)}
        if methods.pid is not None:  # KAKD: the next step's alpha, from the rank-averaged losses
            record["alpha"] = alpha
            methods.alpha = methods.pid.update(kd_v, ce_v)
        if methods.on_policy is not None:
            record["on_policy_fraction"] = methods.on_policy.fraction
        if methods.teachers is not None:  # mean weight per teacher over this step's tokens (all ranks)
            record["teacher_weights"] = _mean_across_ranks(methods.teacher_weights)
        evaluate = val_blocks is not None and len(val_blocks) and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0))
        if rank == 0 and evaluate:
            record.update(_scores(held_out_scores(student, reference if select != "last" else None, val_blocks,
                                                  vocab=vocab)))
            best = _read_best(ckpt_root)
            if best is not None and record[SELECT_ON[select]] < best[SELECT_ON[select]]:
                _save_best(ckpt_root, student, {"step": step + 1, **{k: record[k] for k in _SCORE_KEYS if k in record},
                                                "start": best["start"]})
        if methods.on_policy is not None and evaluate:  # DistiLLM: more on-policy data once validation stalls
            methods.on_policy.schedule.update(_from_rank0(record.get("val_loss", 0.0)))
        history.append(record)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
                save_checkpoint(ckpt_root, student, optimizer, step + 1, history, methods)
        bar.set_postfix(loss=f"{loss_v:.3f}", kd=f"{kd_v:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        return record

    first_step = start_step
    if probing:  # a time budget: time the first steps (inside the warm-up) and one evaluation, then fix the total
        n = probe_steps(cfg.warmup_steps)
        bar = progress_bar(total=None, initial=start_step, desc="distilling (timing steps for the budget)", unit="step",
                           disable=not show_progress)
        timed = [one_step(step, last=False) for step in range(start_step, start_step + n)]
        bar.close()
        start_step += n
        cfg = _resolve_time_budget(cfg, budget, run_dir, cfg.batch_size * seq_len, timed, start_step, t_begin, eval_s,
                                   rank, student, reference if select != "last" else None, val_blocks,
                                   lambda: save_checkpoint(ckpt_root, student, optimizer, start_step, history, methods),
                                   vocab)
    bar = progress_bar(total=cfg.steps, initial=start_step, desc="distilling", unit="step", disable=not show_progress)
    for step in range(start_step, cfg.steps):
        one_step(step, last=step + 1 == cfg.steps)
    if budget is not None and rank == 0:  # what the loop really took, next to what the budget allowed
        _record_attempt(run_dir, first_step, cfg.steps, time.perf_counter() - t_begin)
    bar.close()
    if rank == 0 and methods.teachers is not None:
        plot_teacher_weights(history, teacher.names, run_dir / "teacher_weights.png", methods.teachers.weighting)
    if dist.is_initialized():
        dist.barrier()
    if select != "last":
        _keep_best(ckpt_root, student, history, select, run_dir, rank)
    student.eval()
    return history


_SCORE_KEYS = ("val_loss", "kl_teacher_student", "top1_agreement")


def _scores(scores: dict) -> dict:
    return {k: scores[k] for k in _SCORE_KEYS if k in scores}


def _selection_mode(select: str, reference, val_blocks) -> str:
    """distill.select as it can be honoured: val_kl needs the teacher model, anything but last needs val blocks."""
    if val_blocks is None or not len(val_blocks):
        return "last"
    if select == "val_kl" and reference is None:
        return "val_loss"
    return select


def _keep_best(ckpt_root: Path, student, history: list[dict], select: str, run_dir: Path, rank: int) -> None:
    """End the run in the best evaluated state; record which one it is and what the last step scored."""
    from safetensors.torch import load_model

    best = _read_best(ckpt_root)
    last_step = history[-1]["step"] if history else 0
    if best is None:
        return
    if best["step"] != last_step:
        load_model(student, str(ckpt_root / "best" / "student.safetensors"))
    last = next((h for h in reversed(history) if SELECT_ON[select] in h), None)
    if rank == 0:
        record = {"select": select, "selected_on": SELECT_ON[select], "selected_step": best["step"],
                  "last_step": last_step, "selected": _scores(best), "start": best["start"],
                  "last": _scores(last) if last is not None else None}
        write_text_atomic(run_dir / "selection.json", json.dumps(record, indent=1) + "\n")
        key = SELECT_ON[select]
        if best["step"] != last_step and last is not None:
            log.info("kept the student of step %d of %d (distill.select=%s): held-out %s %.4f there, %.4f at the "
                     "last step", best["step"], last_step, select, key, best[key], last[key])
