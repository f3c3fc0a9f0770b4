"""Classifier track: fine-tune an encoder teacher, cut a ≥50× smaller student out of it, distil.

Method [7] of docs/references.md (KD + low-rank factorization). Reconstructed [R] from standard methods:

1. `finetune(model, ...)`: cross-entropy fine-tuning of `*ForSequenceClassification` (CLS pooler + linear).
2. `build_student(teacher, tokenizer, train_texts, StudentConfig(...))`: keep `num_layers` teacher layers
   (evenly spaced, last kept), cut the position table to `max_len`, trim the vocabulary to the tokens of the
   training texts (optional), then factorize every matrix (FFN, attention, pooler, word/position embeddings)
   by truncated SVD with ranks chosen so the whole student stores ≤ teacher_params / compression_x params.
3. `distill_classifier(teacher, student, ...)`: train the student on
   `L = α·T²·KL(p_T ‖ q_T) + (1−α)·CE(y, q) + β·Σ_i MSE(H_s[i], H_t[g(i)])` (hidden-state term optional;
   g maps each student layer to the teacher layer it was cut from, widths are equal so no projection).
   α = 0 and β = 0 is the CE-only control the method is compared with. With `kd.augment` = k the transfer
   set also holds k perturbed copies of every training text (distill/augment.py, [tang2019]), seen by the
   KL term only; the teacher's logits on the whole transfer set are computed once, before training.

Every loop is a plain loop with a progress bar and early stopping on the validation split: every `eval_every`
steps the val macro-F1 (or val loss, `select_on`) is measured, the best state is kept and restored at the end, and the
loop stops after `patience` validations without improvement (0: never), at most `steps` steps. The val curve, the
step chosen and the step it stopped at are returned.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgestill.errors import EdgestillError
from edgestill.evaluate.classification import evaluate_classifier, validation_scores
from edgestill.files import atomic_path, write_text_atomic
from edgestill.models.encoder import batch_tensors, tokenize, trim_tokenizer, used_token_ids
from edgestill.models.lowrank import LowRankConfig, factorize_, stored_bytes, stored_params
from edgestill.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The fine-tuning / distillation loop of the classifier track."""

    steps: int = 300  # at most this many steps (the cap; the learning rate decays linearly over them)
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_len: int = 128
    eval_every: int = 100  # validation every N steps (and at the end); the best state is kept and restored
    eval_batch_size: int = 64
    seed: int = 0
    # early stopping: stop after `patience` validations in a row without improvement of `select_on` by more than
    # `min_delta` (0: run all `steps`); the best state is restored either way
    patience: int = 0
    select_on: str = "macro_f1"  # "macro_f1" (val macro-F1, higher is better) or "loss" (val cross-entropy, lower)
    min_delta: float = 0.0
    # > 0: validate and keep an exponential moving average of the weights with this decay (distill/ema.py), not the
    # weights of the last step; 0 = off
    ema: float = 0.0


@dataclass
class KDConfig:
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KL term; 0 = CE only
    hidden_weight: float = 0.0  # weight of the hidden-state MSE; needs a teacher forward every step
    # weight of RKD (distill/features.py: distances + 2 x angles) between the batch's mean-pooled last hidden states;
    # needs a teacher forward every step
    relation_weight: float = 0.0
    # perturbed copies of each training text added to the transfer set, labelled by the teacher's logits only
    # (distill/augment.py, [tang2019]); 0 = the labelled texts alone. Needs alpha > 0.
    augment: int = 0
    # unlabelled texts added to the transfer set, labelled by the teacher's logits only (data/unlabelled.py): a comma
    # list of .txt/.csv/.tsv/.jsonl files or built-in corpora; "" = none. Needs alpha > 0
    transfer: str = ""
    transfer_column: str = "text"  # the text column of a .csv/.tsv/.jsonl transfer file
    transfer_sentences: bool = False  # cut every transfer text into sentences (for a task on sentences)
    transfer_max: int = 0  # at most this many transfer texts, a seeded random choice; 0 = all
    # offline: the fine-tuned teacher is frozen. mutual: a copy of it keeps learning beside the student, from the labels
    # and from the student (adaptive mutual learning, distill/mutual.py, [10]); the frozen teacher stays the reference
    method: str = "offline"
    mutual_k: float = 5.0  # sharpness of the weights on the gap between the two cross-entropies (EMA)
    mutual_gamma: float = 0.5  # the teacher's KD weight cap (< 1: it learns less from the student than the reverse)
    mutual_ema: float = 0.9
    mutual_teacher_lr: float = 1e-5  # the teacher was fine-tuned already: a small step keeps it near its best state


