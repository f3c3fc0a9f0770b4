"""Distillation throughput: cached teacher top-k logits vs recomputing the teacher every step, and against the
machine's own matmul FLOP/s.

Same teacher (default SmolLM2-135M), same sliced student, same batches, same optimizer; the modes alternate in
rounds inside one process (docs/references.md#measurement-conventions):
  cached       the teacher's top-k logits read from the cache (what `edgestill shrink` does), fp32
  cached_bf16  the same step with distill.precision=bf16 (the student's forward under bf16 autocast; weights,
               optimizer and losses stay fp32), exactly what `edgestill shrink distill.precision=bf16` trains with
  live         the teacher recomputed every step, fp32
  cached_compile, cached_bf16_compile
               the cached modes with distill.compile=true: the student's training forward under torch.compile
               (inductor); its first step compiles, and `first_step_s` against the eager mode's says what that costs
               and `compile_pays_off_after_steps` after how many steps it is won back. Compiled cold: inductor's
               on-disk cache is a fresh folder, so an earlier compile on this machine cannot shorten it
The one-off cost of building the cache is reported separately, with the number of epochs after which it pays off.
The bound: the machine's measured matmul FLOP/s (torch.mm 1024^3, fp32 and bf16; plan/hostbench.py) divided by the
matmul FLOPs of one training token (plan/cost.training_flops_per_token); `fraction_of_bound` is how close each mode
gets to it.

    python benchmarks/distill_throughput.py [--steps 3 --rounds 3 --batch-size 4 --seq-len 256 --modes cached,live]
-> benchmarks/results/distill_throughput.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
import statistics
import tempfile
import time

import torch
from _common import write_result

MODES = ("cached", "cached_bf16", "live", "cached_compile", "cached_bf16_compile")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--num-layers", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes) or "cached" not in modes:
        ap.error(f"--modes must name modes of {', '.join(MODES)}, cached among them (the others are compared to it)")
    compile_cache = tempfile.mkdtemp(prefix="edgestill-inductor-")  # a cold compile, what a first run pays
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache
    try:
        measure(args, modes)
    finally:
        shutil.rmtree(compile_cache, ignore_errors=True)


def measure(args, modes: list[str]) -> None:
    from edgestill.config import DistillConfig
    from edgestill.data.corpus import load_documents, split_documents, tokenize_blocks
    from edgestill.distill.teacher_cache import build_topk_cache
    from edgestill.distill.trainer import CachedTeacher, LiveTeacher, Methods, batch_rows, train_step
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
        sources = {name: LiveTeacher(teacher.model, args.top_k) if name == "live" else CachedTeacher(cache)
                   for name in modes}
        configs = {name: dataclasses.replace(cfg, precision="bf16" if "bf16" in name else "fp32",
                                             compile=name.endswith("_compile")) for name in sources}
        students = {name: copy.deepcopy(base) for name in sources}
        optimizers, trainables, methods = {}, {}, {}
        for name, st in students.items():
            st.get_input_embeddings().weight.requires_grad_(False)
            trainables[name] = [p for p in st.parameters() if p.requires_grad]
            optimizers[name] = torch.optim.AdamW(trainables[name], lr=cfg.lr)
            methods[name] = Methods.from_config(configs[name], st)  # built once, as distill() does (compiles once)
        def step(name: str, rows) -> float:
            """One training step of mode `name`; returns its loss."""
            return float(train_step(students[name], optimizers[name], sources[name], blocks, rows, configs[name],
                                    trainables[name], methods[name])[0])

        first_step_s = {}
        for name in sources:  # warm-up step for each mode (not timed; a compiled mode compiles here)
            t = time.perf_counter()
            step(name, batch_rows(0, cfg.batch_size, len(blocks), 0))
            first_step_s[name] = time.perf_counter() - t
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
        rate = host["matmul_flops_per_s_bf16" if "bf16" in name else "matmul_flops_per_s_f32"]
        result[name] = {"tokens_per_s": statistics.median(tps), "tokens_per_s_spread": [min(tps), max(tps)], "steps_timed": len(tps),
                        "first_step_s": first_step_s[name],
                        "matmul_flops_per_s": rate, "bound_tokens_per_s": rate / flops_per_token,
                        "fraction_of_bound": statistics.median(tps) * flops_per_token / rate,
                        "losses": losses[name]}
    speed = {name: m["tokens_per_s"] for name, m in result.items()}
    extra = {}
    cache_tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    if "live" in speed:
        extra["speedup_cached_over_live"] = speed["cached"] / speed["live"]
        # epochs E after which cache build + E cached epochs < E live epochs:
        per_epoch_saving_s = cache_tokens / speed["live"] - cache_tokens / speed["cached"]
        extra["cache_pays_off_after_epochs"] = (cache_build_s / per_epoch_saving_s) if per_epoch_saving_s > 0 else None
    if "cached_bf16" in speed:
        extra["speedup_bf16_over_fp32"] = speed["cached_bf16"] / speed["cached"]
    for compiled, eager in (("cached_compile", "cached"), ("cached_bf16_compile", "cached_bf16")):
        if compiled in speed and eager in speed:
            extra[f"speedup_{compiled}_over_{eager}"] = speed[compiled] / speed[eager]
            # steps N after which the compiled first step + N compiled steps < the eager first step + N eager steps:
            saving_s = tokens / speed[eager] - tokens / speed[compiled]
            cost_s = result[compiled]["first_step_s"] - result[eager]["first_step_s"]
            extra[f"{compiled}_pays_off_after_steps"] = cost_s / saving_s if saving_s > 0 else None
    write_result("distill_throughput", {
        "what": "student training tokens/s with cached teacher top-k logits vs teacher recomputed every step, fp32, "
                "bf16 autocast and torch.compile",
        "teacher": args.teacher, "student_layers": args.num_layers, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "top_k": args.top_k, "torch_threads": torch.get_num_threads(), "modes": modes,
        "compile_cache": "cold: a fresh TORCHINDUCTOR_CACHE_DIR for this run",
        **result, **extra,
        "training_flops_per_token": flops_per_token,
        "bound_note": "bound = measured torch.mm FLOP/s (fp32 or bf16) / matmul FLOPs of one training token; the live "
                      "teacher's forward pass is not counted, so its fraction is of the student's bound",
        "cache_build_s": cache_build_s, "cache_build_tokens_per_s": cache_tokens / cache_build_s,
    })
    print("; ".join(f"{name} {v:.0f} tok/s ({result[name]['fraction_of_bound']:.2f} of its bound, first step "
                    f"{result[name]['first_step_s']:.1f} s)" for name, v in speed.items()))


if __name__ == "__main__":
    main()
