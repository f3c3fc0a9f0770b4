"""Quantized teachers and students, all run by llama.cpp: quality, bytes, decode speed (issue 3's table).

Rows (default teacher SmolLM2-135M, Shakespeare held-out split, 2 threads):
  1. teacher fp32 (transformers) and the teacher as F32 / F16 GGUF (llama.cpp)
  2. the teacher quantized by llama.cpp's own quantizer: Q8_0, Q4_0, Q4_K_M
  3. the teacher quantized by edgestill: RTN and GPTQ, Q4_0   (`edgestill quantize --method rtn|gptq`)
  4. the teacher after QAT + KD in Q4_0, the same bytes as 3   (`edgestill shrink student.num_layers=30 quant.format=q4_0`, 40 steps)
  5. the sliced 15-layer student after QAT + KD: all Q4_0, and Q4_0 with a Q8_0 head/embedding

Perplexity, retention, top-1 agreement and KL are computed from llama.cpp's own logits on the
held-out blocks (each block from an empty cache), against the fp32 teacher in transformers. Decode
tokens/s: a 128-token prompt, then 64 greedy tokens one at a time, median of `--repeats` rounds with
the models alternated. `bandwidth_bound_fraction` = decode tokens/s ÷ (measured read bandwidth ÷
bytes read per token), bytes = tensor bytes + the f16 KV cache at the mean decode position.

    python benchmarks/quant_table.py                 # makes missing runs/GGUFs first (QAT runs: ~20-40 min each)
    python benchmarks/quant_table.py --no-train      # only rows whose files exist
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "runs" / "bench"
EDGESTILL = [sys.executable, "-m", "edgestill.cli"]

# name -> (group, how the artifact is made: a command run from the repo root, or None for in-script exports)
RUNS = {
    "edgestill RTN Q4_0": ("3. edgestill PTQ", ["quantize", "--method", "rtn", "--type", "q4_0", "--out", "runs/bench/ptq-rtn-q4_0"]),
    "edgestill GPTQ Q4_0": ("3. edgestill PTQ", ["quantize", "--method", "gptq", "--type", "q4_0", "--out", "runs/bench/ptq-gptq-q4_0"]),
    "edgestill QAT+KD Q4_0 (30 layers)": ("4. edgestill QAT+KD", ["shrink", "--out", "runs/bench/qat-teacher-q4_0", "student.num_layers=30",
                                                              "quant.format=q4_0", "distill.lr=1e-4", "distill.steps=40",
                                                              "distill.checkpoint_every=5"]),
    "sliced 15 layers, QAT+KD Q4_0": ("5. sliced student", ["shrink", "--out", "runs/bench/qat-student15-q4_0", "quant.format=q4_0"]),
    "sliced 15 layers, QAT+KD Q4_0, head Q8_0": ("5. sliced student", ["shrink", "--out", "runs/bench/qat-student15-q4_0-head-q8_0",
                                                                     "quant.format=q4_0", "quant.plan={lm_head: q8_0}"]),
    # the shrink curve's 1/8 point: the planner's 22 layers with per-layer Q4_0/Q5_0 (a point of a resumable sweep)
    "sliced 22 layers, QAT+KD mixed Q4_0/Q5_0 (planned)": ("5. sliced student", ["sweep", "--device", "host", "--out",
                                                                                "runs/sweep-smollm2-135m"],
                                                           "runs/sweep-smollm2-135m/points/02-67MB"),
}
LLAMACPP_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")


def _run_dir(command: list[str]) -> Path:
    return ROOT / command[command.index("--out") + 1]


def make_artifacts(teacher, train: bool) -> list[dict]:
    """Every row's GGUF, made if missing. Returns rows: name, group, gguf path, command."""
    from edgestill.export.gguf import export_gguf
    from edgestill.models.load import resolve_model_path
    from edgestill.runtime.llamacpp import llamacpp_quantize

    BENCH.mkdir(parents=True, exist_ok=True)
    teacher_gguf = resolve_model_path("smollm2-135m")
    rows = []
    for kind in ("f32", "f16"):
        path = BENCH / f"teacher-{kind}.gguf"
        if not path.is_file():
            export_gguf(teacher.model, teacher.tokenizer, path, kind, teacher_gguf=teacher_gguf)
        rows.append({"name": f"teacher {kind.upper()} GGUF", "group": "1. teacher", "gguf": path,
                     "command": f"edgestill.export.gguf.export_gguf(teacher, ..., '{kind}')"})
    for qtype in LLAMACPP_TYPES:
        path = BENCH / f"teacher-llamacpp-{qtype}.gguf"
        if not path.is_file():
            llamacpp_quantize(BENCH / "teacher-f32.gguf", path, qtype)
        rows.append({"name": f"llama.cpp {qtype}", "group": "2. llama.cpp PTQ", "gguf": path,
                     "command": f"llama_model_quantize(teacher-f32.gguf, {qtype})"})
    for name, (group, command, *folder) in RUNS.items():
        run = ROOT / folder[0] if folder else _run_dir(command)
        if not (run / "DONE").is_file() and train:
            print(f"making {name}: edgestill {' '.join(command)}", flush=True)
            # a run of its own is remade from scratch; a point of a sweep is made by resuming the sweep
            subprocess.run([*EDGESTILL, *command, *([] if folder else ["--overwrite"])], cwd=ROOT, check=True)
        if (run / "student.gguf").is_file():
            rows.append({"name": name, "group": group, "gguf": run / "student.gguf", "command": "edgestill " + " ".join(command)})
        else:
            print(f"skipping {name}: no {run}/student.gguf (run without --no-train to make it)")
    return rows