@dataclass
class FinePruneConfig:
    """Fine-pruning ([fine-pruning] in docs/references.md), a backdoor defence applied to the distilled student:
    remove each layer's least active FFN units on clean text, then fine-tune on clean labelled data. The clean
    data is the validation split (never planted: docs/audit.md), which this step therefore trains on."""

    fraction: float = 0.0  # of each layer's FFN units removed; 0 = off
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 32


@dataclass
class StudentConfig:
    """The encoder student (build_student below): sliced, vocabulary-trimmed, low-rank factorized."""

    num_layers: int = 2
    max_len: int = 128  # position table is cut to this many rows
    trim_vocab: bool = True
    compression_x: float = 50.0  # student stores <= teacher params / compression_x (same dtype)
    target_params: int | None = None  # overrides compression_x
    strategy: str = "global"  # see edgestill.models.lowrank
    min_rank: int = 8
    multiple_of: int = 8
    factorize: tuple[str, ...] = ("re:.*",)
    layers: list[int] | None = None  # teacher layer indices; default evenly spaced
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- losses


def kd_logits_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), batch mean (Hinton et al., 2015)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, K)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, K)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hidden_mse(student_hidden, teacher_hidden, layer_map: list[tuple[int, int]], mask) -> torch.Tensor:
    """Mean over mapped layers of the MSE between hidden states at non-padding positions."""
    m = mask.unsqueeze(-1).float()  # (B, T, 1)
    total = 0.0
    for s_i, t_i in layer_map:
        diff = (student_hidden[s_i] - teacher_hidden[t_i]) * m  # (B, T, C)
        total = total + diff.pow(2).sum() / (m.sum() * diff.shape[-1]).clamp_min(1)
    return total / max(1, len(layer_map))


# ---------------------------------------------------------------- one training loop


def pooled_relation_loss(student_last, teacher_last, mask) -> torch.Tensor:
    """RKD ([rkd] in docs/references.md) between the batch's sentence embeddings: each model's last hidden state,
    mean-pooled over non-padding tokens. Distances + 2 x angles, as in distill/online.py."""
    from edgestill.distill.features import rkd_angle_loss, rkd_distance_loss

    m = mask.unsqueeze(-1).to(student_last.dtype)
    s = (student_last * m).sum(1) / m.sum(1).clamp_min(1)
    t = (teacher_last.float() * m).sum(1) / m.sum(1).clamp_min(1)
    loss = rkd_distance_loss(s, t)
    return loss + 2 * rkd_angle_loss(s, t) if len(s) >= 3 else loss


def _schedule(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.steps * cfg.warmup_fraction))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


SELECT_ON = ("macro_f1", "loss")
KD_METHODS = ("offline", "mutual")


def check_train_config(cfg: TrainConfig) -> None:
    """Refuse early-stopping settings that cannot work, before any run folder is made."""
    if cfg.select_on not in SELECT_ON:
        raise EdgestillError(f"train.select_on '{cfg.select_on}': choose {' or '.join(SELECT_ON)}")
    if cfg.patience < 0 or cfg.steps < 1 or cfg.eval_every < 0 or cfg.min_delta < 0:
        raise EdgestillError(f"train.patience ({cfg.patience}), train.eval_every ({cfg.eval_every}) and train.min_delta "
                             f"({cfg.min_delta}) must be >= 0 and train.steps ({cfg.steps}) >= 1")
    if cfg.patience and not cfg.eval_every:
        raise EdgestillError("train.patience needs validations to count: set train.eval_every > 0")
    if cfg.ema:
        from edgestill.distill.ema import check_decay

        check_decay(cfg.ema)


