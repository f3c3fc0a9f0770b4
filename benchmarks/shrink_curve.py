"""The shrink curve of the default teacher -> benchmarks/results/shrink_curve.json + docs/img/shrink_curve.png.

    python benchmarks/shrink_curve.py          # runs `edgestill sweep --device host --out runs/sweep-smollm2-135m`
    python benchmarks/shrink_curve.py --copy   # only copy a finished sweep's results (no training)
    python benchmarks/shrink_curve.py --redraw [--name shrink_curve_levers]
        # no runs: redraw docs/img/NAME.png from the committed benchmarks/results/NAME.json
    python benchmarks/shrink_curve.py --name shrink_curve_levers --out runs/sweep-levers \
        --formats q8_0,q5_0,q4_0,q3_k student.trim_vocab=true
        # the planner with the trimmed vocabulary and formats under 4 bits -> shrink_curve_levers.json / .png
    python benchmarks/shrink_curve.py --name shrink_curve_q3k --out runs/sweep-q3k --budgets 1/8,1/12 \
        --formats q8_0,q5_0,q4_0,q3_k
        # Q3_K without the trim at two budgets: which of the two levers gave what (copy the lever sweep's
        # sensitivity.json, baseline.json and baseline/ into runs/sweep-q3k first and both are reused, not redone)
    python benchmarks/shrink_curve.py --name shrink_curve_trim --out runs/sweep-trim --budgets 1/8,1/12 \
        student.trim_vocab=true
        # the trim without Q3_K at the same two budgets (the same copies; its three formats are read from the
        # lever sweep's four-format sensitivities)
    python benchmarks/shrink_curve.py --name shrink_curve_hidden --out runs/sweep-hidden --budgets 1/24 \
        --formats q8_0,q5_0,q4_0,q3_k --hidden-sizes 576,288 student.trim_vocab=true
        # every lever and the hidden-channel cut (288: the only size both GGUF's blocks and the 9 heads divide)
        # at the tightest budget (the same copies first)

The sweep itself is the user command (`edgestill sweep`, resumable: rerun after a kill and it continues);
this script runs it and files its shrink_curve.json and plot where the README reads them. Teacher smollm2-135m
(a 98.4 MB Q4_1 GGUF), corrected on the training plays (the reference every figure is measured against), corpus
shakespeare, held-out split = the test plays (never trained on), out of domain = general English news.
About 2 hours on 2 idle CPU cores for the six default budgets (2 h 2 min at 46c2d5f, from a bare machine).

Provenance is per row: a resumed sweep's points were measured at different times, perhaps by different code. Each
edgestill row carries the environment of its own run (its metrics.json: commit, git_dirty, date, CPU, threads, load
average before and after); each llama.cpp and original-file row the environment it was scored in (the sweep's
baseline.json); the result's `environment` is the sweep's own (the commit it started from, its start and end),
not this copy step's, which is kept apart as `copied_by`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import START, write_result

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"


def run_metrics(point: dict) -> dict | None:
    """The metrics.json of an edgestill row's run, or None (a llama.cpp or original-file row, a run folder gone)."""
    path = Path(point.get("detail", {}).get("run", "")) / "metrics.json"
    return json.loads(path.read_text()) if point["series"] == "edgestill" and path.is_file() else None


def row_environment(point: dict, metrics: dict | None) -> dict | None:
    """Where and with which code this row was measured: the point's own record, else (an edgestill point of an
    older sweep) its run's metrics; None when neither says."""
    from edgestill.evaluate.shrink_curve import provenance

    env = point.get("environment")
    if env is None and metrics is not None:
        env = metrics.get("environment")
    return provenance(env)


def row_selection(point: dict, metrics: dict | None) -> dict | None:
    """Which evaluated state an edgestill row's run kept (distill.select): {select, selected_step, last_step}, from
    its run's metrics (else what the row already says); None for a llama.cpp or original-file row, or a run from
    before checkpoint selection."""
    if metrics is None:
        return point.get("selection")
    sel = (metrics.get("train") or {}).get("selection")
    return None if not sel else {k: sel.get(k) for k in ("select", "selected_step", "last_step")}


