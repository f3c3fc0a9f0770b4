"""`edgestill shrink --task vision`: EdgeVL ([6] in docs/references.md): a CLIP-style image tower shrunk to a
small int8 student that reads a second visual modality, for open-vocabulary classification on the device.

    1. data      real images and their second view, real (a paired folder) or derived (data/views.py); the
                 held-out classes reach no training (data/images.py)
    2. text      the class-name prompts, embedded once by the frozen sentence encoder (models/vision.py)
    3. teacher   an image tower aligned to the seen classes' prompts (distill/edgevl.train_teacher)
    4. students  student_rgb_only (stage 1 on the first view only), edgevl_stage1 (both views), edgevl_stage2
                 (stage 1's student, int8 QAT + triplet on pseudo-labels), all without labels; and a control,
                 edgevl_stage2_noqat: stage 2's training without the fake quantization
    5. export    ONNX: teacher and students float; edgevl_stage1 through post-training int8 (stage1_ptq_int8),
                 edgevl_stage2 through int8 after its QAT (edgevl_stage2_int8) and the control through post-training
                 int8 (stage2_noqat_ptq_int8: what QAT adds beyond stage 2's extra training), all static QDQ
    6. measure   zero-shot accuracy (seen, held-out, all) in onnxruntime on each view; file bytes; batch-1 latency
    7. report    metrics.json, report.md, zero_shot.png

The run folder is written as OUT.partial and moved into place when it finishes; every trained model is saved
as it finishes, so a rerun of the same command resumes after the last finished model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgestill.config import VisionConfig, plain
from edgestill.errors import EdgestillError
from edgestill.files import write_json_atomic, write_text_atomic
from edgestill.runs import RunDir

log = logging.getLogger(__name__)

MODELS = ("teacher", "student_rgb_only", "edgevl_stage1", "edgevl_stage2_int8", "stage1_ptq_int8", "stage2_noqat_ptq_int8")
# an int8 row -> the trained float model its file quantizes
INT8_OF = {"edgevl_stage2_int8": "edgevl_stage2", "stage1_ptq_int8": "edgevl_stage1",
           "stage2_noqat_ptq_int8": "edgevl_stage2_noqat"}
VIEWS = ("first", "second")


class Prepared:
    """The images in both views, their split, and the prompt embeddings of every class."""

    def __init__(self, cfg: VisionConfig):
        from edgestill.data.images import load_images, split
        from edgestill.data.views import DERIVED_VIEWS, derive
        from edgestill.models.vision import prompt_embeddings

        derived = cfg.data.second_view in DERIVED_VIEWS
        images = load_images(cfg.data, derived_second=derived)
        self.images, self.split = images, split(images, cfg.data)
        self.first = images.x
        self.second = derive(cfg.data.second_view, images.x, cfg.low_light) if derived else images.second
        self.second_modality = cfg.low_light.describe() if derived else f"real: {cfg.data.second_view}/ paired folder"
        self.text = prompt_embeddings(cfg.text.encoder, images.classes, cfg.text.template)
        self.row = {k: i for i, k in enumerate(self.split.seen_classes)}  # class -> row among the seen prompts

    def seen_labels(self, idx: np.ndarray) -> np.ndarray:
        return np.array([self.row[int(c)] for c in self.images.y[idx]], np.int64)

    def record(self) -> dict:
        s, names = self.split, self.images.classes
        return {"source": self.images.source, "second_modality": self.second_modality,
                "classes": names, "seen": [names[k] for k in s.seen_classes],
                "heldout": [names[k] for k in s.heldout_classes],
                "images": {"train": len(s.train), "val": len(s.val), "test_seen": len(s.test),
                           "test_heldout": len(s.heldout)}, "shape": list(self.first.shape[1:])}


def _trained(run: Path, name: str, model, train):
    """Load `name` from the run folder if an earlier attempt finished it, else train it and save it."""
    from safetensors.torch import load_model, save_model

    weights, record = run / f"{name}.safetensors", run / f"{name}.fit.json"
    if weights.is_file() and record.is_file():
        load_model(model, str(weights))
        log.info("%s: kept from the interrupted run", name)
        return model, json.loads(record.read_text())
    fit = train(model)
    save_model(model, str(weights))
    write_json_atomic(record, fit)
    return model, fit


def train_all(cfg: VisionConfig, data: Prepared, run: Path) -> tuple[dict, dict]:
    """The teacher, the three students and the control (module docstring). Returns ({name: model}, {name: fit
    record})."""
    import dataclasses

    import torch

    from edgestill.distill import edgevl
    from edgestill.models.vision import ImageTower, embed_images
    from edgestill.quant import qat_int8

    s, seed, dim = data.split, cfg.seed, data.text.shape[1]
    channels = data.first.shape[1]

    def tower(tc, offset):
        torch.manual_seed(seed + offset)
        return ImageTower(channels, dim, tc)

    fits: dict = {}
    teacher, fits["teacher"] = _trained(run, "teacher", tower(cfg.teacher, 0), lambda m: edgevl.train_teacher(
        m, data.first[s.train], data.seen_labels(s.train), data.first[s.val], data.seen_labels(s.val),
        data.text[s.seen_classes], cfg.teacher_fit, seed))
    target = embed_images(teacher, data.first)  # the teacher's embedding of each first view: the students' target
    pseudo = (target @ data.text[s.seen_classes].T).argmax(1)  # its zero-shot class among the seen prompts
    val = (data.first[s.val], data.second[s.val], target[s.val])

    def stage(stage_cfg, desc, **kw):
        return lambda m: edgevl.distill_stage(m, data.first[s.train], data.second[s.train], target[s.train], val,
                                              stage_cfg, seed, desc, **kw)

    rgb_only, fits["student_rgb_only"] = _trained(run, "student_rgb_only", tower(cfg.student, 1), stage(
        dataclasses.replace(cfg.stage1, second_share=0.0), "student, first view only"))
    stage1, fits["edgevl_stage1"] = _trained(run, "edgevl_stage1", tower(cfg.student, 1), stage(cfg.stage1, "EdgeVL stage 1"))

    def qat(model):
        prepared = qat_int8.prepare(stage1)
        fit = stage(cfg.stage2, "EdgeVL stage 2 (int8 QAT)", pseudo=pseudo[s.train], margin=cfg.stage2.margin,
                    triplet_weight=cfg.stage2.triplet_weight)(prepared)
        qat_int8.to_float(prepared, model)
        return fit

    def no_qat(model):  # the control: the same stage 2 (same seed, batches and views) in float
        model.load_state_dict(stage1.state_dict())
        return stage(cfg.stage2, "stage 2 without fake quantization (control)", pseudo=pseudo[s.train],
                     margin=cfg.stage2.margin, triplet_weight=cfg.stage2.triplet_weight)(model)

    stage2, fits["edgevl_stage2"] = _trained(run, "edgevl_stage2", tower(cfg.student, 1), qat)
    control, fits["edgevl_stage2_noqat"] = _trained(run, "edgevl_stage2_noqat", tower(cfg.student, 1), no_qat)
    return {"teacher": teacher, "student_rgb_only": rgb_only, "edgevl_stage1": stage1, "edgevl_stage2": stage2,
            "edgevl_stage2_noqat": control}, fits


def export_and_measure(cfg: VisionConfig, data: Prepared, models: dict, folder: Path) -> dict:
    """Each row of MODELS as the ONNX file a device runs; zero-shot scores on both views in onnxruntime, bytes,
    batch-1 latency (all sessions timed alternately)."""
    from edgestill.evaluate.open_vocab import zero_shot_scores
    from edgestill.export.onnx_vision import INPUT, export_float, export_int8, onnx_embed
    from edgestill.models.vision import parameter_count
    from edgestill.runtime.onnx import measure_latency, onnx_session

    s = data.split
    channels, size = data.first.shape[1], data.first.shape[2]
    floats = {name: export_float(models[name], channels, size, folder / f"{name}.onnx") for name in models}
    # calibration: training images of both views, as the deployed student will read either
    pick = np.random.default_rng(0).permutation(len(s.train))[:256]
    calib = np.concatenate([data.first[s.train][pick], data.second[s.train][pick]])
    files = {name: floats[name] for name in ("teacher", "student_rgb_only", "edgevl_stage1")}
    for name, source in INT8_OF.items():
        stem = f"{source}.int8.onnx" if name == "edgevl_stage2_int8" else f"{source}.ptq.int8.onnx"
        files[name] = export_int8(floats[source], folder / stem, calib)
    for source in ("edgevl_stage2", "edgevl_stage2_noqat"):
        floats[source].unlink()  # their float weights are in <name>.safetensors
    sessions = {name: onnx_session(path, cfg.eval.threads) for name, path in files.items()}
    out = {}
    for name, session in sessions.items():
        scores = {}
        for view, images in zip(VIEWS, (data.first, data.second)):
            scores[view] = zero_shot_scores(onnx_embed(session, images[s.test]), data.images.y[s.test],
                                            onnx_embed(session, images[s.heldout]), data.images.y[s.heldout],
                                            data.text, s.seen_classes, s.heldout_classes)
        model = models[INT8_OF.get(name, name)]
        out[name] = {"file": files[name].name, "bytes": files[name].stat().st_size, "params": parameter_count(model),
                     "int8": name.endswith("_int8"), "zero_shot": scores}
    feeds = [{INPUT: data.second[i:i + 1]} for i in s.test[np.linspace(0, len(s.test) - 1, cfg.eval.latency_images).astype(int)]]
    latency = measure_latency({name: (session, feeds) for name, session in sessions.items()}, repeats=cfg.eval.latency_repeats)
    teacher_bytes = out["teacher"]["bytes"]
    for name, row in out.items():
        row.update(latency_ms=latency[name]["latency_ms_per_example"], latency_ms_spread=latency[name]["latency_ms_spread"],
                   compression_x=teacher_bytes / row["bytes"])
    return out


def plot(path: Path, bars: dict[str, tuple], second_label: str, chance: float, errors: dict | None = None) -> None:
    """Seen-class zero-shot accuracy of every model on both views (grouped bars). bars: name -> (first view,
    second view); errors: the same with their spreads (one std over seeds)."""
    import matplotlib

    from edgestill.evaluate.report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(bars)
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    xs = np.arange(len(names))
    for k, label in enumerate(("first view", second_label)):
        err = [errors[n][k] for n in names] if errors else None
        ax.bar(xs + (k - 0.5) * 0.38, [bars[n][k] for n in names], 0.38, yerr=err, capsize=3, label=label)
    ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
    ax.set_xticks(xs, [n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_ylabel("zero-shot accuracy, seen classes")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _report(m: dict) -> str:
    d = m["data"]
    lines = [f"# Vision-language student (EdgeVL): {d['source']}", "",
             f"Second view: {d['second_modality']}.", "",
             f"Seen classes ({len(d['seen'])}): {', '.join(d['seen'])}; held out from every training "
             f"({len(d['heldout'])}): {', '.join(d['heldout'])}. Prompts: \"{m['text']['template']}\" embedded by "
             f"{m['text']['encoder']}. Accuracies are zero-shot, in onnxruntime.", "",
             "| model | file | bytes | x smaller | seen, first view | seen, second view | held-out, first | "
             "held-out, second | latency (ms) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in m["models"].items():
        z = r["zero_shot"]
        lines.append(f"| {name} | {r['file']} | {r['bytes']:,} | {r['compression_x']:.1f} | {z['first']['seen']:.3f} | "
                     f"{z['second']['seen']:.3f} | {z['first']['heldout']:.3f} | {z['second']['heldout']:.3f} | "
                     f"{r['latency_ms']:.3f} |")
    ch = m["models"]["teacher"]["zero_shot"]["first"]["chance"]
    lines += ["", f"Chance: seen {ch['seen']:.3f}, held-out {ch['heldout']:.3f}. Plot: zero_shot.png.", ""]
    return "\n".join(lines)


def check(cfg: VisionConfig) -> None:
    cfg.data.check()
    cfg.low_light.check()
    cfg.teacher.check("teacher")
    cfg.student.check("student")
    cfg.teacher_fit.check("teacher_fit")
    cfg.stage1.check("stage1")
    cfg.stage2.check("stage2")
    if cfg.eval.latency_images < 1 or cfg.eval.latency_repeats < 1:
        raise EdgestillError("eval.latency_images and eval.latency_repeats must be >= 1")


def shrink_vision(cfg: VisionConfig, overwrite: bool = False) -> tuple[Path, dict]:
    """The whole job (module docstring). Returns (the finished run folder, its metrics)."""
    import torch

    from edgestill.evaluate.environment import environment, measurement_start

    start = measurement_start()
    check(cfg)
    data = Prepared(cfg)
    cfg.output_dir = cfg.output_dir or "runs/shrink-vision"
    run = RunDir(cfg.output_dir, plain(cfg), overwrite=overwrite)
    log.info("%s run folder %s", "resuming" if run.open() else "new", run.path)
    torch.set_num_threads(cfg.eval.threads)
    with run.cleanup_on_failure():
        models, fits = train_all(cfg, data, run.path)
        rows = export_and_measure(cfg, data, models, run.path)
        metrics = {"task": "vision", "method": "EdgeVL", "data": data.record(), "text": asdict(cfg.text),
                   "seed": cfg.seed, "models": {name: rows[name] for name in MODELS}, "fits": fits,
                   "environment": environment(cfg.eval.threads, start)}
        np.save(run.path / "class_embeddings.npy", data.text)  # what a device matches image embeddings against
        write_json_atomic(run.path / "classes.json", {"classes": data.images.classes, "template": cfg.text.template,
                                                "encoder": cfg.text.encoder, "embeddings": "class_embeddings.npy"})
        rows = metrics["models"]
        plot(run.path / "zero_shot.png", {n: (r["zero_shot"]["first"]["seen"], r["zero_shot"]["second"]["seen"])
                                          for n, r in rows.items()},
             "second view", rows["teacher"]["zero_shot"]["first"]["chance"]["seen"])
        write_json_atomic(run.path / "metrics.json", metrics)
        write_text_atomic(run.path / "report.md", _report(metrics))
    return run.finish(), metrics


def summary_line(m: dict) -> str:
    r = m["models"]
    t, q, rgb = r["teacher"], r["edgevl_stage2_int8"], r["student_rgb_only"]
    return (f"teacher {t['bytes'] / 1e6:.2f} MB, seen-class zero-shot {t['zero_shot']['first']['seen']:.3f} (first view) / "
            f"{t['zero_shot']['second']['seen']:.3f} (second); EdgeVL int8 student {q['bytes'] / 1e3:.1f} KB "
            f"({q['compression_x']:.0f}x smaller): {q['zero_shot']['first']['seen']:.3f} / {q['zero_shot']['second']['seen']:.3f}; "
            f"first-view-only student on the second view {rgb['zero_shot']['second']['seen']:.3f}")
