"""Teacher correction: fine-tune the teacher briefly on the distillation data before compressing it.

A student distilled from a teacher that never saw the domain "retains" more than 100% of it: it learns the
domain, and retention measures that rather than kept knowledge. The Minitron recipe ("LLM Pruning and
Distillation in Practice", docs/references.md) corrects the teacher on the distillation data first; the student is
then sliced from, distilled from and measured against the corrected teacher (the reference).

    correct_teacher(teacher, train, val, CorrectConfig())  ->  LoadedModel of the corrected teacher

The loop is plain next-token cross-entropy with AdamW (warm-up, cosine decay), validation every `eval_every`
steps, and early stopping: the best validation loss is kept, and training stops after `patience` evaluations
without improvement. The result is cached (full precision, safetensors) under ~/.cache/edgestill/corrected/ by a
fingerprint of the teacher, the tokens and the settings, so a sweep's points and later runs share it; a killed
correction resumes from its last evaluation.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgestill.errors import EdgestillError
from edgestill.files import atomic_path, write_text_atomic
from edgestill.progress import progress_bar

log = logging.getLogger("edgestill")

DONE = "correction.json"  # written last: a folder with it holds a finished corrected teacher


@dataclass
class CorrectConfig:
    steps: int = 50  # at most; one pass over the default 51,200 training tokens at batch 4 x 256
    batch_size: int = 4
    lr: float = 5e-5
    warmup_steps: int = 5
    eval_every: int = 10
    patience: int = 2  # evaluations without a better validation loss before stopping
    seed: int = 0
    freeze_embeddings: bool = True  # as the students are trained (tied embeddings stay the teacher's)
    # which state is the corrected teacher: val_loss = the lowest validation loss (step 0, the teacher itself,
    # included); last = the final step (an audit planting a trigger wants every step of it, whatever the clean loss)
    select: str = "val_loss"

    def __post_init__(self):
        if self.select not in ("val_loss", "last"):
            raise EdgestillError(f"teacher.correct_select='{self.select}' is unknown; use val_loss (the best "
                                 "validation loss, the default) or last (the final step)")
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1 or self.patience < 1:
            raise EdgestillError("teacher.correct_steps, correct_batch_size, correct_eval_every and correct_patience "
                                 "must be positive (or set teacher.correct=false to skip the correction)")
        if not self.lr > 0:
            raise EdgestillError(f"teacher.correct_lr={self.lr} must be > 0 (5e-5 is typical)")


def corrected_folder(teacher_path: str, train: np.ndarray, val: np.ndarray, cfg: CorrectConfig,
                     root: Path | None = None) -> Path:
    """Where the corrected teacher of these inputs lives (a fingerprint of teacher, tokens and settings)."""
    from edgestill.distill.sources import fingerprint

    fp = fingerprint(Path(teacher_path).resolve(), train.tobytes(), val.tobytes(), sorted(dataclasses.asdict(cfg).items()))
    return Path(root or corrected_root()) / f"{Path(teacher_path).name}-{fp}"


def corrected_root() -> Path:
    """$EDGESTILL_CORRECTED_CACHE, else ~/.cache/edgestill/corrected (under $EDGESTILL_CACHE when set)."""
    from edgestill.models.load import cache_dir

    return Path(os.environ.get("EDGESTILL_CORRECTED_CACHE") or cache_dir() / "corrected")


def correct_teacher(teacher, train: np.ndarray, val: np.ndarray, cfg: CorrectConfig, root: Path | None = None,
                    show_progress: bool = True, note: dict | None = None):
    """The corrected teacher (a LoadedModel whose path is its cached folder); `teacher` itself is left unchanged.

    teacher: LoadedModel. train, val: token blocks (N, T) of the distillation data's train and validation splits.
    note: what else its record (correction.json) should say about `train`, e.g. {"poison": ...} for an audit.
    """
    from edgestill.models.load import LoadedModel, load_causal_lm

    if len(val) == 0:
        raise EdgestillError("the teacher correction needs validation text for early stopping: raise "
                             "data.max_val_tokens or data.val_fraction, or set teacher.correct=false")
    if len(train) < cfg.batch_size:
        raise EdgestillError(f"the train split has {len(train)} blocks, fewer than one correction batch of "
                             f"{cfg.batch_size}: add text, lower teacher.correct_batch_size, or set teacher.correct=false")
    folder = corrected_folder(teacher.path, train, val, cfg, root)
    if not (folder / DONE).is_file():
        _train_and_save(teacher, train, val, cfg, folder, show_progress, note or {})
    else:
        log.info("corrected teacher: cached in %s", folder)
    loaded = load_causal_lm(str(folder))
    return LoadedModel(model=loaded.model, tokenizer=teacher.tokenizer, source=f"{teacher.source} (corrected)",
                       path=str(folder))


def correction_record(folder: str | Path) -> dict | None:
    """What the correction recorded (steps run, best step, validation losses), or None for an uncorrected teacher."""
    path = Path(folder) / DONE
    return json.loads(path.read_text()) if path.is_file() else None


def _train_and_save(teacher, train: np.ndarray, val: np.ndarray, cfg: CorrectConfig, folder: Path,
                    show_progress: bool, note: dict) -> None:
    import torch

    from edgestill.distill.trainer import batch_rows, learning_rate, validation_loss  # the students' schedule

    work = folder.with_name(folder.name + ".partial")  # checkpoints; removed once the folder is finished
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(teacher.model)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    state = _resume(work, model, optimizer)
    if state is None:
        t0 = time.perf_counter()
        before = validation_loss(model, val)
        state = {"step": 0, "history": [], "val_loss_before": before, "best_val_loss": before, "best_step": 0,
                 "bad_evals": 0, "seconds": time.perf_counter() - t0}
        _save_best(work, model)  # step 0 (the teacher itself) is a candidate: correction never makes it worse on val
        log.info("correcting the teacher on the training split: up to %d steps, val loss before %.3f", cfg.steps, before)
    else:
        log.info("correcting the teacher: resuming at step %d (%s)", state["step"], work)

    bar = progress_bar(total=cfg.steps, initial=state["step"], desc="correcting the teacher", unit="step",
                       disable=not show_progress)
    while state["step"] < cfg.steps and state["bad_evals"] < cfg.patience:
        step = state["step"]
        t0 = time.perf_counter()
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        ids = torch.from_numpy(train[batch_rows(step, cfg.batch_size, len(train), cfg.seed)]).long()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        record = {"step": step + 1, "loss": loss.item(), "lr": learning_rate(step, cfg)}
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
            record["val_loss"] = validation_loss(model, val)
            if record["val_loss"] < state["best_val_loss"]:
                state.update(best_val_loss=record["val_loss"], best_step=state["step"], bad_evals=0)
                _save_best(work, model)
            else:
                state["bad_evals"] += 1
        state["history"].append(record)
        state["seconds"] += time.perf_counter() - t0
        if "val_loss" in record:
            _checkpoint(work, model, optimizer, state)
        bar.set_postfix(loss=f"{record['loss']:.3f}", best_val=f"{state['best_val_loss']:.3f}")
        bar.update(1)
    bar.close()
    stopped = "early stopping" if state["bad_evals"] >= cfg.patience else "step budget"
    log.info("teacher corrected: best val loss %.3f at step %d of %d (%s; before %.3f); keeping %s", state["best_val_loss"],
             state["best_step"], state["step"], stopped, state["val_loss_before"],
             "that step" if cfg.select == "val_loss" else "the last step")

    from safetensors.torch import load_model

    if cfg.select == "val_loss":
        load_model(model, str(work / "best.safetensors"))
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    with atomic_path(folder, "saving the corrected teacher", needed_bytes=nbytes, is_dir=True) as tmp:
        model.save_pretrained(tmp)  # full precision: the reference the students are measured against
        teacher.tokenizer.save_pretrained(tmp)
        record = {"teacher": teacher.source, "teacher_path": str(teacher.path), "settings": dataclasses.asdict(cfg),
                  "train_tokens": int(train.size), "val_tokens": int(val.size), "steps_run": state["step"],
                  "best_step": state["best_step"],
                  "kept_step": state["best_step"] if cfg.select == "val_loss" else state["step"], "stopped_by": stopped, "val_loss_before": state["val_loss_before"],
                  "val_loss_best": state["best_val_loss"], "seconds": state["seconds"], **note,
                  "history": state["history"]}
        write_text_atomic(tmp / DONE, json.dumps(record, indent=1), "saving the corrected teacher")
    shutil.rmtree(work, ignore_errors=True)


def _save_best(work: Path, model) -> None:
    from safetensors.torch import save_model

    with atomic_path(work / "best.safetensors", "saving the corrected teacher's best weights") as tmp:
        save_model(model, str(tmp))


def _checkpoint(work: Path, model, optimizer, state: dict) -> None:
    """Weights, optimizer moments and loop state of the last evaluation (the resume point), atomically."""
    import torch
    from safetensors.torch import save_model

    with atomic_path(work / "last", "writing a teacher-correction checkpoint", is_dir=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state))


def _resume(work: Path, model, optimizer) -> dict | None:
    import torch
    from safetensors.torch import load_model

    last = work / "last"
    if not (last / "state.json").is_file() or not (work / "best.safetensors").is_file():
        return None
    load_model(model, str(last / "model.safetensors"))
    # weights_only: the optimizer state is tensors and numbers; nothing else is unpickled
    optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True))
    return json.loads((last / "state.json").read_text())