def gguf_layout(gguf: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    field = lambda key: int(reader.fields[key].parts[-1][0])  # noqa: E731
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_bytes)
    layers, heads = field("llama.block_count"), field("llama.attention.head_count")
    kv_heads, hidden = field("llama.attention.head_count_kv"), field("llama.embedding_length")
    return {"tensor_bytes": sum(types.values()), "bytes_by_type": types, "layers": layers,
            "kv_bytes_per_position": 2 * layers * kv_heads * (hidden // heads) * 2}  # K and V, f16


def speeds(rows: list[dict], prompt: list[int], decode_tokens: int, repeats: int) -> None:
    """Prefill/decode tokens/s of every row in llama.cpp, rows alternated within each round."""
    from edgestill.runtime.llamacpp import LlamaCpp

    models = {r["name"]: LlamaCpp(r["gguf"], n_ctx=len(prompt) + decode_tokens + 8, logits_all=False) for r in rows}
    samples = {name: [] for name in models}
    try:
        for name, model in models.items():
            model.time_tokens(prompt[:16], 4)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                samples[name].append(model.time_tokens(prompt, decode_tokens))
    finally:
        for model in models.values():
            model.close()
    for r in rows:
        pre, dec = zip(*samples[r["name"]])
        r.update(prefill_tokens_per_s=statistics.median(pre), prefill_spread=[min(pre), max(pre)],
                 decode_tokens_per_s=statistics.median(dec), decode_spread=[min(dec), max(dec)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-train", action="store_true", help="do not make missing runs; table only what exists")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=48, help="held-out blocks scored (default all 48 = 12,240 tokens; "
                                                          "llama.cpp scores ~1-4 s a block per model on 2 cores)")
    args = ap.parse_args()

    import torch

    from edgestill.config import ShrinkConfig
    from edgestill.data.corpus import corpus_blocks
    from edgestill.evaluate.gguf_eval import gguf_quality, teacher_logprobs, teacher_perplexity
    from edgestill.evaluate.speed import measure_speed
    from edgestill.models.load import load_causal_lm
    from edgestill.plan.hostbench import measure_host

    torch.set_num_threads(2)
    load_start = os.getloadavg()[0]
    teacher = load_causal_lm("smollm2-135m")
    rows = make_artifacts(teacher, train=not args.no_train)
    test = corpus_blocks(ShrinkConfig().data, teacher.tokenizer).test
    test = test[: args.blocks]
    print(f"held-out: {test.size:,} tokens; teacher log-probs ...", flush=True)
    t_logp = teacher_logprobs(teacher.model, test)
    teacher_ppl = teacher_perplexity(t_logp, test)
    for r in rows:
        t0 = time.perf_counter()
        r.update(gguf_quality(r["gguf"], test, t_logp))
        r["retention"] = teacher_ppl / r["perplexity"]
        print(f"  {r['name']}: ppl {r['perplexity']:.2f} retention {r['retention']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    del t_logp

    prompt = [int(t) for t in test[0][: args.prompt_tokens]]
    speeds(rows, prompt, args.decode_tokens, args.repeats)
    host = measure_host(threads=2)
    bandwidth = host["memory_bandwidth_bytes_per_s"]
    teacher_params = sum(p.numel() for p in teacher.model.parameters())
    for r in rows:
        layout = gguf_layout(r["gguf"])
        r["file_bytes"] = r["gguf"].stat().st_size
        r["compression_x_fp32"] = teacher_params * 4 / r["file_bytes"]
        r["compression_x_fp16"] = teacher_params * 2 / r["file_bytes"]
        bytes_per_token = layout["tensor_bytes"] + layout["kv_bytes_per_position"] * (args.prompt_tokens + args.decode_tokens / 2)
        r["bytes_read_per_token"] = bytes_per_token
        r["bandwidth_bound_tokens_per_s"] = bandwidth / bytes_per_token
        r["bandwidth_bound_fraction"] = r["decode_tokens_per_s"] / r["bandwidth_bound_tokens_per_s"]
        r["layers"], r["bytes_by_type"] = layout["layers"], layout["bytes_by_type"]
        r["gguf"] = str(Path(r["gguf"]).relative_to(ROOT))
    # the fp32 teacher in transformers, for context (a different runtime)
    speed = measure_speed({"teacher": teacher.model}, torch.from_numpy(test[0][: args.prompt_tokens]).long()[None],
                          decode_tokens=32, repeats=3, threads=2)["teacher"]
    fp32_row = {"name": "teacher fp32 (transformers)", "group": "1. teacher", "perplexity": teacher_ppl, "retention": 1.0,
                "top1_agreement": 1.0, "kl_teacher_model": 0.0, "file_bytes": teacher_params * 4,
                "compression_x_fp32": 1.0, "compression_x_fp16": 0.5, "runtime": "transformers",
                "decode_tokens_per_s": speed["decode_tokens_per_s"], "prefill_tokens_per_s": speed["prefill_tokens_per_s"]}
    rows.insert(0, fp32_row)

    by_name = {r["name"]: r for r in rows}
    targets = {}
    qat = by_name.get("edgestill QAT+KD Q4_0 (30 layers)")
    for base in ("edgestill RTN Q4_0", "edgestill GPTQ Q4_0"):
        if qat and base in by_name:
            lost = by_name[base]["perplexity"] - teacher_ppl
            targets[f"qat_recovers_of_{base.split()[1].lower()}_loss"] = (by_name[base]["perplexity"] - qat["perplexity"]) / lost
    write_result("quant_table", {
        "command": "python benchmarks/quant_table.py" + (" --no-train" if args.no_train else "")
                   + (f" --blocks {args.blocks}" if args.blocks != 48 else ""),
        "held_out_tokens": int(test[:, 1:].size), "teacher_perplexity": teacher_ppl,
        "memory_bandwidth_bytes_per_s": bandwidth, "memory_bandwidth_spread": host["memory_bandwidth_spread"],
        "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens, "repeats": args.repeats, "threads": 2,
        "rows": rows, "targets": targets, "load_average": {"start": load_start, "end": os.getloadavg()[0]},
    })


if __name__ == "__main__":
    main()
