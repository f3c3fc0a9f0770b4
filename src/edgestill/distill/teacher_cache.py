"""Teacher top-k logits, computed once and memory-mapped from disk.

Offline KD reads the teacher's k most likely tokens per position from `.npy` files instead of
running the teacher every step. The files are filled in order and `meta.json` records how many
rows are done, so a killed build resumes where it stopped. A fingerprint of teacher, data and k
guards against reading a cache built for something else.

Layout for N blocks of T tokens (positions 0..T-2 predict tokens 1..T-1):
  topk_logprobs.npy  float16 (N, T-1, k)   log p over the full vocabulary (exact up to fp16)
  topk_ids.npy       int32   (N, T-1, k)
Log-probabilities (not raw logits) are stored: they lie in [-inf, 0], where fp16 is precise for
the tokens that carry the mass, and the tail mass 1 - sum(p_topk) stays known.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from edgestill.progress import progress_bar


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@torch.no_grad()
def teacher_topk(teacher, input_ids: torch.Tensor, k: int):
    """(log-probs fp32, ids int64), each (B, T-1, k), for positions 0..T-2 of each sequence."""
    logits = teacher(input_ids=input_ids).logits[:, :-1].float()  # (B, T-1, V)
    values, ids = torch.topk(logits, k, dim=-1)  # (B, T-1, k)
    return values - torch.logsumexp(logits, dim=-1, keepdim=True), ids


class TopKCache:
    """Read-only view of a finished cache."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.logprobs = np.load(self.dir / "topk_logprobs.npy", mmap_mode="r")
        self.ids = np.load(self.dir / "topk_ids.npy", mmap_mode="r")

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    def get(self, rows: np.ndarray):
        rows = np.asarray(rows)
        return (
            torch.from_numpy(np.ascontiguousarray(self.logprobs[rows])),
            torch.from_numpy(np.ascontiguousarray(self.ids[rows])),
        )


def build_topk_cache(teacher, blocks: np.ndarray, k: int, directory: str | Path, fingerprint: str,
                     batch_size: int = 8, show_progress: bool = True) -> TopKCache:
    """Fill (or resume filling) the cache for `blocks` (N, T); returns the finished cache."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n, t = blocks.shape
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    shapes = {"topk_logprobs.npy": ((n, t - 1, k), np.float16), "topk_ids.npy": ((n, t - 1, k), np.int32)}
    if meta is None or meta.get("fingerprint") != fingerprint or not all((directory / f).is_file() for f in shapes):
        meta = {"fingerprint": fingerprint, "rows": n, "seq_len": t, "k": k, "rows_done": 0}
        for name, (shape, dtype) in shapes.items():
            np.lib.format.open_memmap(directory / name, mode="w+", dtype=dtype, shape=shape).flush()
        _write_json_atomic(meta_path, meta)
    done = meta["rows_done"]
    if done < n:
        arrays = {name: np.load(directory / name, mmap_mode="r+") for name in shapes}
        bar = progress_bar(total=n * (t - 1), initial=done * (t - 1), desc="teacher top-k logits", unit="tok",
                           disable=not show_progress)
        for start in range(done, n, batch_size):
            stop = min(start + batch_size, n)
            logprobs, ids = teacher_topk(teacher, torch.from_numpy(blocks[start:stop]).long(), k)
            arrays["topk_logprobs.npy"][start:stop] = logprobs.half().numpy()
            arrays["topk_ids.npy"][start:stop] = ids.int().numpy()
            for a in arrays.values():
                a.flush()
            meta["rows_done"] = stop
            _write_json_atomic(meta_path, meta)  # only after the rows are on disk
            bar.update((stop - start) * (t - 1))
        bar.close()
        del arrays
    return TopKCache(directory)
