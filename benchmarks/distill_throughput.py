"""Distillation throughput: cached teacher top-k logits vs recomputing the teacher every step, and against the
machine's own matmul FLOP/s.

Same teacher (default SmolLM2-135M), same sliced student, same batches, same optimizer; the modes alternate in
rounds inside one process (docs/references.md#measurement-conventions):
  cached       the teacher's top-k logits read from the cache (what `edgestill shrink` does), fp32
  cached_bf16  the same step with distill.precision=bf16 (the student's forward under bf16 autocast; weights,
               optimizer and losses stay fp32), exactly what `edgestill shrink distill.precision=bf16` trains with
  live         the teacher recomputed every step, fp32
The one-off cost of building the cache is reported separately, with the number of epochs after which it pays off.
The bound: the machine's measured matmul FLOP/s (torch.mm 1024^3, fp32 and bf16; plan/hostbench.py) divided by the
matmul FLOPs of one training token (plan/cost.training_flops_per_token); `fraction_of_bound` is how close each mode
gets to it.

    python benchmarks/distill_throughput.py [--steps 3 --rounds 3 --batch-size 4 --seq-len 256]
-> benchmarks/results/distill_throughput.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time

import torch
from _common import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--num-layers", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=32)
    args = ap.parse_args()

    from edgestill.config import DistillConfig
    from edgestill.data.corpus import load_documents, split_documents, tokenize_blocks
    from edgestill.distill.teacher_cache import build_topk_cache
    from edgestill.distill.trainer import CachedTeacher, LiveTeacher, batch_rows, train_step
    from edgestill.models.load import load_causal_lm
    from edgestill.models.slice import choose_layers, slice_decoder
    from edgestill.plan.cost import StudentShape, training_flops_per_token
    from edgestill.plan.hostbench import measure_host

    torch.manual_seed(0)
    teacher = load_causal_lm(args.teacher)
    splits = split_documents(load_documents("shakespeare"), 0.1, 0.1, 0)
    n_blocks = args.batch_size * args.steps * args.rounds
    blocks = tokenize_blocks(splits.train, teacher.tokenizer, args.seq_len, n_blocks * args.seq_len)
    cfg = DistillConfig(batch_size=args.batch_size, top_k=args.top_k, lr=1e-4)
    base = slice_decoder(teacher.model, choose_layers(len(teacher.model.model.layers), args.num_layers), None)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = build_topk_cache(teacher.model, blocks, args.top_k, tmp, "bench", batch_size=args.batch_size)
        cache_build_s = time.perf_counter() - t0
        sources = {"cached": CachedTeacher(cache), "cached_bf16": CachedTeacher(cache),
                   "live": LiveTeacher(teacher.model, args.top_k)}
        configs = {name: dataclasses.replace(cfg, precision="bf16" if name == "cached_bf16" else "fp32") for name in sources}
        students = {name: copy.deepcopy(base) for name in sources}
        optimizers, trainables = {}, {}
        for name, st in students.items():
            st.get_input_embeddings().weight.requires_grad_(False)
            trainables[name] = [p for p in st.parameters() if p.requires_grad]
            optimizers[name] = torch.optim.AdamW(trainables[name], lr=cfg.lr)
        def step(name: str, rows) -> float:
            """One training step of mode `name`; returns its loss."""
            return float(train_step(students[name], optimizers[name], sources[name], blocks, rows, configs[name],
                                    trainables[name])[0])

        for name in sources:  # warm-up step for each mode (not timed)
            step(name, batch_rows(0, cfg.batch_size, len(blocks), 0))
        step_s = {name: [] for name in sources}
        losses = {name: [] for name in sources}
        for r in range(args.rounds):
            for name in sources:  # alternate modes every round
                for i in range(args.steps):
                    rows = batch_rows(r * args.steps + i, cfg.batch_size, len(blocks), 0)
                    t = time.perf_counter()
                    losses[name].append(step(name, rows))
                    step_s[name].append(time.perf_counter() - t)
    host = measure_host(threads=torch.get_num_threads())
    flops_per_token = training_flops_per_token(StudentShape.from_config(base.config), args.seq_len)
    tokens = args.batch_size * args.seq_len
    result = {}
    for name, times in step_s.items():
        tps = [tokens / t for t in times]
        rate = host["matmul_flops_per_s_bf16" if name == "cached_bf16" else "matmul_flops_per_s_f32"]
        result[name] = {"tokens_per_s": statistics.median(tps), "tokens_per_s_spread": [min(tps), max(tps)], "steps_timed": len(tps),
                        "matmul_flops_per_s": rate, "bound_tokens_per_s": rate / flops_per_token,
                        "fraction_of_bound": statistics.median(tps) * flops_per_token / rate,
                        "losses": losses[name]}
    ratio = result["cached"]["tokens_per_s"] / result["live"]["tokens_per_s"]
    cache_tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    # epochs E after which cache build + E cached epochs < E live epochs:
    per_epoch_saving_s = cache_tokens / result["live"]["tokens_per_s"] - cache_tokens / result["cached"]["tokens_per_s"]
    write_result("distill_throughput", {
        "what": "student training tokens/s with cached teacher top-k logits vs teacher recomputed every step",
        "teacher": args.teacher, "student_layers": args.num_layers, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "top_k": args.top_k, "torch_threads": torch.get_num_threads(),
        "cached": result["cached"], "cached_bf16": result["cached_bf16"], "live": result["live"],
        "speedup_cached_over_live": ratio,
        "speedup_bf16_over_fp32": result["cached_bf16"]["tokens_per_s"] / result["cached"]["tokens_per_s"],
        "training_flops_per_token": flops_per_token,
        "bound_note": "bound = measured torch.mm FLOP/s (fp32 or bf16) / matmul FLOPs of one training token; the live "
                      "teacher's forward pass is not counted, so its fraction is of the student's bound",
        "cache_build_s": cache_build_s, "cache_build_tokens_per_s": cache_tokens / cache_build_s,
        "cache_pays_off_after_epochs": (cache_build_s / per_epoch_saving_s) if per_epoch_saving_s > 0 else None,
    })
    print(f"cached {result['cached']['tokens_per_s']:.0f} tok/s vs live {result['live']['tokens_per_s']:.0f} tok/s: {ratio:.2f}x; "
          f"bf16 autocast {result['cached_bf16']['tokens_per_s']:.0f} tok/s; fp32 bound {result['cached']['bound_tokens_per_s']:.0f}, "
          f"bf16 bound {result['cached_bf16']['bound_tokens_per_s']:.0f} tok/s")


if __name__ == "__main__":
    main()
