"""The whole teacher quantized, all run by llama.cpp: quality against the corrected teacher, bytes, decode speed.

Every row is the *full-depth* teacher (the sliced students are on the shrink curve, benchmarks/shrink_curve.py),
scored against the reference the rest of edgestill uses: the teacher corrected on the training split
(teacher.correct, the Minitron recipe; cached in ~/.cache/edgestill/corrected and shared with every run).

Rows (default teacher SmolLM2-135M-Instruct, Shakespeare held-out split, 2 threads):
  1. the corrected teacher: fp32 in transformers, F32 / F16 GGUF; and the original Q4_1 file the user started from
  2. llama.cpp's own quantizer applied to the corrected teacher's F32 GGUF: Q8_0, Q4_0, Q4_K_M, Q2_K
     (fine-tune, then quantize: what a user would do instead of edgestill)
  3. edgestill's post-training quantizers on the same corrected teacher: RTN and GPTQ, Q4_0
     (`edgestill quantize --method rtn|gptq`)
  4. QAT + KD from the corrected teacher in Q4_0, the same bytes as 3
     (`edgestill shrink student.num_layers=30 quant.format=q4_0`, 40 steps, checkpoint chosen by held-out KL)

Perplexity, retention, top-1 agreement and KL are computed from llama.cpp's own logits on the held-out blocks
(each block from an empty cache), against the corrected teacher in transformers. Decode tokens/s: a 128-token
prompt, then 64 greedy tokens one at a time, median of `--repeats` rounds with the models alternated.
`bandwidth_bound_fraction` = decode tokens/s ÷ (measured read bandwidth ÷ bytes read per token), bytes = tensor
bytes + the f16 KV cache at the mean decode position. Sizes: `compression_x_source` against the file the user
started from, `compression_x_fp16` / `_fp32` against the corrected teacher's parameters.

    python benchmarks/quant_table.py                 # makes missing runs/GGUFs first (~1-1.5 h on 2 cores)
    python benchmarks/quant_table.py --no-train      # only rows whose files exist
"""

from __future__ import annotations

import argparse
import json
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

# name -> (group, the command that makes it, run from the repo root; each corrects the teacher by default, from the cache)
RUNS = {
    "edgestill RTN Q4_0": ("3. edgestill PTQ", ["quantize", "--method", "rtn", "--type", "q4_0", "--out", "runs/bench/ptq-rtn-q4_0"]),
    "edgestill GPTQ Q4_0": ("3. edgestill PTQ", ["quantize", "--method", "gptq", "--type", "q4_0", "--out", "runs/bench/ptq-gptq-q4_0"]),
    "edgestill QAT+KD Q4_0 (30 layers)": ("4. edgestill QAT+KD", ["shrink", "--out", "runs/bench/qat-teacher-q4_0", "student.num_layers=30",
                                                              "quant.format=q4_0", "distill.lr=1e-4", "distill.steps=40",
                                                              "distill.checkpoint_every=5"]),
}
LLAMACPP_TYPES = ("Q8_0", "Q4_0", "Q4_K_M", "Q2_K")


def _run_dir(command: list[str]) -> Path:
    return ROOT / command[command.index("--out") + 1]


