"""One lever at a time: the default student with and without each lever, same teacher, data and training budget
-> benchmarks/results/levers.json.

    python benchmarks/levers.py                         # every row, seed 0 (about 20-30 min a row on 2 cores)
    python benchmarks/levers.py --rows trim_vocab --seeds 0,1,2
    python benchmarks/levers.py --seeds 0,1,2 --seed-rows width,width_activation   # seeds 1, 2 only for those rows
    python benchmarks/levers.py --quick                 # smoke run on tiny settings -> levers_quick.json

Every row is one `edgestill shrink` run through the project's own function (`jobs.shrink.shrink`) with the default
recipe plus the row's overrides, in <root>/<row>[-seed<s>]: the corrected teacher is the reference, the student is the
default 15-layer slice, each row trains the same steps of the same tokens. A finished row (DONE) is reused and a
killed one resumes. The teacher's top-k cache is built once and copied into every row (its fingerprint is checked).

Rows (issue 15's levers; a lever joins when it runs end to end through `shrink`):
    none        the default student (float, full vocabulary)
    trim_vocab  student.trim_vocab=true: only the tokens the training split uses (models/vocab.py)
    width       student.intermediate_size=768: half of each kept layer's FFN channels, ranked by weight norm (what
                width_importance=auto did for an FFN-only cut before these rows; the measured rows ran with auto)
    width_activation   the same cut ranked by activation importance on calibration text (Minitron, models/width.py)
    low_rank    student.low_rank=0.5: every matrix of the kept blocks as SVD-initialised factors storing half the
                blocks' dense parameters (method [7]; PyTorch / ONNX only, no GGUF)
    blockwise   the same number of steps as `none`, the first half block-wise (distill.blockwise_steps: each kept
                block learns the teacher blocks cut around it from the teacher's own stream), the rest end-to-end KD
    blockwise_extra   all of `none`'s end-to-end steps after a block-wise stage of half as many: a longer budget,
                to see whether the warm start helps when it costs end-to-end steps nothing
    longer      the default student with 1.5 times the shared steps, all end to end: the same tokens as
                blockwise_extra, so the two say whether the stage's tokens are worth more than end-to-end ones
    q4_k, q3_k, q2_k   quant.format=...: QAT + KD in llama.cpp's K-quant (bit-exact), the GGUF is the artifact
    combined    the GGUF levers together (trim, FFN 768 ranked by activations, Q3_K): the smallest student
                llama.cpp runs here

Rows of an earlier invocation that this one does not run again stay in the JSON, with their own commit and
environment, as long as it used the same shared overrides; a row run again replaces its earlier self.

Each row records the student's bytes as the device loads them (a quantized row's GGUF, else the HF folder: weights +
config + tokenizer files) and its ratio to F16 and to the teacher file the user started from; in-domain retention, top-1 and KL against the
corrected teacher; the same out of domain (general English, never trained on); for a trimmed vocabulary what the
trim kept and what it costs (student tokens per teacher token, the teacher's mass on trimmed tokens); and its own
environment (commit, git_dirty, CPU, threads, load before and after). Quality does not depend on the machine's load;
the decode speeds do, and are given for the record only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import EVAL_LIGHT, RESULTS, write_result  # noqa: E402
from distill_methods import _keep_cache  # noqa: E402

ROWS = {
    "none": ("default student (full vocabulary)", []),
    "trim_vocab": ("+ trimmed vocabulary", ["student.trim_vocab=true"]),
    "width": ("+ FFN width halved (1536 -> 768), weight-norm ranking",
              ["student.intermediate_size=768", "student.width_importance=weight"]),
    "width_activation": ("+ FFN width halved (1536 -> 768), activation ranking",
                         ["student.intermediate_size=768", "student.width_importance=activation"]),
    "low_rank": ("+ low-rank blocks (half the blocks' parameters)", ["student.low_rank=0.5"]),
    "q4_k": ("+ QAT in Q4_K (GGUF)", ["quant.format=q4_k"]),
    "q3_k": ("+ QAT in Q3_K (GGUF)", ["quant.format=q3_k"]),
    "q2_k": ("+ QAT in Q2_K (GGUF)", ["quant.format=q2_k"]),
    # the same steps of the same tokens as `none`, the first half block-wise (run_row fills in the overrides)
    "blockwise": ("block-wise first stage, then end-to-end KD (half the steps each)", []),
    # all of `none`'s end-to-end steps, after a block-wise stage of half as many: does the warm start help at all
    "blockwise_extra": ("block-wise first stage (half the steps), then all of the default's end-to-end steps", []),
    # the same tokens as blockwise_extra, all of them end to end: what the stage's extra tokens buy without it
    "longer": ("default student, 1.5x the steps, all end-to-end KD", []),
    "combined": ("trimmed + FFN 768 (activation ranking) + QAT Q3_K (GGUF)",
                 ["student.trim_vocab=true", "student.intermediate_size=768", "student.width_importance=activation",
                  "quant.format=q3_k"]),
}
QUICK = ["data.seq_len=64", "data.max_train_tokens=4096", "data.max_eval_tokens=512", "data.max_val_tokens=256",
         "distill.steps=4", "distill.batch_size=2", "distill.checkpoint_every=2", "distill.eval_every=2",
         "distill.warmup_steps=1", "student.num_layers=4", "teacher.correct_steps=2", "teacher.correct_eval_every=1",
         "eval.batch_size=4", "eval.speed_prompt_tokens=16", "eval.speed_decode_tokens=4", "eval.out_of_domain_tokens=512",
         "eval.zero_shot_passages=4", "eval.chat_tokens=4", "eval.prompts=[\"To be\"]"]

log = logging.getLogger("edgestill")


def _blockwise(out: Path, train: dict) -> dict | None:
    """A block-wise first stage's steps and tokens (RUN/blockwise/blockwise.json), or None for a row without one."""
    path = out / "blockwise" / "blockwise.json"
    if not path.is_file():
        return None
    steps = json.loads(path.read_text())["steps"]
    return {"steps": steps, "tokens": steps * train["tokens"] // max(1, train["steps"])}


def merge_rows(previous: Path, base: list[str], results: list[dict]) -> list[dict]:
    """This invocation's rows plus the earlier ones it did not measure again (each keeps its own overrides, commit
    and environment), when the earlier file used the same shared overrides; seed by seed, in ROWS order."""
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    ran = {(r["row"], r["seed"]) for r in results}
    earlier = [r for r in old.get("rows", []) if (r["row"], r["seed"]) not in ran and r["row"] in ROWS]
    if earlier and old.get("shared_overrides") != base:
        log.warning("%s: its %d other rows were measured with other shared overrides (%s); they are not kept",
                    previous.name, len(earlier), old.get("shared_overrides"))
        earlier = []
    order = list(ROWS)
    return sorted([*earlier, *results], key=lambda r: (r["seed"], order.index(r["row"])))


def row_overrides(name: str, base: list[str]) -> list[str]:
    """A row's config overrides. Three rows get theirs from the shared steps: `blockwise` spends half of them
    block-wise and the rest end to end (the same budget as `none`); `blockwise_extra` adds half as many block-wise
    steps before all of them; `longer` trains 1.5 times as many end to end (blockwise_extra's tokens)."""
    from edgestill.config import load_config

    if not name.startswith("blockwise") and name != "longer":
        return ROWS[name][1]
    steps = load_config(overrides=base).distill.steps
    if name == "longer":
        return [f"distill.steps={steps + steps // 2}"]
    stage = [f"distill.blockwise_steps={steps // 2}"]
    return [*stage, f"distill.steps={steps - steps // 2}"] if name == "blockwise" else stage


def run_row(name: str, base: list[str], root: Path, seed: int) -> dict:
    from edgestill.config import load_config
    from edgestill.jobs.shrink import shrink

    label, overrides = ROWS[name][0], row_overrides(name, base)
    out = root / (name if seed == 0 else f"{name}-seed{seed}")
    if not (out / "DONE").is_file():
        cfg = load_config(overrides=[*base, *overrides, f"distill.seed={seed}", f"output.dir={out}"])
        shrink(cfg, teacher_cache_from=root / "_cache")
    _keep_cache(out, root / "_cache")  # the next rows start from this row's teacher cache
    m = json.loads((out / "metrics.json").read_text())
    ood = m.get("out_of_domain") or {}
    s, t = m["student"], m["teacher"]
    return {
        "row": name, "label": label, "overrides": overrides, "seed": seed, "run_dir": str(out),
        "reference": m.get("reference", "original"),
        "params": s["params"], "bytes": s["bytes"], "teacher_params": t["params"], "source_bytes": t["source_bytes"],
        "compression_x_fp16": m["compression_x_fp16"], "compression_x_source": m["compression_x_source"],
        "retention": m["retention"], "top1_agreement": m["top1_agreement"], "kl_teacher_student": m["kl_teacher_student"],
        "out_of_domain": {k: ood.get(k) for k in ("retention", "top1_agreement", "kl_teacher_student")},
        "vocab_trim": m.get("vocab_trim"),
        "artifact": Path(m["student"]["artifact"]).name, "quant": m["student"].get("quant"),
        "formats": _formats(out),
        "low_rank": {k: v for k, v in (m["student"].get("low_rank") or {}).items() if k != "ranks"} or None,
        "train_tokens": m["train"]["tokens"], "selection": m["train"].get("selection"),
        # the block-wise stage's steps come on top of `train_tokens` (end-to-end KD's), with the same tokens a step
        "blockwise": _blockwise(out, m["train"]),
        "decode_tokens_per_s": s["decode_tokens_per_s"],
        "environment": m["environment"],
    }


def _formats(run_dir: Path) -> dict | None:
    """A quantized row's matrices: how many got each format (a K-quant needs rows that are a multiple of 256; others
    fall back, as llama.cpp's own quantizer does) and their mean bits per weight. None for a float row."""
    path = run_dir / "quant_report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    count = Counter(layer["format"]["format"] for layer in report)
    weights = sum(math.prod(layer["shape"]) for layer in report)
    return {"matrices": dict(count), "fallbacks": sum(1 for layer in report if layer.get("fallback")),
            "bits_per_weight": 8 * sum(layer["weight_bytes"] for layer in report) / weights}


def summarise(rows: list[dict]) -> dict:
    """Per row: the mean over seeds of each score and, with >= 3 seeds, its range (a difference is claimed only
    when it holds on every seed, as in distill_methods)."""
    out = {}
    for name in dict.fromkeys(r["row"] for r in rows):
        mine = [r for r in rows if r["row"] == name]
        entry = {"seeds": [r["seed"] for r in mine], "bytes": mine[0]["bytes"],
                 "compression_x_fp16": mine[0]["compression_x_fp16"], "compression_x_source": mine[0]["compression_x_source"]}
        for key, get in (("retention", lambda r: r["retention"]), ("top1_agreement", lambda r: r["top1_agreement"]),
                         ("kl_teacher_student", lambda r: r["kl_teacher_student"]),
                         ("out_of_domain_retention", lambda r: r["out_of_domain"]["retention"])):
            values = [get(r) for r in mine if get(r) is not None]
            if values:
                entry[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        out[name] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--seed-rows", default=None,
                    help="comma-separated rows that get the seeds after the first (default: every row), e.g. to repeat "
                         "only the rows whose difference is in question")
    ap.add_argument("--root", default=None, help="run folders (default runs/bench/levers[-quick])")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("overrides", nargs="*", help="config overrides every row shares (e.g. distill.steps=200)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.root or ("runs/bench/levers-quick" if args.quick else "runs/bench/levers"))
    base = [*(QUICK if args.quick else []), *EVAL_LIGHT, *args.overrides]
    seeded = rows if args.seed_rows is None else [r.strip() for r in args.seed_rows.split(",") if r.strip()]
    if set(seeded) - set(rows):
        raise SystemExit(f"--seed-rows {', '.join(sorted(set(seeded) - set(rows)))} not in --rows")
    name = "levers_quick" if args.quick else "levers"
    results = [run_row(row, base, root, seed) for seed in seeds for row in rows if seed == seeds[0] or row in seeded]
    results = merge_rows(RESULTS / f"{name}.json", base, results)
    write_result(name, {
        "what": "the default student with and without each lever (same teacher, data, steps); scores against the "
                "corrected teacher, in domain (held-out plays) and out of domain (general English)",
        "command": "python benchmarks/levers.py " + " ".join(sys.argv[1:]),
        "shared_overrides": base,
        "rows": results,
        "summary": summarise(results),
    })


if __name__ == "__main__":
    main()
