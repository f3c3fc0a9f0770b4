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

Several teachers (MTAKD, teacher.extra) get one joint cache (`build_union_topk_cache`): per position
the union of the K teachers' top-k ids, filled up to U = K*k ids with those of highest mean
log-prob, and every teacher's exact log-prob on those same U ids:
  union_logprobs.npy float16 (N, K, T-1, U)
  union_ids.npy      int32   (N, T-1, U)
Separate per-teacher caches would know teacher j's probability only on j's own top-k; comparing
and mixing teachers needs each one's mass on the ids the others rank high, so the teachers run
together once and are all scored on a common support (plus each one's exact tail bucket).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgestill.files import ensure_free_space, reserve, write_text_atomic, writing
from edgestill.progress import progress_bar


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


@torch.no_grad()
def teacher_topk(teacher, input_ids: torch.Tensor, k: int):
    """(log-probs fp32, ids int64), each (B, T-1, k), for positions 0..T-2 of each sequence."""
    logits = teacher(input_ids=input_ids).logits[:, :-1].float()  # (B, T-1, V)
    values, ids = torch.topk(logits, k, dim=-1)  # (B, T-1, k)
    return values - torch.logsumexp(logits, dim=-1, keepdim=True), ids


@torch.no_grad()
def teachers_union_topk(teachers, input_ids: torch.Tensor, k: int):
    """K teachers' log-probs on one common support: (log-probs fp32 (K, B, T-1, U), ids int64 (B, T-1, U)).

    The support at each position is the union of the teachers' top-k ids, filled up to U = min(K*k, V)
    distinct ids with those of highest mean log-prob, ordered by mean log-prob (union first).
    """
    logprobs = torch.stack([F.log_softmax(t(input_ids=input_ids).logits[:, :-1].float(), dim=-1)
                            for t in teachers])  # (K, B, T-1, V)
    n_teachers, vocab = logprobs.shape[0], logprobs.shape[-1]
    priority = logprobs.mean(0)  # (B, T-1, V)
    in_union = torch.zeros_like(priority, dtype=torch.bool)
    for lp in logprobs:
        in_union.scatter_(-1, lp.topk(k, dim=-1).indices, True)
    priority = priority + in_union.float() * 1e6  # every union id outranks every other id
    ids = priority.topk(min(n_teachers * k, vocab), dim=-1).indices  # (B, T-1, U)
    return logprobs.gather(-1, ids.expand(n_teachers, *ids.shape)), ids


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
    n, t = blocks.shape

    def compute(input_ids):
        logprobs, ids = teacher_topk(teacher, input_ids, k)
        return {"topk_logprobs.npy": logprobs.half().numpy(), "topk_ids.npy": ids.int().numpy()}

    shapes = {"topk_logprobs.npy": ((n, t - 1, k), np.float16), "topk_ids.npy": ((n, t - 1, k), np.int32)}
    _fill_cache(blocks, Path(directory), fingerprint, {"k": k}, shapes, compute, batch_size, show_progress)
    return TopKCache(directory)


class UnionTopKCache:
    """Read-only view of a finished multi-teacher cache: `get(rows)` -> (log-probs (K, b, T-1, U), ids (b, T-1, U))."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.logprobs = np.load(self.dir / "union_logprobs.npy", mmap_mode="r")
        self.ids = np.load(self.dir / "union_ids.npy", mmap_mode="r")

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    def get(self, rows: np.ndarray):
        rows = np.asarray(rows)
        logprobs = torch.from_numpy(np.ascontiguousarray(self.logprobs[rows]))  # (b, K, T-1, U)
        return logprobs.transpose(0, 1).contiguous(), torch.from_numpy(np.ascontiguousarray(self.ids[rows]))


def build_union_topk_cache(teachers, blocks: np.ndarray, k: int, directory: str | Path, fingerprint: str,
                           batch_size: int = 4, show_progress: bool = True) -> UnionTopKCache:
    """Fill (or resume filling) the joint cache of K teachers (see the module doc); returns the finished cache."""
    n, t = blocks.shape
    n_teachers = len(teachers)
    u = min(n_teachers * k, teachers[0].config.vocab_size)

    def compute(input_ids):
        logprobs, ids = teachers_union_topk(teachers, input_ids, k)  # (K, b, T-1, U), (b, T-1, U)
        return {"union_logprobs.npy": logprobs.transpose(0, 1).half().numpy(), "union_ids.npy": ids.int().numpy()}

    shapes = {"union_logprobs.npy": ((n, n_teachers, t - 1, u), np.float16), "union_ids.npy": ((n, t - 1, u), np.int32)}
    _fill_cache(blocks, Path(directory), fingerprint, {"k": k, "teachers": n_teachers}, shapes, compute, batch_size,
                show_progress)
    return UnionTopKCache(directory)


def _create_arrays(directory: Path, shapes: dict) -> None:
    """Create the .npy files of `shapes` with all their disk blocks allocated, or none of them.

    The arrays are filled through memory maps; a sparse file on a full disk would kill the process with
    SIGBUS at some later write, so the space is checked and reserved here, where it becomes one line.
    """
    action = "building the teacher's top-k cache"
    needed = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in shapes.values())
    existing = sum((directory / name).stat().st_size for name in shapes if (directory / name).is_file())
    ensure_free_space(directory, needed - existing, action)
    try:
        with writing(directory, action, needed):
            for name, (shape, dtype) in shapes.items():
                np.lib.format.open_memmap(directory / name, mode="w+", dtype=dtype, shape=shape).flush()
                reserve(directory / name, (directory / name).stat().st_size, action)
    except BaseException:
        for name in shapes:  # no half-made cache is left to take up the space
            (directory / name).unlink(missing_ok=True)
        raise


def _fill_cache(blocks: np.ndarray, directory: Path, fingerprint: str, extra_meta: dict, shapes: dict, compute,
                batch_size: int, show_progress: bool) -> None:
    """Create the arrays `shapes` (name -> (shape, dtype)) and fill them in order with `compute(input_ids)`,
    recording the rows done after each batch is on disk, so a killed build resumes where it stopped."""
    directory.mkdir(parents=True, exist_ok=True)
    n, t = blocks.shape
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta is None or meta.get("fingerprint") != fingerprint or not all((directory / f).is_file() for f in shapes):
        meta = {"fingerprint": fingerprint, "rows": n, "seq_len": t, **extra_meta, "rows_done": 0}
        _create_arrays(directory, shapes)
        _write_json_atomic(meta_path, meta)
    done = meta["rows_done"]
    if done < n:
        for name in shapes:  # a cache begun by an older edgestill may still be sparse
            reserve(directory / name, (directory / name).stat().st_size, "building the teacher's top-k cache")
        arrays = {name: np.load(directory / name, mmap_mode="r+") for name in shapes}
        bar = progress_bar(total=n * (t - 1), initial=done * (t - 1), desc="teacher top-k logits", unit="tok",
                           disable=not show_progress)
        for start in range(done, n, batch_size):
            stop = min(start + batch_size, n)
            for name, values in compute(torch.from_numpy(blocks[start:stop]).long()).items():
                arrays[name][start:stop] = values
            for a in arrays.values():
                a.flush()
            meta["rows_done"] = stop
            _write_json_atomic(meta_path, meta)  # only after the rows are on disk
            bar.update((stop - start) * (t - 1))
        bar.close()
        del arrays
