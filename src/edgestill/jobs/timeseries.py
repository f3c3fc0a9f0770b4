"""`edgestill shrink --task timeseries`: a tiny remaining-useful-life student for a machine's sensor series,
trained together with its teacher (online distillation, [10] in docs/references.md), exported to int8 ONNX.

    1. data      run-to-failure units split by unit (data/timeseries.py), windows of the normalised sensors
    2. train     kd.method (distill/online.py): alone | offline | online | mutual. `alone` and `offline` train
                 the teacher alone first; `online` and `mutual` train teacher and student at the same time
    3. export    teacher.onnx (float, for its latency), student.f32.onnx and student.onnx (static int8, QDQ)
                 (export/onnx_series.py)
    4. measure   test RMSE and PHM score of teacher and student, in PyTorch and in onnxruntime; bytes; batch-1
                 latency in onnxruntime
    5. stream    the deployed student keeps learning from the teacher's predictions as the test units' readings
                 arrive in time order (no labels); prequential error, against the frozen student
    6. report    metrics.json, report.md, rul_test_units.png (predicted against true RUL), stream.png

The run folder is written as OUT.partial and moved into place when it finishes; training checkpoints every
epoch and a rerun of the same command resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgestill.config import TimeseriesConfig, plain
from edgestill.errors import EdgestillError
from edgestill.files import write_json_atomic, write_text_atomic
from edgestill.runs import RunDir

log = logging.getLogger(__name__)


def phm_score(pred: np.ndarray, true: np.ndarray) -> float:
    """The PHM08 scoring function ([saxena2008] in docs/references.md) per prediction (the mean over predictions;
    the challenge sums over units): exp(-d/13) - 1 for an early prediction (d = pred - true < 0), exp(d/10) - 1
    for a late one, which costs more."""
    d = np.asarray(pred, np.float64) - np.asarray(true, np.float64)
    return float(np.mean(np.where(d < 0, np.exp(-d / 13) - 1, np.exp(d / 10) - 1)))


def scores(pred_cycles: np.ndarray, true_cycles: np.ndarray) -> dict:
    d = np.asarray(pred_cycles, np.float64) - true_cycles
    return {"rmse": float(np.sqrt(np.mean(d ** 2))), "mae": float(np.mean(np.abs(d))),
            "phm_score": phm_score(pred_cycles, true_cycles), "n": int(len(d))}


def check(cfg: TimeseriesConfig) -> None:
    from edgestill.models.sequence import RULConvStudent

    cfg.kd.check()
    cfg.train.check()
    cfg.student.check()
    field = RULConvStudent.receptive_field(cfg.student)
    if cfg.data.window < field:
        raise EdgestillError(f"data.window={cfg.data.window} is shorter than the student's receptive field "
                             f"({field} cycles for student.kernel={cfg.student.kernel}); raise data.window "
                             f"or lower student.kernel")
    if cfg.teacher.d_model % cfg.teacher.heads:
        raise EdgestillError(f"teacher.d_model={cfg.teacher.d_model} must be a multiple of teacher.heads={cfg.teacher.heads}")
    if cfg.eval.latency_windows < 1 or cfg.eval.latency_repeats < 1:
        raise EdgestillError("eval.latency_windows and eval.latency_repeats must be >= 1")


class Prepared:
    """The data of one run: splits, the training units' normaliser, and the windows of each split."""

    def __init__(self, cfg: TimeseriesConfig):
        from edgestill.data.timeseries import Normalizer, load_series, make_windows

        self.splits = load_series(cfg.data)
        self.norm = Normalizer.fit(self.splits.train)
        self.cap = cfg.data.rul_cap
        self.windows = {name: make_windows(units, self.norm, cfg.data.window, self.cap) for name, units in self.splits.parts()}
        self.sensors = len(self.splits.sensors)

    def xy(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        w = self.windows[split]
        return w.x, w.y / self.cap  # targets as fractions of the cap, the scale the models train on


def build_models(cfg: TimeseriesConfig, sensors: int, seed: int):
    import torch

    from edgestill.models.sequence import RULConvStudent, RULTransformer

    torch.manual_seed(seed)
    teacher = RULTransformer(sensors, cfg.data.window, cfg.teacher)
    torch.manual_seed(seed + 1)
    student = RULConvStudent(sensors, cfg.data.window, cfg.student)
    return teacher, student


def train_pair(cfg: TimeseriesConfig, data: Prepared, teacher, student, work: Path | None) -> dict:
    """Train teacher and student as cfg.kd.method says; both end in their best validation state."""
    from edgestill.distill.online import train

    tx, ty = data.xy("train")
    vx, vy = data.xy("val")
    method = cfg.kd.method
    out = {}
    ckpt = (lambda name: work / name) if work is not None else (lambda name: None)
    if method in ("alone", "offline"):
        alone = dataclasses.replace(cfg.kd, method="alone")
        out["teacher"] = train(None, teacher, tx, ty, vx, vy, alone, cfg.train, ckpt("ckpt-teacher"), "teacher alone")
        if method == "alone":
            out["student"] = train(student, None, tx, ty, vx, vy, alone, cfg.train, ckpt("ckpt-student"), "student alone")
        else:
            out["student"] = train(student, teacher, tx, ty, vx, vy, cfg.kd, cfg.train, ckpt("ckpt-student"),
                                   "student (offline KD)")
    else:
        both = train(student, teacher, tx, ty, vx, vy, cfg.kd, cfg.train, ckpt("ckpt-pair"), f"teacher + student ({method})")
        out["pair"] = both
    return out


def _history_best(trained: dict, who: str) -> dict:
    for key in (who, "pair"):
        if key in trained and who in trained[key]["best"]:
            return {**trained[key]["best"][who], "epochs": trained[key]["epochs"]}
    return {}


def plot_units(path: Path, data: Prepared, preds: dict[str, np.ndarray], n_units: int) -> None:
    """Predicted against true (capped) RUL over the life of `n_units` test units of spread-out lengths."""
    import matplotlib

    from edgestill.evaluate.report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = data.windows["test"]
    units = data.splits.test
    picked = sorted(range(len(units)), key=lambda k: len(units[k].rul))
    picked = [picked[int(i)] for i in np.linspace(0, len(picked) - 1, min(n_units, len(picked)))]
    fig, axes = plt.subplots(1, len(picked), figsize=(3.6 * len(picked), 3.2), squeeze=False)
    for ax, k in zip(axes[0], picked):
        rows = w.unit == k
        ax.plot(w.cycle[rows], w.y[rows], color="black", lw=2, label="true RUL (capped)")
        for name, p in preds.items():
            ax.plot(w.cycle[rows], p[rows], lw=1, label=name)
        ax.set_title(f"unit {units[k].id.split(':', 1)[-1]}")
        ax.set_xlabel("cycle")
    axes[0][0].set_ylabel("RUL (cycles)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def stream(cfg: TimeseriesConfig, data: Prepared, teacher, student) -> dict:
    """The test units as a fleet's stream (data/timeseries.stream_order): the frozen student against one that
    keeps learning from the teacher's predictions; prequential RMSE in tenths of the stream."""
    from edgestill.data.timeseries import stream_order
    from edgestill.distill.online import predict, stream_update

    w = data.windows["test"]
    offsets = np.concatenate([[0], np.cumsum([len(u.rul) for u in data.splits.test])])
    order = [int(offsets[k] + i) for k, i in stream_order(data.splits.test)]
    frozen = predict(student, w.x)[order] * data.cap
    learner = copy.deepcopy(student)
    learning = stream_update(learner, teacher, w.x, order, lr=cfg.eval.stream_lr, batch=cfg.eval.stream_batch) * data.cap
    true = w.y[order]
    edges = np.linspace(0, len(order), 11).astype(int)
    parts = [{"from": int(a), "to": int(b), "frozen_rmse": scores(frozen[a:b], true[a:b])["rmse"],
              "learning_rmse": scores(learning[a:b], true[a:b])["rmse"]} for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return {"windows": len(order), "lr": cfg.eval.stream_lr, "batch": cfg.eval.stream_batch,
            "frozen": scores(frozen, true), "learning": scores(learning, true),
            "second_half": {"frozen": scores(frozen[len(order) // 2:], true[len(order) // 2:])["rmse"],
                            "learning": scores(learning[len(order) // 2:], true[len(order) // 2:])["rmse"]},
            "tenths": parts}


def _plot_stream(path: Path, result: dict) -> None:
    import matplotlib

    from edgestill.evaluate.report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [(p["from"] + p["to"]) / 2 for p in result["tenths"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(x, [p["frozen_rmse"] for p in result["tenths"]], marker="o", label="frozen student")
    ax.plot(x, [p["learning_rmse"] for p in result["tenths"]], marker="o", label="learning from the teacher")
    ax.set_xlabel("readings arrived (test units, in time order)")
    ax.set_ylabel("RMSE (cycles), prequential")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def export_and_measure(cfg: TimeseriesConfig, data: Prepared, exports: dict[str, tuple], folder: Path) -> tuple[dict, dict]:
    """exports: {key: (model, file name, int8)}. Each model becomes a float ONNX file; with int8, that float file
    is `<stem>.f32.onnx` and the file named is its static int8 version, calibrated on 512 training windows. Every
    file is scored on the test windows in onnxruntime and timed at batch 1, all in one alternated measurement.
    Returns ({key: file, bytes, test scores, latency}, {key: test predictions in cycles})."""
    from edgestill.export.onnx_series import INPUT, export_float, onnx_predict, quantize_int8
    from edgestill.runtime.onnx import measure_latency, onnx_session

    window, cap = cfg.data.window, data.cap
    train_x = data.windows["train"].x
    calib = train_x[np.random.default_rng(0).permutation(len(train_x))[:512]]
    files, floats = {}, {}
    for key, (model, name, int8) in exports.items():
        float_path = folder / (name.removesuffix(".onnx") + ".f32.onnx" if int8 else name)
        if float_path not in floats:  # a model exported as float and as int8 is exported once
            floats[float_path] = export_float(model, window, data.sensors, cap, float_path)
        files[key] = quantize_int8(float_path, folder / name, calib) if int8 else float_path
    sessions = {key: onnx_session(path, cfg.eval.threads) for key, path in files.items()}
    test = data.windows["test"]
    preds = {key: onnx_predict(session, test.x) for key, session in sessions.items()}
    feeds = [{INPUT: test.x[i:i + 1]} for i in np.linspace(0, len(test) - 1, cfg.eval.latency_windows).astype(int)]
    latency = measure_latency({key: (s, feeds) for key, s in sessions.items()}, repeats=cfg.eval.latency_repeats)
    out = {key: {"file": path.name, "bytes": path.stat().st_size, "test": scores(preds[key], test.y),
                 "latency_ms": latency[key]["latency_ms_per_example"],
                 "latency_ms_spread": latency[key]["latency_ms_spread"]} for key, path in files.items()}
    return out, preds


def _summary(m: dict) -> str:
    t, s, q = m["teacher"]["test"], m["student"]["test"], m["onnx"]["student_int8"]
    return (f"teacher RMSE {t['rmse']:.2f} cycles ({m['onnx']['teacher_f32']['bytes'] / 1024:.0f} KB); student "
            f"({m['kd']['method']}) int8 RMSE {q['test']['rmse']:.2f} ({m['onnx']['student_int8']['bytes'] / 1024:.1f} KB, "
            f"{m['x_smaller']:.0f}x smaller, {m['x_faster']:.1f}x faster); PyTorch student {s['rmse']:.2f}")


def _report(m: dict) -> str:
    o = m["onnx"]
    lines = [f"# RUL student: {m['data']['source']}", "",
             f"Method: **{m['kd']['method']}** (distill/online.py). Units: {m['data']['train_units']} train / "
             f"{m['data']['val_units']} validation / {m['data']['test_units']} test, disjoint; targets capped at "
             f"{m['rul_cap']:g} cycles; window {m['window']} cycles.", ""]
    for note in m["data"]["notes"]:
        lines += [f"Note: {note}.", ""]
    lines += ["| model | file | bytes | test RMSE (cycles) | PHM score / prediction | latency, batch 1 (ms) |",
              "|---|---|---:|---:|---:|---:|"]
    for name, label in (("teacher_f32", "teacher (float)"), ("student_f32", "student (float)"),
                        ("student_int8", "student (int8, deployed)")):
        r = o[name]
        lines.append(f"| {label} | {r['file']} | {r['bytes']:,} | {r['test']['rmse']:.2f} | {r['test']['phm_score']:.3f} | "
                     f"{r['latency_ms']:.3f} |")
    lines += ["", f"Student int8 is **{m['x_smaller']:.0f}x smaller** than the teacher's file and **{m['x_faster']:.1f}x "
                  f"faster**; its RMSE is {m['rmse_ratio']:.3f}x the teacher's ({'within' if m['within_5pct'] else 'not within'}"
                  f" 5%). Parameters: teacher {o['params']['teacher']:,}, student {o['params']['student']:,}.", ""]
    if m.get("stream"):
        st = m["stream"]
        lines += ["## After deployment: learning from the teacher on the stream", "",
                  f"{st['windows']:,} test readings in time order; each is predicted before the student learns from it "
                  f"(no labels, only the teacher's prediction). RMSE frozen {st['frozen']['rmse']:.2f}, learning "
                  f"{st['learning']['rmse']:.2f}; second half of the stream: frozen {st['second_half']['frozen']:.2f}, "
                  f"learning {st['second_half']['learning']:.2f}. Plot: stream.png.", ""]
    lines += ["Predicted against true RUL on test units: rul_test_units.png.", ""]
    return "\n".join(lines)


def shrink_timeseries(cfg: TimeseriesConfig, overwrite: bool = False) -> tuple[Path, dict]:
    """The whole job (module docstring). Returns (the finished run folder, its metrics)."""
    import torch
    from safetensors.torch import save_file

    from edgestill.distill.online import predict
    from edgestill.evaluate.environment import environment, measurement_start
    from edgestill.models.sequence import parameter_count

    start = measurement_start()
    check(cfg)
    data = Prepared(cfg)
    cfg.output_dir = cfg.output_dir or f"runs/shrink-timeseries-{Path(cfg.data.path).stem}"
    run = RunDir(cfg.output_dir, plain(cfg), overwrite=overwrite)
    resumed = run.open()
    log.info("%s run folder %s", "resuming" if resumed else "new", run.path)
    torch.set_num_threads(cfg.eval.threads)
    with run.cleanup_on_failure():
        teacher, student = build_models(cfg, data.sensors, cfg.train.seed)
        trained = train_pair(cfg, data, teacher, student, run.path)
        for name, model in (("teacher", teacher), ("student", student)):
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run.path / f"{name}.safetensors"))
        test = data.windows["test"]
        preds = {name: predict(model, test.x) * data.cap for name, model in (("teacher", teacher), ("student", student))}
        onnx, onnx_preds = export_and_measure(cfg, data, {
            "teacher_f32": (teacher, "teacher.onnx", False), "student_f32": (student, "student.f32.onnx", False),
            "student_int8": (student, "student.onnx", True)}, run.path)
        onnx["params"] = {"teacher": parameter_count(teacher), "student": parameter_count(student)}
        streamed = stream(cfg, data, teacher, student) if cfg.eval.stream else None
        t_rmse, q = scores(preds["teacher"], test.y)["rmse"], onnx["student_int8"]
        metrics = {
            "task": "timeseries", "data": data.splits.record(), "window": cfg.data.window, "rul_cap": data.cap,
            "normalizer": asdict(data.norm), "kd": asdict(cfg.kd), "train": asdict(cfg.train),
            "teacher": {"test": scores(preds["teacher"], test.y), "val": _history_best(trained, "teacher")},
            "student": {"test": scores(preds["student"], test.y), "val": _history_best(trained, "student")},
            "onnx": onnx,
            "x_smaller": onnx["teacher_f32"]["bytes"] / q["bytes"],
            "x_smaller_params": onnx["params"]["teacher"] / onnx["params"]["student"],
            "x_faster": onnx["teacher_f32"]["latency_ms"] / q["latency_ms"],
            "rmse_ratio": q["test"]["rmse"] / t_rmse if t_rmse > 0 else math.inf,
            "history": {k: v["history"] for k, v in trained.items()},
            "stream": streamed, "environment": environment(cfg.eval.threads, start),
        }
        metrics["within_5pct"] = metrics["rmse_ratio"] <= 1.05
        plot_units(run.path / "rul_test_units.png", data,
                   {"teacher": preds["teacher"], "student (PyTorch)": preds["student"],
                    "student int8 (onnxruntime)": onnx_preds["student_int8"]}, cfg.eval.plot_units)
        if streamed:
            _plot_stream(run.path / "stream.png", streamed)
        write_json_atomic(run.path / "series.json", {"window": cfg.data.window, "rul_cap": data.cap,
                                               "sensors": data.splits.sensors, "normalizer": asdict(data.norm),
                                               "input": "window: (batch, window, sensors) float32, normalised",
                                               "output": "rul: (batch,) cycles"})
        write_json_atomic(run.path / "metrics.json", metrics)
        write_text_atomic(run.path / "report.md", _report(metrics))
        for name in ("ckpt-teacher", "ckpt-student", "ckpt-pair"):
            shutil.rmtree(run.path / name, ignore_errors=True)
    return run.finish(), metrics


def summary_line(metrics: dict) -> str:
    return _summary(metrics)
