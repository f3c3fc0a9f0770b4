"""Where the student's targets come from: one teacher or several, cached on disk or run live.

`teacher_source(...)` returns the object the trainer asks for teacher log-probs each step:

    one teacher,  distill.cache_teacher   -> CachedTeacher   (top-k log-probs memory-mapped from RUN/cache/teacher_topk)
    several (teacher.extra), cached       -> MultiTeacher    (their joint top-k cache, MTAKD weights per token)
    cache_teacher=false                   -> LiveTeacher / MultiTeacher running the models every step

A cache is fingerprinted by the teachers, the training tokens and k, so a cache built for something else is
rebuilt, never read. `copy_from` starts the cache from another run's (a sweep's points share teacher, text and
k); the copy is checked like any cache. Under DDP, rank 0 builds the cache and the other ranks wait for it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np

from edgestill.files import atomic_path

log = logging.getLogger("edgestill")


def fingerprint(*parts) -> str:
    """A short hash of `parts` (bytes, or anything str() describes)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()[:16]


def copy_cache(source_run: Path | None, cache_dir: Path) -> None:
    """Start `cache_dir` (RUN/cache/<name>) from `source_run`/cache/<name> when it has none (atomically)."""
    source = Path(source_run) / "cache" / cache_dir.name if source_run is not None else None
    if source is None or not source.is_dir() or cache_dir.exists():
        return
    with atomic_path(cache_dir, "copying a teacher cache", is_dir=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    log.info("teacher cache copied from %s (its fingerprint is checked before use)", source_run)


def _barrier(world: int) -> None:
    if world > 1:
        import torch

        torch.distributed.barrier()


def teacher_source(distill_cfg, teachers: list, names: list[str], train: np.ndarray, cache_root: Path,
                   copy_from: Path | None = None, batch_size: int = 8, rank: int = 0, world: int = 1):
    """The trainer's teacher source for `teachers` (LoadedModels: the first is the teacher, the rest teacher.extra).

    distill_cfg: config.DistillConfig (top_k, cache_teacher, and which terms need the live teacher model).
    cache_root: RUN/cache. batch_size: teacher forward batch while filling a cache.
    """
    from edgestill.distill.teacher_cache import (
        TopKCache,
        UnionTopKCache,
        build_topk_cache,
        build_union_topk_cache,
    )
    from edgestill.distill.trainer import CachedTeacher, LiveTeacher, MultiTeacher, needs_live_teacher

    k = distill_cfg.top_k
    teacher = teachers[0]
    # hidden-state / relation / on-policy terms need the teacher itself; a cache still serves the logits
    live_model = teacher.model if needs_live_teacher(distill_cfg) else None
    models = [t.model for t in teachers]
    if not distill_cfg.cache_teacher:
        return MultiTeacher(names, k, models=models) if len(teachers) > 1 else LiveTeacher(teacher.model, k)
    if len(teachers) > 1:
        fp = fingerprint(*(t.path for t in teachers), train.tobytes(), k, "union")
        cache_dir = Path(cache_root) / "teachers_union_topk"
        if rank == 0:
            copy_cache(copy_from, cache_dir)
            build_union_topk_cache(models, train, k, cache_dir, fp, batch_size=max(1, batch_size // len(models)))
        _barrier(world)
        return MultiTeacher(names, k, cache=UnionTopKCache(cache_dir), model=live_model)
    fp = fingerprint(teacher.path, train.tobytes(), k)
    cache_dir = Path(cache_root) / "teacher_topk"
    if rank == 0:
        copy_cache(copy_from, cache_dir)
        build_topk_cache(teacher.model, train, k, cache_dir, fp, batch_size=batch_size)
    _barrier(world)
    return CachedTeacher(TopKCache(cache_dir), model=live_model)