def check_kd_config(kd: KDConfig) -> None:
    """Refuse KD settings that cannot work, before any run folder is made."""
    if not 0.0 <= kd.alpha <= 1.0 or kd.temperature <= 0 or kd.hidden_weight < 0 or kd.relation_weight < 0:
        raise EdgestillError(f"kd.alpha={kd.alpha} must be in [0, 1], kd.temperature={kd.temperature} > 0, "
                             f"kd.hidden_weight={kd.hidden_weight} >= 0 and kd.relation_weight={kd.relation_weight} >= 0")
    if kd.augment < 0 or (kd.augment and kd.alpha <= 0):
        raise EdgestillError(f"kd.augment={kd.augment}: augmented texts carry only the teacher's soft labels, so they "
                             "need kd.alpha > 0 (and kd.augment >= 0); set kd.augment=0 for a CE-only student")
    if kd.transfer_max < 0 or (kd.transfer and kd.alpha <= 0):
        raise EdgestillError(f"kd.transfer='{kd.transfer}': transfer texts carry only the teacher's soft labels, so "
                             f"they need kd.alpha > 0 (and kd.transfer_max={kd.transfer_max} >= 0); set kd.transfer='' "
                             "for a CE-only student")
    if kd.transfer and kd.hidden_weight > 0:
        raise EdgestillError("kd.transfer texts are tokenized by the student's trimmed tokenizer, so their pieces do "
                             "not line up with the teacher's for the hidden-state term; set kd.hidden_weight=0 or "
                             "kd.transfer=''")
    if kd.method not in KD_METHODS:
        raise EdgestillError(f"kd.method '{kd.method}': choose {' or '.join(KD_METHODS)}")
    if kd.method == "mutual":
        if kd.alpha <= 0:
            raise EdgestillError("kd.method=mutual trains teacher and student on each other's predictions: it needs "
                                 "kd.alpha > 0 (kd.alpha=0 is the CE-only student, with no teacher)")
        if kd.augment or kd.transfer:
            raise EdgestillError("kd.method=mutual scores the transfer set with the teacher as it learns, and the "
                                 "perturbed copies (kd.augment) and unlabelled texts (kd.transfer) have no label for it "
                                 "to learn from; set kd.augment=0 and kd.transfer=''")
        if kd.mutual_teacher_lr <= 0:
            raise EdgestillError(f"kd.mutual_teacher_lr={kd.mutual_teacher_lr} must be > 0")
        from edgestill.distill.mutual import MutualConfig

        MutualConfig(k=kd.mutual_k, gamma=kd.mutual_gamma, ema=kd.mutual_ema)  # refuses bad knobs in one line


def improved(val: dict, best: dict | None, cfg: TrainConfig) -> bool:
    """True when `val` beats `best` on `cfg.select_on` by more than `cfg.min_delta` (the first validation always does)."""
    if best is None:
        return True
    if cfg.select_on == "loss":
        return val["loss"] < best["loss"] - cfg.min_delta
    return val["macro_f1"] > best["macro_f1"] + cfg.min_delta


# --- checkpoints: a killed fine-tune or distillation resumes at its last validation, on the same batches -----------

