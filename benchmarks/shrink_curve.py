"""The shrink curve of the default teacher -> benchmarks/results/shrink_curve.json + docs/img/shrink_curve.png.

    python benchmarks/shrink_curve.py          # runs `edgestill sweep --device host --out runs/sweep-smollm2-135m`
    python benchmarks/shrink_curve.py --copy   # only copy a finished sweep's results (no training)

The sweep itself is the user command (`edgestill sweep`, resumable: rerun after a kill and it continues);
this script runs it and files its shrink_curve.json (plus the command, commit and machine) and plot where the
README reads them. Teacher smollm2-135m, corpus shakespeare, held-out split = the test plays (never trained on).
About 1.5-2 hours on 2 idle CPU cores for the six default budgets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "docs" / "img" / "shrink_curve.png"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/sweep-smollm2-135m", help="the sweep folder")
    ap.add_argument("--device", default="host")
    ap.add_argument("--copy", action="store_true", help="do not run the sweep; file the results of a finished one")
    args = ap.parse_args()
    argv = ["sweep", "--device", args.device, "--out", args.out]
    if not args.copy:
        from edgestill.cli import main as cli

        rc = cli(argv)
        if rc:
            sys.exit(rc)
    out = Path(args.out)
    curve = out / "shrink_curve.json"
    if not curve.is_file():
        sys.exit(f"{curve} does not exist: run the sweep first (python benchmarks/shrink_curve.py)")
    result = json.loads(curve.read_text())
    plans = json.loads((out / "plans.json").read_text())
    write_result("shrink_curve", {"command": "edgestill " + " ".join(argv), "sweep_folder": str(out),
                                  "plans": plans["plans"], **result})
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    tmp = PLOT.with_suffix(".png.tmp")
    shutil.copyfile(out / "shrink_curve.png", tmp)
    tmp.replace(PLOT)
    print(f"wrote {PLOT}")


def shrink_curve_summary(r: dict) -> str:
    """One line: the break points (the README's first screen)."""
    bps = []
    for t, bp in r["break_points"].items():
        bps.append(f"retention ≥ {float(t):.0%}: " + (f"**{bp['compression_x_fp32']:.2f}× smaller** ({bp['name']}, "
                                                        f"{bp['bytes'] / 1e6:.1f} MB, retention {bp['retention']:.3f})"
                                                        if bp else "no edgestill point"))
    return "Break points (the most compressed edgestill student keeping the retention): " + "; ".join(bps) + "."


def shrink_curve_table(r: dict) -> str:
    """README table: every point of both series, then the break points."""
    rows = ["| series | model | GGUF MB | × fp32 | held-out ppl | retention | top-1 agreement |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for p in sorted(r["points"], key=lambda p: (p["series"] != "edgestill", p["compression_x_fp32"])):
        ppl = "" if p.get("perplexity") is None else f"{p['perplexity']:.2f}"
        rows.append(f"| {p['series']} | {p['name']} | {p['bytes'] / 1e6:.1f} | {p['compression_x_fp32']:.2f} | {ppl} | "
                    f"{p['retention']:.3f} | {p['top1_agreement']:.3f} |")
    env = r["environment"]
    rows += ["", shrink_curve_summary(r),
             f"Teacher perplexity {r['teacher_perplexity']:.2f} on {r['held_out_tokens']:,} held-out tokens (test plays, "
             f"never trained on). {r['note']} Measured {env['date'][:10]} on {env['cpu_cores']} CPU cores, commit "
             f"`{env['git_commit'][:8]}`, by `{r['command']}` → `benchmarks/results/shrink_curve.json`."]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