def make_artifacts(reference, source_gguf: Path, train: bool) -> list[dict]:
    """Every row's GGUF, made if missing. Returns rows: name, group, gguf path, command.

    The reference's GGUFs are named by its folder (its cache key), so a changed correction never reuses stale files."""
    from edgestill.export.gguf import export_gguf
    from edgestill.runtime.llamacpp import llamacpp_quantize

    BENCH.mkdir(parents=True, exist_ok=True)
    key = Path(reference.path).name
    rows = [{"name": f"original file ({source_gguf.name})", "group": "1. teacher", "gguf": source_gguf,
             "command": "the teacher file the user started from (not corrected)"}]
    for kind in ("f32", "f16"):
        path = BENCH / f"corrected-{key}-{kind}.gguf"
        if not path.is_file():
            export_gguf(reference.model, reference.tokenizer, path, kind, teacher_gguf=source_gguf)
        rows.append({"name": f"corrected teacher {kind.upper()} GGUF", "group": "1. teacher", "gguf": path,
                     "command": f"edgestill.export.gguf.export_gguf(corrected teacher, ..., '{kind}')"})
    for qtype in LLAMACPP_TYPES:
        path = BENCH / f"corrected-{key}-llamacpp-{qtype}.gguf"
        if not path.is_file():
            llamacpp_quantize(BENCH / f"corrected-{key}-f32.gguf", path, qtype)
        rows.append({"name": f"llama.cpp {qtype}", "group": "2. llama.cpp PTQ", "gguf": path,
                     "command": f"llama_model_quantize(corrected teacher F32 GGUF, {qtype})"})
    for name, (group, command) in RUNS.items():
        run = _run_dir(command)
        if not (run / "DONE").is_file() and train:
            print(f"making {name}: edgestill {' '.join(command)}", flush=True)
            subprocess.run([*EDGESTILL, *command, "--overwrite"], cwd=ROOT, check=True)
        if (run / "student.gguf").is_file():
            rows.append({"name": name, "group": group, "gguf": run / "student.gguf", "command": "edgestill " + " ".join(command),
                         "run": _run_summary(run, reference.path)})
        else:
            print(f"skipping {name}: no {run}/student.gguf (run without --no-train to make it)")
    return rows


