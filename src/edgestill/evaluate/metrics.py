"""Teacher-vs-student quality on held-out blocks (definitions: docs/references.md#measurement-conventions).

- perplexity = exp(mean next-token NLL); retention = teacher ppl / student ppl
- top1_agreement = share of positions where both argmax tokens agree
- kl_teacher_student = mean per-token KL(teacher || student)
- a student with a trimmed vocabulary (`vocab`, models/vocab.VocabMap) reads the same text as its own tokens: a teacher
  token it lacks is spelled by kept pieces. Its NLL of a teacher token is the sum over the token's pieces (the chain
  rule: the same bytes), so perplexity stays per teacher token and equals the plain one when nothing is trimmed;
  KL and top-1 compare, at each teacher token boundary, the student with the teacher renormalised over the kept
  tokens, and `vocab_trim.teacher_trimmed_mass` says how much of the teacher's mass that set aside
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
def token_nll(model, blocks: np.ndarray, batch_size: int = 8, desc: str = "", vocab=None) -> np.ndarray:
    """Per-token next-token NLL (N, T-1) of one model; for a single-model perplexity. `vocab`: the model's
    VocabMap when its vocabulary is trimmed (per teacher token, module docstring)."""
    model.eval()
    out = []
    bar = progress_bar(total=len(blocks) * (blocks.shape[1] - 1), desc=desc or "evaluating", unit="tok")
    for start in range(0, len(blocks), batch_size):
        if vocab is not None:
            nll = trimmed_student_view(model, blocks[start : start + batch_size], vocab, boundaries=False)[0]
        else:
            ids = torch.from_numpy(blocks[start : start + batch_size]).long()
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").numpy()  # (B, T-1)
        out.append(nll)
        bar.update(nll.size)
    bar.close()
    return np.concatenate(out)


@torch.no_grad()
def trimmed_student_view(student, blocks: np.ndarray, vocab, boundaries: bool = True):
    """A trimmed-vocabulary student on teacher blocks (B, T): (its NLL of each teacher token 1..T-1 (B, T-1), summed over
    the token's pieces; its log-probs (B, T-1, K) at the boundary before each of those tokens, or None; the number of
    student tokens it read)."""
    expanded = [vocab.expand(block) for block in blocks]
    width = max(len(seq) for seq, _ in expanded)
    ids = torch.zeros((len(blocks), width), dtype=torch.long)  # right padding: a causal model's earlier positions ignore it
    for r, (seq, _) in enumerate(expanded):
        ids[r, : len(seq)] = torch.tensor(seq)
    logp = F.log_softmax(student(input_ids=ids).logits.float(), dim=-1)  # (B, L, K)
    n_teacher = blocks.shape[1]
    nll = np.zeros((len(blocks), n_teacher - 1))
    at = []
    for r, (seq, starts) in enumerate(expanded):
        n = len(seq)
        piece_nll = -logp[r, : n - 1].gather(-1, ids[r, 1:n, None]).squeeze(-1).numpy()  # piece p, predicted at p-1
        owner = np.searchsorted(starts, np.arange(1, n), side="right") - 1  # the teacher token piece p belongs to
        nll[r] = np.bincount(owner, weights=piece_nll, minlength=n_teacher)[1:]  # token 0 is context for both
        if boundaries:
            at.append(logp[r, torch.from_numpy(starts[1:] - 1)])
    return nll, (torch.stack(at) if boundaries else None), sum(len(seq) for seq, _ in expanded)


@torch.no_grad()
def compare_lm(teacher, student, blocks: np.ndarray, batch_size: int = 8, vocab=None) -> dict:
    """Run teacher and student on the same held-out blocks; per-token arrays and summary numbers.

    vocab: the student's VocabMap when its vocabulary is trimmed (module docstring); the summary then has `vocab_trim`.
    """
    teacher.eval()
    student.eval()
    t_nll, s_nll, agree, kl, trimmed_mass, student_tokens = [], [], [], [], [], 0
    bar = progress_bar(total=len(blocks) * (blocks.shape[1] - 1), desc="held-out eval (teacher+student)", unit="tok")
    for start in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(blocks[start : start + batch_size]).long()
        target = ids[:, 1:]
        t_logp = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        t_nll.append(-t_logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).numpy())
        if vocab is None:
            s_logp = F.log_softmax(student(input_ids=ids).logits[:, :-1].float(), dim=-1)
            s_nll.append(-s_logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).numpy())
        else:  # the teacher over the tokens the student has, against the student at the same boundaries
            nll, s_logp, n = trimmed_student_view(student, blocks[start : start + batch_size], vocab)
            t_logp, mass = vocab.kept_logprobs(t_logp)
            s_nll.append(nll)
            trimmed_mass.append(mass.numpy())
            student_tokens += n
        agree.append((t_logp.argmax(-1) == s_logp.argmax(-1)).numpy())
        kl.append((t_logp.exp() * (t_logp - s_logp)).sum(-1).numpy())
        bar.update(target.numel())
    bar.close()
    t_nll, s_nll = np.concatenate(t_nll), np.concatenate(s_nll)
    teacher_ppl = math.exp(float(t_nll.mean()))
    student_ppl = math.exp(float(s_nll.mean()))
    summary = {
        "eval_tokens": int(t_nll.size),
        "teacher_perplexity": teacher_ppl,
        "student_perplexity": student_ppl,
        "retention": teacher_ppl / student_ppl,
        "top1_agreement": float(np.concatenate(agree).mean()),
        "kl_teacher_student": float(np.concatenate(kl).mean()),
    }
    if vocab is not None:
        summary["vocab_trim"] = {"student_vocab": vocab.size, "teacher_vocab": vocab.old_size,
                                 "student_tokens_per_teacher_token": student_tokens / blocks.size,
                                 "teacher_trimmed_mass": float(np.concatenate(trimmed_mass).mean())}
    return {"summary": summary, "teacher_token_nll": t_nll, "student_token_nll": s_nll}


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
