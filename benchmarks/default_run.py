"""The default `edgestill shrink` run, teacher vs student -> benchmarks/results/default_run.json.

    python benchmarks/default_run.py                     # runs `edgestill shrink` (about 15 min on 2 cores)
    python benchmarks/default_run.py --run-dir runs/X    # record an existing finished run instead

Held-out split: the test plays of the default by-play split (listed in the JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from _common import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="a finished run folder to record (default: run the default shrink now)")
    ap.add_argument("--out", default="runs/bench-default-run")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    run_dir = Path(args.run_dir) if args.run_dir else Path(args.out)
    if not args.run_dir:
        cmd = [sys.executable, "-m", "edgestill.cli", "shrink", "--out", str(run_dir), "--overwrite", *args.overrides]
        subprocess.run(cmd, check=True)
    m = json.loads((run_dir / "metrics.json").read_text())
    docs = Path(__file__).resolve().parent.parent / "docs" / "img"
    docs.mkdir(parents=True, exist_ok=True)
    for plot in ("token_loss.png", "training_loss.png"):  # the README shows the run's own plots
        shutil.copyfile(run_dir / plot, docs / f"default_run_{plot}")
    t, s = m["teacher"], m["student"]
    chat = m.get("chat") or {}
    write_result("default_run", {
        "what": "edgestill shrink with the default recipe: SmolLM2-135M-Instruct, corrected on the training plays, -> "
                "sliced student, logit KD on Shakespeare; scores against the corrected teacher (the reference)",
        "held_out": {"split": "test (by play)", "plays": m["splits"]["test"], "tokens": m["eval_tokens"]},
        "reference": m.get("reference", "original"),
        "teacher": {k: t.get(k) for k in ("name", "params", "bytes", "source", "source_bytes", "num_layers", "perplexity",
                                          "correction", "prefill_tokens_per_s", "decode_tokens_per_s",
                                          "decode_tokens_per_s_spread")},
        "original_teacher": m.get("original_teacher"),
        "student": {k: s[k] for k in ("params", "bytes", "dtype", "num_layers", "layers_kept", "intermediate_size", "perplexity",
                                      "prefill_tokens_per_s", "decode_tokens_per_s", "decode_tokens_per_s_spread")},
        **{k: m[k] for k in ("retention", "top1_agreement", "kl_teacher_student", "compression_x_fp32", "compression_x_fp16",
                             "compression_x_source", "speedup_x", "speedup_x_prefill", "baselines", "train")},
        "out_of_domain": m.get("out_of_domain"),
        "zero_shot": m.get("zero_shot"),
        "chat": {k: v["summary"] for k, v in chat.items()} or None,
        "chat_answers": [{k: p[k] for k in ("prompt", "reference_answer", "student_answer")}
                         for p in (chat.get("student") or {}).get("prompts", [])],
        "environment": m["environment"],
    })


if __name__ == "__main__":
    main()
