"""Run `edgestill.distill.trainer.distill` on the tiny model, under torchrun or as one plain process.

    python ddp_worker.py MODEL_DIR OUT_DIR MODE [MODE ...]        # MODE: cached | live
    torchrun --nproc_per_node 2 --standalone ddp_worker.py MODEL_DIR OUT_DIR MODE ...

For each MODE, every rank writes OUT_DIR/MODE/rank{r}.safetensors (its final student) and rank 0
writes OUT_DIR/MODE/history.json (the per-step log). The data, student and teacher are the same
for any number of processes, so a 2-rank run must reproduce a 1-process run with the same global
batch. Used by test_ddp.py; not a test itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STEPS = 3
GLOBAL_BATCH = 4
LAYERS = [0, 3]


def run(mode: str, model_dir: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from edgestill.config import DistillConfig
    from edgestill.distill.teacher_cache import TopKCache, build_topk_cache
    from edgestill.distill.trainer import CachedTeacher, LiveTeacher, dist_setup, distill
    from edgestill.models.slice import slice_decoder

    rank, world = dist_setup()
    out.mkdir(parents=True, exist_ok=True)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    student = slice_decoder(teacher, LAYERS)
    rng = np.random.default_rng(1234)
    blocks = rng.integers(3, teacher.config.vocab_size, size=(12, 24), dtype=np.int64).astype(np.int32)
    val_blocks = rng.integers(3, teacher.config.vocab_size, size=(4, 24), dtype=np.int64).astype(np.int32)
    cfg = DistillConfig(steps=STEPS, batch_size=GLOBAL_BATCH, lr=1e-3, warmup_steps=1, top_k=8, alpha=0.7,
                        checkpoint_every=0, eval_every=0, seed=0, select="last")  # the trained state itself

    if mode == "cached":
        cache_dir = out / "cache"
        if rank == 0:
            build_topk_cache(teacher, blocks, cfg.top_k, cache_dir, "ddp-test", batch_size=8, show_progress=False)
        if world > 1:
            dist.barrier()
        source = CachedTeacher(TopKCache(cache_dir))
    elif mode == "live":
        source = LiveTeacher(teacher, cfg.top_k)
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    history = distill(student, source, blocks, cfg, out / "run", val_blocks=val_blocks, show_progress=False)
    state = {k: v.detach().clone().contiguous() for k, v in student.state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    if rank == 0:
        (out / "history.json").write_text(json.dumps({"world": world, "history": history}))
    if world > 1:
        dist.barrier()


def main() -> None:
    model_dir, out, modes = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # CPU collectives, even on a machine with a GPU
    try:
        for mode in modes:
            run(mode, model_dir, out / mode)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
