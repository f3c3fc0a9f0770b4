"""The planner's recovery probe (plan/probe.py) at one budget: does ranking the best plans by their KL after a few
KD steps pick the student that trains better?

    python benchmarks/recovery_probe.py                       # 1/24 of the fp32 bytes, hidden 576 and 288 (~15 min)
    python benchmarks/recovery_probe.py --probe-steps 40 --probe-top 4
    python benchmarks/recovery_probe.py --budget 1/16 --hidden-sizes 576 --name recovery_probe_33mb
-> benchmarks/results/recovery_probe.json (or NAME.json)

One `edgestill plan` call on the corrected default teacher, with the candidates and formats of the hidden-cut sweep
(benchmarks/results/shrink_curve_hidden.json): every feasible plan with its KL as cut and its predicted KL, and for
the `--probe-top` best the probe's KD losses, its KL after `--probe-steps` steps and its wall time. Each probed plan
that a committed sweep trained (the same teacher layers, hidden size and FFN width, in shrink_curve_*.json) carries
that point's measured KL, top-1 and retention after its full recovery, with the file and commit it came from: the
check that the probe's order is the trained order. Plans no sweep trained say so.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def trained_points() -> list[dict]:
    """Every edgestill point of a committed shrink-curve result, with the plan it ran and the file it is in."""
    out = []
    for path in sorted(RESULTS.glob("shrink_curve*.json")):
        for p in json.loads(path.read_text()).get("points", []):
            plan = (p.get("detail") or {}).get("plan") if isinstance(p.get("detail"), dict) else None
            if p.get("series") == "edgestill" and plan:
                out.append({"file": f"benchmarks/results/{path.name}", "name": p["name"], "plan": plan,
                            "bytes": p.get("bytes"), "kl_teacher_student": p.get("kl_teacher_student"),
                            "top1_agreement": p.get("top1_agreement"), "retention": p.get("retention"),
                            "out_of_domain_retention": (p.get("out_of_domain") or {}).get("retention"),
                            "train_tokens": p.get("train_tokens"),
                            "git_commit": (p.get("environment") or {}).get("git_commit")})
    return out


def _same_shape(a: dict, b: dict) -> bool:
    """The same student as cut: teacher layers, hidden size, FFN width, and trimmed or not (formats may differ)."""
    return (a["layers"] == b["layers"] and a["shape"]["hidden"] == b["shape"]["hidden"]
            and a["intermediate_size"] == b["intermediate_size"]
            and (a.get("vocab") is None) == (b.get("vocab") is None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--budget", default="1/24", help="file budget as a fraction of the teacher's fp32 bytes")
    ap.add_argument("--hidden-sizes", default="576,288")
    ap.add_argument("--formats", default="q8_0,q5_0,q4_0,q3_k")
    ap.add_argument("--no-trim", action="store_true", help="plan with the teacher's whole vocabulary")
    ap.add_argument("--probe-steps", type=int, default=20)
    ap.add_argument("--probe-top", type=int, default=3)
    ap.add_argument("--name", default="recovery_probe", help="file the result as benchmarks/results/NAME.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the planner's candidates and probes

    from edgestill.config import DataConfig, TeacherConfig
    from edgestill.jobs import plan as plan_job
    from edgestill.plan.allocate import Budget
    from edgestill.plan.probe import RecoveryProbe

    num, _, den = args.budget.partition("/")
    fraction = float(num) / float(den or 1)
    loaded, gguf = plan_job._teacher_and_gguf(args.teacher)
    teacher_bytes = 4 * sum(p.numel() for p in loaded.model.parameters())
    budget = Budget(max_file_bytes=int(teacher_bytes * fraction))  # as the sweep sets it
    t0 = time.perf_counter()
    plans = plan_job._plan(loaded, gguf, "host", budget, DataConfig(), correction=TeacherConfig().correction(),
                           trim_vocab=not args.no_trim, formats=tuple(args.formats.split(",")),
                           hiddens=[int(h) for h in args.hidden_sizes.split(",")],
                           probe=RecoveryProbe(steps=args.probe_steps, top=args.probe_top))
    wall = time.perf_counter() - t0
    points = trained_points()
    as_cut = sorted(plans, key=lambda p: p.predicted_kl)
    rows = []
    for p in plans:
        d = p.to_dict()
        trained = [t for t in points if _same_shape(t["plan"], d)]
        rows.append({"summary": p.summary(), "layers": p.shape.layers, "hidden": p.shape.hidden,
                     "ffn": p.shape.intermediate, "file_bytes": p.prediction.file_bytes,
                     "rank_as_cut": as_cut.index(p) + 1, "rank": plans.index(p) + 1,
                     "structural_kl": p.structural_kl, "quantization_kl": p.quantization_kl,
                     "predicted_kl": p.predicted_kl, "recovery": p.recovery, "plan": d, "trained": trained})
        if p.recovery:
            print(f"{rows[-1]['rank']}. (as cut: {rows[-1]['rank_as_cut']}) {p.summary()}"
                  + "".join(f"\n   trained in {t['file']} ({t['name']}): KL {t['kl_teacher_student']:.3f}, top-1 "
                            f"{t['top1_agreement']:.3f}, retention {t['retention']:.3f}" for t in trained))
    write_result(args.name, {
        "command": "python benchmarks/recovery_probe.py " + " ".join(sys.argv[1:]), "teacher": args.teacher,
        "reference": "corrected", "budget_fraction": fraction, "max_file_bytes": budget.max_file_bytes,
        "formats": args.formats.split(","), "hidden_sizes": [int(h) for h in args.hidden_sizes.split(",")],
        "trim_vocab": not args.no_trim, "probe": RecoveryProbe(steps=args.probe_steps, top=args.probe_top).to_dict(),
        "probe_wall_s": [x["recovery"]["wall_s"] for x in rows if x["recovery"]], "plan_wall_s": wall, "plans": rows,
        "note": "rank_as_cut orders by predicted KL (structural + quantization, before any training); rank by the KL "
                "after the probe + quantization for the probed plans. `trained`: committed sweep points of the same "
                "teacher layers, hidden size and FFN width (their formats may differ), after their full recovery."})


if __name__ == "__main__":
    main()
