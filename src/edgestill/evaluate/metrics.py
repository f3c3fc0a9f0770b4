"""Teacher-vs-student quality on held-out blocks (definitions: docs/references.md#measurement-conventions).

- perplexity = exp(mean next-token NLL); retention = teacher ppl / student ppl
- top1_agreement = share of positions where both argmax tokens agree
- kl_teacher_student = mean per-token KL(teacher || student)
- logit_parity: how closely a runtime's logits (llama.cpp, onnxruntime) match PyTorch's on the same tokens
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgestill.errors import EdgestillError
from edgestill.progress import progress_bar


@torch.no_grad()
def token_nll(model, blocks: np.ndarray, batch_size: int = 8, desc: str = "") -> np.ndarray:
    """Per-token next-token NLL (N, T-1) of one model; for a single-model perplexity."""
    model.eval()
    out = []
    bar = progress_bar(total=len(blocks) * (blocks.shape[1] - 1), desc=desc or "evaluating", unit="tok")
    for start in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(blocks[start : start + batch_size]).long()
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        out.append(nll.numpy())
        bar.update(nll.numel())
    bar.close()
    return np.concatenate(out)


@torch.no_grad()
def compare_lm(teacher, student, blocks: np.ndarray, batch_size: int = 8) -> dict:
    """Run teacher and student on the same held-out blocks; per-token arrays and summary numbers."""
    teacher.eval()
    student.eval()
    t_nll, s_nll, agree, kl = [], [], [], []
    bar = progress_bar(total=len(blocks) * (blocks.shape[1] - 1), desc="held-out eval (teacher+student)", unit="tok")
    for start in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(blocks[start : start + batch_size]).long()
        target = ids[:, 1:]
        t_logp = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        s_logp = F.log_softmax(student(input_ids=ids).logits[:, :-1].float(), dim=-1)
        t_nll.append(-t_logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).numpy())
        s_nll.append(-s_logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).numpy())
        agree.append((t_logp.argmax(-1) == s_logp.argmax(-1)).numpy())
        kl.append((t_logp.exp() * (t_logp - s_logp)).sum(-1).numpy())
        bar.update(target.numel())
    bar.close()
    t_nll, s_nll = np.concatenate(t_nll), np.concatenate(s_nll)
    teacher_ppl = math.exp(float(t_nll.mean()))
    student_ppl = math.exp(float(s_nll.mean()))
    return {
        "summary": {
            "eval_tokens": int(t_nll.size),
            "teacher_perplexity": teacher_ppl,
            "student_perplexity": student_ppl,
            "retention": teacher_ppl / student_ppl,
            "top1_agreement": float(np.concatenate(agree).mean()),
            "kl_teacher_student": float(np.concatenate(kl).mean()),
        },
        "teacher_token_nll": t_nll,
        "student_token_nll": s_nll,
    }


def weight_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (safetensors / gguf / onnx) in a model folder, or of one file."""
    path = Path(folder)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".onnx", ".bin"))


def logit_parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How closely two (T, V) logit arrays agree: top-1 agreement and absolute differences.

    `logit_scale` (the reference's mean per-position max |logit|) puts the differences in proportion.
    """
    reference = np.asarray(reference, dtype=np.float32)
    candidate = np.asarray(candidate, dtype=np.float32)
    if reference.shape != candidate.shape:
        raise EdgestillError(f"logit shapes differ: {reference.shape} vs {candidate.shape}")
    diff = np.abs(reference - candidate)  # (T, V)
    return {
        "positions": int(reference.shape[0]),
        "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).mean()),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_scale": float(np.abs(reference).max(-1).mean()),
    }


def deploy_bytes(path: str | Path) -> int:
    """Bytes a device loads: a file's size, or every file of a model folder (weights, config, tokenizer, templates).

    A GGUF already holds its tokenizer; a Hugging Face folder needs its tokenizer files beside the weights, so they
    count too (hidden files and sub-folders do not: they are not part of the model)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
