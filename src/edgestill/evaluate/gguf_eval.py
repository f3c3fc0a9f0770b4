"""Quality of a GGUF as llama.cpp runs it, against the fp32 teacher in transformers.

The teacher's log-probabilities on the held-out blocks are computed once (`teacher_logprobs`) and
every GGUF is scored against them (`gguf_quality`): perplexity from llama.cpp's own logits, top-1
agreement and mean token KL(teacher ‖ model). Each block starts from an empty KV cache, as in
`evaluate.metrics.compare_lm`, so the numbers are comparable with a run's metrics.json.

    ref = reference_logprobs(reference.model, test_blocks)      # once per reference and text
    gguf_fidelity("x.gguf", ref, ood_ref)                        # retention, top-1, KL; in and out of domain
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgestill.progress import progress_bar


def teacher_logprobs(teacher_model, blocks: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """log_softmax of the teacher's logits at positions 0..T-2 of each block: (N, T-1, V) float16."""
    import torch

    out = np.empty((len(blocks), blocks.shape[1] - 1, teacher_model.config.vocab_size), dtype=np.float16)
    bar = progress_bar(total=len(blocks), desc="teacher log-probs", unit="block")
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            ids = torch.from_numpy(blocks[i : i + batch_size]).long()
            out[i : i + batch_size] = torch.log_softmax(teacher_model(input_ids=ids).logits[:, :-1].float(), -1).numpy()
            bar.update(len(ids))
    bar.close()
    return out


def teacher_perplexity(t_logp: np.ndarray, blocks: np.ndarray) -> float:
    nll = -np.take_along_axis(t_logp, blocks[:, 1:, None].astype(np.int64), -1).astype(np.float64)
    return math.exp(float(nll.mean()))


def gguf_quality(gguf: str | Path, blocks: np.ndarray, t_logp: np.ndarray, threads: int = 2) -> dict:
    """Perplexity, top-1 agreement and KL(teacher ‖ model) of llama.cpp running `gguf` on `blocks` (N, T)."""
    import torch

    from edgestill.runtime.llamacpp import LlamaCpp

    nll, agree, kl = [], [], []
    bar = progress_bar(total=len(blocks), desc=f"llama.cpp {Path(gguf).name}", unit="block")
    with LlamaCpp(gguf, n_ctx=blocks.shape[1], n_threads=threads) as model, torch.no_grad():
        for i, block in enumerate(blocks):
            logp = torch.log_softmax(torch.from_numpy(model.logits(block)[:-1]).double(), -1)  # (T-1, V)
            target = torch.from_numpy(block[1:].astype(np.int64))
            nll.append(-logp.gather(-1, target[:, None])[:, 0].numpy())
            tl = torch.from_numpy(t_logp[i]).double()
            agree.append((tl.argmax(-1) == logp.argmax(-1)).numpy())
            kl.append((tl.exp() * (tl - logp)).sum(-1).numpy())
            bar.update(1)
    bar.close()
    return {"perplexity": math.exp(float(np.concatenate(nll).mean())),
            "top1_agreement": float(np.concatenate(agree).mean()),
            "kl_teacher_model": float(np.concatenate(kl).mean())}


@dataclass
class ReferenceLogprobs:
    """Held-out blocks and the reference's log-probabilities on them: what every GGUF is scored against."""

    blocks: np.ndarray  # (N, T) token ids
    logprobs: np.ndarray  # (N, T-1, V) float16, teacher_logprobs()

    @property
    def perplexity(self) -> float:
        return teacher_perplexity(self.logprobs, self.blocks)


def reference_logprobs(reference_model, blocks: np.ndarray, batch_size: int = 8) -> ReferenceLogprobs:
    return ReferenceLogprobs(blocks, teacher_logprobs(reference_model, blocks, batch_size))


def gguf_fidelity(gguf: str | Path, in_domain: ReferenceLogprobs, out_of_domain: ReferenceLogprobs | None = None,
                  threads: int = 2) -> dict:
    """A GGUF as llama.cpp runs it, against the reference, in the names of a run's metrics.json.

    {"perplexity", "retention" (reference ppl ÷ GGUF ppl), "top1_agreement", "kl_teacher_student" (mean token
    KL(reference ‖ GGUF), nats), "out_of_domain": the same four on `out_of_domain`'s blocks, or None when not given}.
    """

    def scored(ref: ReferenceLogprobs) -> dict:
        q = gguf_quality(gguf, ref.blocks, ref.logprobs, threads)
        return {"perplexity": q["perplexity"], "retention": ref.perplexity / q["perplexity"],
                "top1_agreement": q["top1_agreement"], "kl_teacher_student": q["kl_teacher_model"]}

    return {**scored(in_domain), "out_of_domain": None if out_of_domain is None else scored(out_of_domain)}