def _run_summary(run: Path, reference_path: str) -> dict:
    """What the run itself recorded: which teacher it learned from, the checkpoint it kept, its what-broke numbers."""
    metrics = json.loads((run / "metrics.json").read_text())
    teacher = metrics.get("teacher") or {}
    train = metrics.get("train") or {}
    correction = teacher.get("correction") or {}
    if not correction or Path(correction.get("path", "")).name != Path(reference_path).name:
        raise SystemExit(f"{run} did not learn from this corrected teacher ({correction.get('path')}); "
                         "rerun it: remove the folder, then run this script again")
    ood = metrics.get("out_of_domain") or {}
    return {"selection": train.get("selection"), "run_commit": (metrics.get("environment") or {}).get("git_commit"),
            "out_of_domain": {k: ood.get(k) for k in ("source", "retention", "top1_agreement", "kl_teacher_student")},
            "in_domain_torch": {k: metrics.get(k) for k in ("retention", "top1_agreement", "kl_teacher_student")}}


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
    from edgestill.distill.correct import correction_record
    from edgestill.evaluate.gguf_eval import gguf_quality, teacher_logprobs, teacher_perplexity
    from edgestill.evaluate.speed import measure_speed
    from edgestill.jobs.shrink import reference_teacher
    from edgestill.models.load import load_causal_lm, resolve_model_path
    from edgestill.plan.hostbench import measure_host

    torch.set_num_threads(2)
    cfg = ShrinkConfig()
    original = load_causal_lm(cfg.teacher.model)
    data = corpus_blocks(cfg.data, original.tokenizer)
    reference = reference_teacher(cfg, original, data)  # corrected on the train split (cached, shared with the runs)
    source_gguf = Path(resolve_model_path(cfg.teacher.model))
    rows = make_artifacts(reference, source_gguf, train=not args.no_train)
    test = data.test[: args.blocks]
    print(f"held-out: {test.size:,} tokens; corrected teacher log-probs ...", flush=True)
    t_logp = teacher_logprobs(reference.model, test)
    reference_ppl = teacher_perplexity(t_logp, test)
    for r in rows:
        t0 = time.perf_counter()
        r.update(gguf_quality(r["gguf"], test, t_logp))
        r["retention"] = reference_ppl / r["perplexity"]
        print(f"  {r['name']}: ppl {r['perplexity']:.2f} retention {r['retention']:.3f} top-1 {r['top1_agreement']:.3f} "
              f"KL {r['kl_teacher_model']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    del t_logp

    prompt = [int(t) for t in test[0][: args.prompt_tokens]]
    speeds(rows, prompt, args.decode_tokens, args.repeats)
    host = measure_host(threads=2)
    bandwidth = host["memory_bandwidth_bytes_per_s"]
    params = sum(p.numel() for p in reference.model.parameters())
    source_bytes = source_gguf.stat().st_size
    for r in rows:
        layout = gguf_layout(r["gguf"])
        r["file_bytes"] = r["gguf"].stat().st_size  # a GGUF carries its tokenizer: this is what the device loads
        r["compression_x_source"] = source_bytes / r["file_bytes"]
        r["compression_x_fp32"] = params * 4 / r["file_bytes"]
        r["compression_x_fp16"] = params * 2 / r["file_bytes"]
        bytes_per_token = layout["tensor_bytes"] + layout["kv_bytes_per_position"] * (args.prompt_tokens + args.decode_tokens / 2)
        r["bytes_read_per_token"] = bytes_per_token
        r["bandwidth_bound_tokens_per_s"] = bandwidth / bytes_per_token
        r["bandwidth_bound_fraction"] = r["decode_tokens_per_s"] / r["bandwidth_bound_tokens_per_s"]
        r["layers"], r["bytes_by_type"] = layout["layers"], layout["bytes_by_type"]
        r["gguf"] = str(Path(r["gguf"]).relative_to(ROOT)) if Path(r["gguf"]).is_relative_to(ROOT) else Path(r["gguf"]).name
    # the corrected teacher in transformers, for context (a different runtime)
    speed = measure_speed({"teacher": reference.model}, torch.from_numpy(test[0][: args.prompt_tokens]).long()[None],
                          decode_tokens=32, repeats=3, threads=2)["teacher"]
    rows.insert(1, {"name": "corrected teacher fp32 (transformers)", "group": "1. teacher", "perplexity": reference_ppl,
                    "retention": 1.0, "top1_agreement": 1.0, "kl_teacher_model": 0.0, "file_bytes": params * 4,
                    "compression_x_source": source_bytes / (params * 4), "compression_x_fp32": 1.0,
                    "compression_x_fp16": 0.5, "runtime": "transformers",
                    "decode_tokens_per_s": speed["decode_tokens_per_s"], "prefill_tokens_per_s": speed["prefill_tokens_per_s"]})

    by_name = {r["name"]: r for r in rows}
    targets = {}
    qat = by_name.get("edgestill QAT+KD Q4_0 (30 layers)")
    for base in ("edgestill RTN Q4_0", "edgestill GPTQ Q4_0"):
        if qat and base in by_name:  # the share of what PTQ loses that QAT+KD wins back, on each axis
            b, name = by_name[base], base.split()[1].lower()
            targets[f"qat_recovers_of_{name}_kl"] = (b["kl_teacher_model"] - qat["kl_teacher_model"]) / b["kl_teacher_model"]
            targets[f"qat_recovers_of_{name}_top1"] = ((qat["top1_agreement"] - b["top1_agreement"])
                                                       / (1.0 - b["top1_agreement"]))
            targets[f"qat_recovers_of_{name}_perplexity"] = ((b["perplexity"] - qat["perplexity"])
                                                             / (b["perplexity"] - reference_ppl))
    record = correction_record(reference.path) or {}
    write_result("quant_table", {
        "command": "python benchmarks/quant_table.py" + (" --no-train" if args.no_train else "")
                   + (f" --blocks {args.blocks}" if args.blocks != 48 else ""),
        "reference": "corrected" if record else "original", "reference_path": reference.path,
        "correction": {k: v for k, v in record.items() if k != "history"},
        "source_file": {"path": source_gguf.name, "bytes": source_bytes},
        "held_out_tokens": int(test[:, 1:].size), "reference_perplexity": reference_ppl,
        "memory_bandwidth_bytes_per_s": bandwidth, "memory_bandwidth_spread": host["memory_bandwidth_spread"],
        "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens, "repeats": args.repeats, "threads": 2,
        "rows": rows, "targets": targets,
    })


if __name__ == "__main__":
    main()