def _save_checkpoint(folder: Path, model, opt, sched, gen: torch.Generator, loop: dict, best, companion=None,
                     ema=None) -> None:
    """Everything the loop needs to go on as if never stopped, written completely before LATEST points at it.

    Weights are safetensors; the optimizer's, the schedule's and the generator's states are tensors and numbers,
    saved with torch.save and read back with weights_only=True (nothing else is unpickled)."""
    from safetensors.torch import save_model

    final = folder / f"ckpt-{loop['step']:06d}"
    needed = 4 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights, best, AdamW's two moments
    with atomic_path(final, "writing a checkpoint", needed_bytes=needed, is_dir=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "schedule": sched.state_dict(), "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state()}, tmp / "state.pt")  # torch's own RNG: the dropout masks
        if best is not None:
            from safetensors.torch import save_file

            save_file({k: v.clone().contiguous() for k, v in best[2].items()}, str(tmp / "best.safetensors"))
        (tmp / "loop.json").write_text(json.dumps({**loop, "best": None if best is None else [best[0], best[1]]}))
        if companion is not None:  # what else learns in the loop (kd.method=mutual: the teacher copy)
            companion.save(tmp)
        if ema is not None:  # train.ema: the weight average
            ema.save(tmp)
    write_text_atomic(folder / "LATEST", final.name, "writing a checkpoint")
    for old in folder.glob("ckpt-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(folder: Path, model, opt, sched, gen: torch.Generator, companion=None, ema=None):
    """(loop state, best) from the checkpoint LATEST names, loaded into model/opt/sched/gen; None when there is none."""
    from safetensors.torch import load_file, load_model

    latest = folder / "LATEST"
    if not latest.is_file():
        return None
    path = folder / latest.read_text().strip()
    load_model(model, str(path / "model.safetensors"))
    state = torch.load(path / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["schedule"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if companion is not None:
        companion.load(path)
    if ema is not None:
        ema.load(path)
    loop = json.loads((path / "loop.json").read_text())
    kept = loop.pop("best")  # [val scores, step] of the best state so far, or None
    best = None if kept is None else (kept[0], kept[1], load_file(str(path / "best.safetensors")))
    log.info("resuming training at step %d of %d (checkpoint %s)", loop["step"], loop["steps"], path)
    return loop, best


def train_classifier(model, train_enc: dict, train_labels: np.ndarray, val_enc: dict, val_labels: np.ndarray,
                     cfg: TrainConfig, loss_fn=None, desc: str = "fine-tuning", checkpoint_dir: Path | None = None,
                     companion=None) -> dict:
    """AdamW with warmup + linear decay over `cfg.steps` seeded shuffled batches, with early stopping on val.

    Every `cfg.eval_every` steps (and at the last step) the val split is scored (`validation_scores`); the state
    with the best `cfg.select_on` is kept and restored at the end; after `cfg.patience` validations in a row without
    improvement the loop stops early. `loss_fn(model, batch, labels, idx) -> (loss, parts)` defaults to
    cross-entropy. With `checkpoint_dir`, every validation also writes a checkpoint there, and a call that finds
    one resumes from it on the same batches (the result equals an uninterrupted run's); `companion` (save(folder),
    load(folder)) is what else learns inside loss_fn and goes into the same checkpoints. Returns the history, the
    val curve, the chosen step and the step the loop stopped at. With `cfg.ema`, the weight average is what every
    validation scores and what the best state keeps.
    """
    from edgestill.distill.ema import WeightEMA

    check_train_config(cfg)
    if len(train_labels) == 0:
        raise EdgestillError("the training split is empty; give more labelled rows")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg))
    loss_fn = loss_fn or (lambda m, batch, y, idx: (F.cross_entropy(m(**batch).logits, y), {}))
    ema = WeightEMA(model, cfg.ema) if cfg.ema else None
    history, best, stale, stopped_early = [], None, 0, False  # best = (val scores, step, state)
    order, pos = torch.randperm(len(train_labels), generator=gen).numpy(), 0
    start = 0
    resumed = _load_checkpoint(checkpoint_dir, model, opt, sched, gen, companion, ema) if checkpoint_dir is not None else None
    if resumed is not None:
        loop, best = resumed
        if loop["steps"] != cfg.steps or loop["n_train"] != len(train_labels) or loop.get("ema", 0.0) != cfg.ema:
            raise EdgestillError(f"the checkpoint in {checkpoint_dir} is of another training ({loop['steps']} steps on "
                                 f"{loop['n_train']} texts, train.ema={loop.get('ema', 0.0)}; not {cfg.steps} on "
                                 f"{len(train_labels)}, train.ema={cfg.ema}); remove the folder to start again")
        start, history, stale, pos = loop["step"], loop["history"], loop["stale"], loop["pos"]
        order = np.asarray(loop["order"], dtype=order.dtype)
    bar = progress_bar(total=cfg.steps, initial=start, desc=desc, unit="step")
    for step in range(start, cfg.steps):
        model.train()
        if pos + cfg.batch_size > len(order):  # a new epoch: reshuffle
            order, pos = torch.randperm(len(train_labels), generator=gen).numpy(), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        batch = {k: v.to(device) for k, v in batch_tensors(train_enc, idx).items()}
        y = torch.from_numpy(train_labels[idx]).to(device)
        loss, parts = loss_fn(model, batch, y, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
            with ema.applied(model) if ema is not None else nullcontext():
                val = validation_scores(model, val_enc, val_labels, cfg.eval_batch_size)
                scored = copy.deepcopy(model.state_dict()) if improved(val, best and best[0], cfg) else None
            history.append({"step": step + 1, "loss": float(loss.item()), **{k: float(v) for k, v in parts.items()},
                            **{f"val_{k}": v for k, v in val.items()}})
            if scored is not None:
                best, stale = (val, step + 1, scored), 0
            else:
                stale += 1
                if cfg.patience and stale >= cfg.patience:
                    stopped_early = True
                    break
            if checkpoint_dir is not None and step + 1 < cfg.steps:
                _save_checkpoint(checkpoint_dir, model, opt, sched, gen,
                                 {"step": step + 1, "steps": cfg.steps, "n_train": len(train_labels), "history": history,
                                  "stale": stale, "pos": pos, "order": order.tolist(), "ema": cfg.ema}, best, companion, ema)
    bar.close()
    model.load_state_dict(best[2])  # the best validation state, not the last one
    model.eval()
    last = history[-1]["step"]
    return {"history": history, "best_step": best[1], "best_val_macro_f1": best[0]["macro_f1"],
            "best_val_loss": best[0]["loss"], "select_on": cfg.select_on,
            "val_curve": [{"step": h["step"], "val_macro_f1": h["val_macro_f1"], "val_accuracy": h["val_accuracy"],
                           "val_loss": h["val_loss"]} for h in history],
            "stopped_at_step": last, "max_steps": cfg.steps, "stopped_early": stopped_early, "patience": cfg.patience,
            "stop_reason": _stop_reason(cfg, stopped_early)}


def _stop_reason(cfg: TrainConfig, stopped_early: bool) -> str:
    if stopped_early:
        return f"no better val {cfg.select_on} in {cfg.patience} validations (every {cfg.eval_every} steps)"
    if cfg.patience:
        return f"ran all {cfg.steps} steps (the cap) before the patience of {cfg.patience} validations ran out"
    return f"ran all {cfg.steps} steps (train.patience=0: no early stopping)"


def finetune(model, tokenizer, splits, cfg: TrainConfig, checkpoint_dir: Path | None = None) -> dict:
    """Cross-entropy fine-tuning on `splits.train`, model selection on `splits.val`. Returns history + test scores.
    checkpoint_dir: see train_classifier (a killed fine-tune resumes there)."""
    train = tokenize(tokenizer, splits.train.texts, cfg.max_len)
    val = tokenize(tokenizer, splits.val.texts, cfg.max_len)
    test = tokenize(tokenizer, splits.test.texts, cfg.max_len)
    out = train_classifier(model, train, splits.ids("train"), val, splits.ids("val"), cfg, desc="fine-tuning teacher",
                           checkpoint_dir=checkpoint_dir)
    out["test"] = evaluate_classifier(model, test, splits.ids("test"), cfg.eval_batch_size)
    out["config"] = asdict(cfg)
    return out


# ---------------------------------------------------------------- the student


def _encoder(model):
    base = getattr(model, model.base_model_prefix, None)
    if base is None or not hasattr(base, "encoder") or not hasattr(base.encoder, "layer"):
        raise EdgestillError(f"student building supports BERT-style encoders (model.{model.base_model_prefix}.encoder.layer); "
                             f"{type(model).__name__} is not one")
    return base


@torch.no_grad()
def build_student(teacher, tokenizer, train_texts: list[str], cfg: StudentConfig):
    """(student, student_tokenizer, old->new id table or None, info) — see the module docstring."""
    from edgestill.models.slice import choose_layers

    t_base = _encoder(teacher)
    n_teacher = len(t_base.encoder.layer)
    layers = cfg.layers or choose_layers(n_teacher, min(cfg.num_layers, n_teacher))
    if any(not 0 <= i < n_teacher for i in layers):
        raise EdgestillError(f"student layers {layers} are outside the teacher's 0..{n_teacher - 1}")
    if cfg.max_len > teacher.config.max_position_embeddings:
        raise EdgestillError(f"max_len {cfg.max_len} exceeds the teacher's {teacher.config.max_position_embeddings} positions")
    vocab = teacher.config.vocab_size
    keep = used_token_ids(tokenizer, train_texts, cfg.max_len) if cfg.trim_vocab else list(range(vocab))
    s_tok, table = trim_tokenizer(tokenizer, keep) if cfg.trim_vocab else (tokenizer, None)

    s_config = copy.deepcopy(teacher.config)
    s_config.num_hidden_layers = len(layers)
    s_config.vocab_size = len(keep)
    s_config.max_position_embeddings = cfg.max_len
    if table is not None and getattr(s_config, "pad_token_id", None) is not None:
        s_config.pad_token_id = int(table[s_config.pad_token_id])
    s_config.edgestill_student = {"teacher_layers": layers, "vocab_kept": len(keep), "teacher_vocab": vocab}
    for attr in ("edgestill_lowrank",):
        if hasattr(s_config, attr):
            delattr(s_config, attr)
    student = type(teacher)(s_config)
    s_base = _encoder(student)

    keep_t = torch.as_tensor(keep)
    t_emb, s_emb = t_base.embeddings, s_base.embeddings
    s_emb.word_embeddings.weight.copy_(t_emb.word_embeddings.weight[keep_t])
    s_emb.position_embeddings.weight.copy_(t_emb.position_embeddings.weight[: cfg.max_len])
    s_emb.token_type_embeddings.load_state_dict(t_emb.token_type_embeddings.state_dict())
    s_emb.LayerNorm.load_state_dict(t_emb.LayerNorm.state_dict())
    for s_i, t_i in enumerate(layers):
        s_base.encoder.layer[s_i].load_state_dict(t_base.encoder.layer[t_i].state_dict())
    if getattr(t_base, "pooler", None) is not None:
        s_base.pooler.load_state_dict(t_base.pooler.state_dict())
    student.classifier.load_state_dict(teacher.classifier.state_dict())

    teacher_params = stored_params(teacher)
    sliced_params = stored_params(student)
    target = cfg.target_params or int(teacher_params / cfg.compression_x)
    lr_cfg = LowRankConfig(target_params=target, strategy=cfg.strategy, min_rank=cfg.min_rank, multiple_of=cfg.multiple_of,
                           targets=cfg.factorize, skip=("re:(.*\\.)?classifier(\\..*)?",),
                           embeddings=("re:(.*\\.)?(word|position)_embeddings",))
    plan = factorize_(student, lr_cfg) if target < sliced_params else {"linear": {}, "embedding": {}}
    student.eval()
    info = {
        "teacher_layers": layers, "vocab_kept": len(keep), "teacher_vocab": vocab, "max_len": cfg.max_len,
        "teacher_params": teacher_params, "sliced_params": sliced_params, "target_params": target,
        "student_params": stored_params(student), "student_bytes": stored_bytes(student),
        "params_x_smaller": teacher_params / stored_params(student), "ranks": plan, "config": asdict(cfg),
    }
    return student, s_tok, table, info


# ---------------------------------------------------------------- distillation


class MutualTeacher:
    """kd.method=mutual: a copy of the fine-tuned teacher that learns beside the student (distill/mutual.py, [10] [R]).

    Each step it is trained on CE(labels) + λ_ST · T²·KL(p_S ‖ p_T), the student's prediction detached, with AdamW at
    kd.mutual_teacher_lr (no schedule), while the student's KD term is weighted by λ_TS; (λ_TS, λ_ST) adapt to the
    gap between the two models' EMA cross-entropies (the weaker the student, the more it listens; the teacher listens
    less, and only while the student does better). The frozen teacher it was copied from stays the reference every
    score is against. Its state (weights, optimizer, the EMAs) goes into the loop's checkpoints."""

    def __init__(self, teacher, kd: KDConfig, weight_decay: float):
        from edgestill.distill.mutual import MutualConfig, MutualWeights

        self.model = copy.deepcopy(teacher).train()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=kd.mutual_teacher_lr, weight_decay=weight_decay)
        self.weights = MutualWeights(MutualConfig(k=kd.mutual_k, gamma=kd.mutual_gamma, ema=kd.mutual_ema))
        self.temperature = kd.temperature

    def step(self, teacher_logits, student_logits, teacher_ce, student_ce) -> tuple[float, dict]:
        """One teacher update; returns (λ_TS for the student's KD term, what to log)."""
        lam_ts, lam_st = self.weights.update(student_ce.item(), teacher_ce.item())
        t_kd = kd_logits_loss(teacher_logits, student_logits.detach(), self.temperature)
        self.opt.zero_grad(set_to_none=True)
        (teacher_ce + lam_st * t_kd).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return lam_ts, {"teacher_ce": teacher_ce.item(), "teacher_kl": t_kd.item(), "lambda_ts": lam_ts,
                        "lambda_st": lam_st}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_model

        save_model(self.model, str(folder / "mutual_teacher.safetensors"))
        torch.save({"optimizer": self.opt.state_dict(), "weights": self.weights.state_dict()},
                   folder / "mutual_teacher_state.pt")

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_model

        load_model(self.model, str(folder / "mutual_teacher.safetensors"))
        state = torch.load(folder / "mutual_teacher_state.pt", weights_only=True)
        self.opt.load_state_dict(state["optimizer"])
        self.weights.load_state_dict(state["weights"])


def distill_classifier(teacher, student, teacher_tokenizer, splits, id_table: np.ndarray | None, student_tokenizer,
                       cfg: TrainConfig, kd: KDConfig, checkpoint_dir: Path | None = None,
                       transfer_texts: list[str] | None = None) -> dict:
    """Train `student` on `splits.train` with KD from `teacher` (α=0, β=0: CE only; the teacher is then unused).

    Training inputs are tokenized once with the teacher's tokenizer; the student sees the same pieces
    renumbered through `id_table` (identical to its trimmed tokenizer on training text). With `kd.augment`
    = k, the transfer set is the training texts plus k perturbed copies of each (distill/augment.py): the
    copies have no gold label, so only the KD term sees them. `transfer_texts` (kd.transfer, loaded by the caller:
    data/unlabelled.py) join the transfer set the same way; the student reads them through its own tokenizer, as a
    device would (their words need not be in its trimmed vocabulary). The teacher's logits on the whole transfer set
    are computed once, before the first step. Validation and test use the student's own tokenizer, as a
    device would. With kd.method=mutual the teacher's logits come live from a copy that learns too (MutualTeacher):
    the student's loss is (1−α)·CE + α·λ_TS·T²·KL, and the copy's val and test scores are returned ("teacher_mutual").
    """
    from edgestill.distill.augment import augment_texts
    from edgestill.evaluate.classification import predict_logits

    use_teacher = kd.alpha > 0 or kd.hidden_weight > 0 or kd.relation_weight > 0
    check_kd_config(kd)
    mutual = MutualTeacher(teacher, kd, cfg.weight_decay) if kd.method == "mutual" else None
    texts, y_train = list(splits.train.texts), splits.ids("train")
    if kd.augment:
        copies = augment_texts(texts, kd.augment, teacher_tokenizer.mask_token or teacher_tokenizer.unk_token, cfg.seed)
        log.info("transfer set: %d training texts + %d perturbed copies (kd.augment=%d)", len(texts), len(copies),
                 kd.augment)
        texts += copies
        y_train = np.concatenate([y_train, np.full(len(copies), -100, dtype=y_train.dtype)])  # -100: no gold label
    own = len(texts)  # texts whose pieces the trimmed vocabulary holds (the training texts and their copies)
    if transfer_texts:
        log.info("transfer set: + %d unlabelled texts (kd.transfer)", len(transfer_texts))
        texts += list(transfer_texts)
        y_train = np.concatenate([y_train, np.full(len(transfer_texts), -100, dtype=y_train.dtype)])
    train = tokenize(teacher_tokenizer, texts, cfg.max_len)
    s_train = dict(train, input_ids=id_table[train["input_ids"]]) if id_table is not None else train
    if id_table is not None and len(texts) > own:  # words outside the trimmed vocabulary: the student's own pieces
        extra = tokenize(student_tokenizer, texts[own:], cfg.max_len)
        s_train = {k: np.concatenate([v[:own], extra[k]]) for k, v in s_train.items()}
    val = tokenize(student_tokenizer, splits.val.texts, cfg.max_len)
    teacher_logits = None
    if use_teacher:
        teacher.eval()
    if kd.alpha > 0 and mutual is None:
        teacher_logits = torch.from_numpy(predict_logits(teacher, train, cfg.eval_batch_size, desc="teacher logits")).float()
    layer_map = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(student.config.edgestill_student["teacher_layers"])] \
        if hasattr(student.config, "edgestill_student") else []
    if kd.hidden_weight > 0 and not layer_map:
        raise EdgestillError("hidden-state KD needs a student made by build_student (its layer map is in the config)")

    live_teacher = kd.hidden_weight > 0 or kd.relation_weight > 0

    def loss_fn(model, batch, y, idx):
        out = model(**batch, output_hidden_states=live_teacher)
        gold = y >= 0
        ce = F.cross_entropy(out.logits[gold], y[gold]) if gold.any() else out.logits.sum() * 0.0
        parts, loss = {"ce": ce.item()}, (1 - kd.alpha) * ce
        if live_teacher or mutual is not None:
            t_batch = {k: v.to(y.device) for k, v in batch_tensors(train, idx).items()}  # the teacher's own pieces
        if mutual is not None:  # the teacher copy's forward with gradients: it learns from this batch too
            t_out = mutual.model(**t_batch, output_hidden_states=live_teacher)
            t_ce = F.cross_entropy(t_out.logits[gold], y[gold]) if gold.any() else t_out.logits.sum() * 0.0
            kl = kd_logits_loss(out.logits, t_out.logits.detach(), kd.temperature)
            lam_ts, logged = mutual.step(t_out.logits, out.logits, t_ce, ce)
            loss = loss + kd.alpha * lam_ts * kl
            parts.update(kl=kl.item(), **logged)
            t_hidden = [h.detach() for h in t_out.hidden_states] if live_teacher else None
        elif kd.alpha > 0:
            kl = kd_logits_loss(out.logits, teacher_logits[idx].to(out.logits.device), kd.temperature)
            loss = loss + kd.alpha * kl
            parts["kl"] = kl.item()
        if live_teacher and mutual is None:
            with torch.no_grad():
                t_hidden = teacher(**t_batch, output_hidden_states=True).hidden_states
        if kd.hidden_weight > 0:
            mse = hidden_mse(out.hidden_states, t_hidden, layer_map, batch["attention_mask"])
            loss = loss + kd.hidden_weight * mse
            parts["hidden_mse"] = mse.item()
        if kd.relation_weight > 0 and len(y) >= 2:
            rel = pooled_relation_loss(out.hidden_states[-1], t_hidden[-1], batch["attention_mask"])
            loss = loss + kd.relation_weight * rel
            parts["relation"] = rel.item()
        return loss, parts

    desc = ("mutual learning (student + teacher copy)" if mutual is not None
            else "distilling student" if use_teacher else "training student (CE only)")
    out = train_classifier(student, s_train, y_train, val, splits.ids("val"), cfg, loss_fn, desc=desc,
                           checkpoint_dir=checkpoint_dir, companion=mutual)
    test = tokenize(student_tokenizer, splits.test.texts, cfg.max_len)
    out["test"] = evaluate_classifier(student, test, splits.ids("test"), cfg.eval_batch_size)
    if mutual is not None:  # the copy as it ended (the student is restored to its best validation state)
        mutual.model.eval()
        t_val = tokenize(teacher_tokenizer, splits.val.texts, cfg.max_len)
        t_test = tokenize(teacher_tokenizer, splits.test.texts, cfg.max_len)
        out["teacher_mutual"] = {
            "val": evaluate_classifier(mutual.model, t_val, splits.ids("val"), cfg.eval_batch_size),
            "test": evaluate_classifier(mutual.model, t_test, splits.ids("test"), cfg.eval_batch_size),
            "lr": kd.mutual_teacher_lr, "weights_at_end": dict(zip(("lambda_ts", "lambda_st"), mutual.weights.weights()))}
    out["config"] = {"train": asdict(cfg), "kd": asdict(kd)}
    out["transfer_set"] = {"labelled": len(splits.train.texts), "augmented": own - len(splits.train.texts),
                           "unlabelled": len(texts) - own}
    return out


def check_fine_prune_config(cfg: FinePruneConfig) -> None:
    """Refuse fine-pruning settings that cannot work, before any run folder is made."""
    if not 0 <= cfg.fraction < 1:
        raise EdgestillError(f"fine_prune.fraction={cfg.fraction} must be in [0, 1) (the share of each layer's FFN "
                             "units removed; 0 = no fine-pruning)")
    if cfg.steps < 0 or cfg.lr <= 0 or cfg.batch_size < 1:
        raise EdgestillError(f"fine_prune.steps={cfg.steps} must be >= 0, fine_prune.lr={cfg.lr} > 0 and "
                             f"fine_prune.batch_size={cfg.batch_size} >= 1")


def fine_prune(model, tokenizer, splits, cfg: FinePruneConfig, max_len: int, seed: int = 0) -> dict:
    """Fine-pruning in place (FinePruneConfig): prune dormant FFN units on the clean validation texts, then
    fine-tune on them (cross-entropy, AdamW, `cfg.steps` seeded batches). Returns what changed."""
    from edgestill.models.encoder_prune import prune_dormant_

    check_fine_prune_config(cfg)
    enc = tokenize(tokenizer, splits.val.texts, max_len)
    labels = splits.ids("val")
    before = evaluate_classifier(model, enc, labels)
    record = prune_dormant_(model, enc, cfg.fraction)
    record["val_before"] = before
    record["val_after_prune"] = evaluate_classifier(model, enc, labels)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gen = np.random.default_rng(seed)
    y_all = torch.from_numpy(labels).long()
    model.train()
    for _ in range(cfg.steps):
        idx = gen.choice(len(labels), size=min(cfg.batch_size, len(labels)), replace=False)
        batch = {k: torch.from_numpy(v[idx]) for k, v in enc.items()}
        loss = F.cross_entropy(model(**batch).logits, y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    record["val_after_fine_tune"] = evaluate_classifier(model, enc, labels)
    record["steps"], record["lr"] = cfg.steps, cfg.lr
    return record


def agreement(teacher_logits: np.ndarray, student_logits: np.ndarray) -> float:
    """Share of examples where student and teacher predict the same label."""
    return float((teacher_logits.argmax(-1) == student_logits.argmax(-1)).mean())