def redraw(result: dict, path: Path) -> None:
    """Draw the four-panel curve of a filed result (benchmarks/results/NAME.json) into `path`, as the sweep drew
    it from its points: the same bars (the result's thresholds), title and original-file size."""
    from edgestill.evaluate.shrink_curve import ShrinkPoint, criteria, plot_fidelity_curve

    points = [ShrinkPoint.from_dict(p) for p in result["points"]]
    t = result["thresholds"]
    bars = criteria(retention=t.get("retention", []), top1=t.get("top1_agreement", []), kl=t.get("kl_teacher_student", []))
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_fidelity_curve(points, path, bars, result.get("title", ""), (result.get("source_file") or {}).get("bytes"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/sweep-smollm2-135m", help="the sweep folder")
    ap.add_argument("--name", default="shrink_curve",
                    help="file the result as benchmarks/results/NAME.json and docs/img/NAME.png (default: shrink_curve, "
                         "the README's first-screen curve)")
    ap.add_argument("--device", default="host")
    ap.add_argument("--copy", action="store_true", help="do not run the sweep; file the results of a finished one")
    ap.add_argument("--redraw", action="store_true",
                    help="no runs: redraw docs/img/NAME.png from the committed benchmarks/results/NAME.json")
    ap.add_argument("--formats", help="the formats plans may use (the sweep's --formats; default: its default)")
    ap.add_argument("--budgets", help="the sweep's --budgets (default: its default, 1/4 ... 1/24 of fp32)")
    ap.add_argument("--hidden-sizes", help="the sweep's --hidden-sizes (default: the teacher's hidden alone)")
    ap.add_argument("--probe-steps", type=int, help="the sweep's --probe-steps (default: 0, no recovery probe)")
    ap.add_argument("overrides", nargs="*", help="config overrides for every point, e.g. student.trim_vocab=true")
    args = ap.parse_args()
    if args.redraw:
        filed = ROOT / "benchmarks" / "results" / f"{args.name}.json"
        if not filed.is_file():
            sys.exit(f"{filed} does not exist: nothing to redraw (run python benchmarks/shrink_curve.py --name {args.name})")
        redraw(json.loads(filed.read_text()), IMG / f"{args.name}.png")
        print(f"wrote {IMG / f'{args.name}.png'}")
        return
    argv = ["sweep", "--device", args.device, "--out", args.out, *(["--formats", args.formats] if args.formats else []),
            *(["--budgets", args.budgets] if args.budgets else []),
            *(["--hidden-sizes", args.hidden_sizes] if args.hidden_sizes else []),
            *(["--probe-steps", str(args.probe_steps)] if args.probe_steps else []), *args.overrides]
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
    if "reference" not in result:
        sys.exit(f"{curve} was written before the sweep measured against the corrected teacher (no 'reference'): "
                 "rerun the sweep (python benchmarks/shrink_curve.py) rather than filing it")
    for point in result["points"]:
        metrics = run_metrics(point)
        point["environment"] = row_environment(point, metrics)
        point["selection"] = row_selection(point, metrics)
    plans = json.loads((out / "plans.json").read_text())
    from edgestill.evaluate.environment import environment

    write_result(args.name, {"command": "edgestill " + " ".join(argv), "sweep_folder": str(out),
                                  "plans": plans["plans"], **result,  # its `environment`: the sweep's own
                                  "copied_by": environment(start=START)})
    plot = IMG / f"{args.name}.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    tmp = plot.with_suffix(".png.tmp")
    shutil.copyfile(out / "shrink_curve.png", tmp)
    tmp.replace(plot)
    print(f"wrote {plot}")


_OLD = ("_benchmarks/results/shrink_curve.json predates the honest shrink curve (no corrected reference, no fidelity "
        "break points): rerun `python benchmarks/shrink_curve.py`._")


def _mb(bp: dict | None) -> str:
    return "no file" if bp is None else f"{bp['bytes'] / 1e6:.1f} MB ({bp['name']})"


def shrink_curve_summary(r: dict) -> str:
    """One paragraph: the break points, edgestill beside llama.cpp (the README's first screen)."""
    if "reference" not in r:
        return _OLD
    src = r["source_file"]["bytes"]
    parts = []
    for bp in r["break_points"].values():
        ours = bp.get("edgestill")
        gain = ""
        if ours and src:  # a file bigger than the one the user started from is said to be bigger, not "0.7× smaller"
            x = src / ours["bytes"]
            gain = (f", **{x:.2f}× smaller than the original file**" if x >= 1
                    else f", **{1 / x:.2f}× the original file's bytes**")
        label = bp["description"].split(" (")[0]
        parts.append(f"{label}: edgestill {_mb(ours)}{gain}; llama.cpp {_mb(bp.get('llama.cpp'))}")
    against = "the corrected teacher" if r["reference"] == "corrected" else "the teacher"
    return (f"Break points (the smallest file meeting each bar, against {against}; the original file is "
            f"{src / 1e6:.1f} MB): " + "; ".join(parts) + ".")


def _f(x, fmt: str = "{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


def shrink_curve_table(r: dict) -> str:
    """README table: every point of every series (largest first), then the break points and the provenance."""
    if "reference" not in r:
        return _OLD
    head = ("| series | model | MB | × fp16 | × original file | KL | top-1 | retention | KL, out of domain | "
            "top-1, out of domain | retention, out of domain |")
    rows = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {"original file": 0, "edgestill": 1, "llama.cpp": 2}
    commits = set()
    for p in sorted(r["points"], key=lambda p: (order.get(p["series"], 3), -p["bytes"])):
        ood, env = p.get("out_of_domain") or {}, p.get("environment") or {}
        commits.add((env.get("git_commit") or "unknown")[:8] + (" (uncommitted changes)" if env.get("git_dirty") else ""))
        rows.append(f"| {p['series']} | {p['name']} | {p['bytes'] / 1e6:.1f} | {_f(p.get('compression_x_fp16'), '{:.2f}')} | "
                    f"{_f(p.get('compression_x_source'), '{:.2f}')} | {_f(p.get('kl_teacher_student'), '{:.3g}')} | "
                    f"{p['top1_agreement']:.3f} | {p['retention']:.3f} | {_f(ood.get('kl_teacher_student'), '{:.3g}')} | "
                    f"{_f(ood.get('top1_agreement'))} | {_f(ood.get('retention'))} |")
    env, ood = r["environment"], r.get("out_of_domain")
    against = ("the corrected teacher (fine-tuned on the training plays)" if r["reference"] == "corrected"
               else "the teacher as given")
    ood_text = (f" Out of domain: {ood['tokens']:,} tokens of {ood['source']} (reference perplexity "
                f"{ood['reference_perplexity']:.2f})." if ood else " Out of domain: not measured.")
    rows += ["", shrink_curve_summary(r),
             (f"Every figure is against {against}: reference perplexity {r['reference_perplexity']:.2f} on "
             f"{r['held_out_tokens']:,} held-out tokens (test plays, never trained on).{ood_text} {r['note']} "
             f"Sweep started {(env.get('date_start') or env['date'])[:10]} at commit `{(env['git_commit'] or '?')[:8]}`"
             f"{' (uncommitted changes)' if env.get('git_dirty') else ''} on {env['cpu_cores']} CPU cores, by "
             f"`{r['command']}`; rows measured at commit(s) {', '.join(f'`{c}`' for c in sorted(commits))} (each row's "
             f"environment is in `benchmarks/results/{r.get('benchmark', 'shrink_curve')}.json`).")]
    return "\n".join(rows)


def _points_by_budget(r: dict) -> dict[float, tuple[int, dict]]:
    """{budget fraction of the fp32 teacher: (budget bytes, the edgestill point that ran its plan)} of a sweep."""
    out = {}
    for plan in r.get("plans", []):
        for p in r["points"]:
            d = p.get("detail", {})
            if p["series"] == "edgestill" and d.get("plan", {}).get("layers") == plan["plan"]["layers"] \
                    and d.get("predicted_file_bytes") == plan["plan"]["prediction"]["file_bytes"]:
                out[plan["budget_fraction"]] = (plan["max_file_bytes"], p)
    return out


def _student(plan: dict) -> str:
    """'30 layers, FFN 1536, vocabulary 19,254, 16 q3_k + 12 q4_0 + 3 q5_0' from a plan dict (', hidden 288' after
    the layers when the plan cuts hidden channels)."""
    from collections import Counter

    from edgestill.plan.allocate import Plan, hidden_note

    pl = Plan.from_dict(plan)
    mix = " + ".join(f"{n} {f}" for f, n in Counter(pl.unit_formats().values()).most_common())
    vocab = f", vocabulary {pl.vocab['size']:,}" if pl.vocab else ""
    return f"{pl.shape.layers} layers{hidden_note(pl.shape)}, FFN {pl.shape.intermediate}{vocab}, {mix}"


def _kept(p: dict) -> str:
    """The training step whose state the point's run kept, of how many (distill.select)."""
    sel = p.get("selection")
    return f"{sel['selected_step']} of {sel['last_step']}" if sel else "the last (before selection)"


def _ood(p: dict) -> float:
    """A point's out-of-domain retention (0 when not measured)."""
    return (p.get("out_of_domain") or {}).get("retention", 0.0)


def _target(r: dict) -> str:
    """Issue 15's two targets, checked on one sweep's points against its own llama.cpp Q4_K_M."""
    ours = [p for p in r["points"] if p["series"] == "edgestill"]
    q4km = next((p for p in r["points"] if p["series"] == "llama.cpp" and p["name"].endswith("Q4_K_M")), None)
    f16 = ours[0]["bytes"] * ours[0]["compression_x_fp16"] if ours and ours[0].get("compression_x_fp16") else None
    parts = []
    if f16:
        tenth = [p for p in ours if p["bytes"] <= f16 / 10]
        met = [p for p in tenth if p["retention"] >= 0.95 and _ood(p) >= 0.90]
        best = max(tenth, key=lambda p: p["retention"], default=None)
        verdict = (f"yes ({met[0]['name']})" if met else "**no** (no point that small)" if best is None else
                   f"**no** (the best point that small, {best['name']} at {best['bytes'] / 1e6:.1f} MB, keeps "
                   f"{best['retention']:.3f} / {_ood(best):.3f})")
        parts.append(f"≤ 10% of the F16 teacher ({f16 / 10e6:.1f} MB) keeping ≥ 95% retention in domain and ≥ 90% out of "
                     f"domain: {verdict}")
    if q4km:
        half = [p for p in ours if p["bytes"] <= q4km["bytes"] / 2]
        met = [p for p in half if p["retention"] >= q4km["retention"] and p["top1_agreement"] >= q4km["top1_agreement"]]
        best = max(half, key=lambda p: p["retention"], default=None)
        parts.append(f"at ≤ half of llama.cpp's Q4_K_M ({q4km['bytes'] / 2e6:.1f} MB), its retention "
                     f"{q4km['retention']:.3f} and top-1 {q4km['top1_agreement']:.3f} or better: "
                     + (f"yes ({met[0]['name']})" if met else
                        f"**no** (best: {best['name']} at {best['bytes'] / 1e6:.1f} MB, retention {best['retention']:.3f}, "
                        f"top-1 {best['top1_agreement']:.3f})" if best else "**no** (no point that small)"))
    return "Target: " + "; ".join(parts) + "." if parts else ""


def shrink_curve_compare(levers: dict, *others: tuple[str, dict | None]) -> str:
    """The lever sweep (trimmed vocabulary, formats under 4 bits) beside other sweeps of the same budgets (name,
    result; a missing result is left out), budget by budget, then issue 15's targets checked on the lever sweep."""
    if "reference" not in levers:
        return _OLD
    rows = ["| budget | sweep (commit) | student | MB | × F16 | step kept | KL | top-1 | retention | "
            "KL, out of domain | retention, out of domain |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    curves = [("trim + Q3_K", levers)] + [(name, r) for name, r in others if r and "reference" in r]
    by = {name: _points_by_budget(r) for name, r in curves}
    dropped = {name: {d["budget_fraction"]: d for d in r.get("dropped_budgets") or []} for name, r in curves}
    for f in sorted({f for b in [*by.values(), *dropped.values()] for f in b}, reverse=True):
        for name, _r in curves:
            if f in dropped[name] and f not in by[name]:
                d = dropped[name][f]
                why = re.search(r"the smallest student .*? needs an? [\d.]+\s?MB file", d["reason"])
                rows.append(f"| {d['max_file_bytes'] / 1e6:.1f} MB (1/{1 / f:.0f} of fp32) | {name} | no student: "
                            f"{why.group(0) if why else d['reason']} | | | | | | | | |")
            if f not in by[name]:
                continue
            budget, p = by[name][f]
            ood, env = p.get("out_of_domain") or {}, p.get("environment") or {}
            rows.append(f"| {budget / 1e6:.1f} MB (1/{1 / f:.0f} of fp32) | {name} (`{(env.get('git_commit') or '?')[:8]}`) | "
                        f"{_student(p['detail']['plan'])} | {p['bytes'] / 1e6:.1f} | "
                        f"{_f(p.get('compression_x_fp16'), '{:.2f}')} | {_kept(p)} | "
                        f"{_f(p.get('kl_teacher_student'), '{:.3g}')} | {p['top1_agreement']:.3f} | {p['retention']:.3f} | "
                        f"{_f(ood.get('kl_teacher_student'), '{:.3g}')} | {_f(ood.get('retention'))} |")
    return "\n".join(rows + ["", _target(levers)])

if __name__ == "__main__":
    main()
