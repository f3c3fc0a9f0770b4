"""`edgestill sweep`: plans from light to extreme compression, each one shrunk end to end, and the shrink curve.

    for each file-size budget (fractions of the teacher's fp32 bytes, light -> extreme):
        best plan = plan(teacher, device, Budget(max_file_bytes=...))   # shape + per-layer formats (EdgeDistill)
        run it:  edgestill shrink student.layers=... quant.format=... quant.plan=...   -> SWEEP/points/NN-<size>/
    baseline: the teacher quantized by llama.cpp's own quantizer (Q8_0 ... Q2_K), scored by llama.cpp
    -> SWEEP/shrink_curve.{json,png}, SWEEP/report.html: retention and top-1 vs compression_x_fp32, break points

Every point is an ordinary run folder, so a killed sweep continues where it stopped: finished points are
read back, an interrupted one resumes from its last checkpoint, and the baseline is cached in
SWEEP/baseline.json. The plans themselves are written to SWEEP/plans.json before any training starts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from edgestill.config import ShrinkConfig
from edgestill.errors import EdgestillError
from edgestill.evaluate.report import write_atomic
from edgestill.runs import WorkFolder

log = logging.getLogger("edgestill")

# Formats quantization-aware training can use (q4_k's scale search is too slow to run every step on a CPU).
TRAIN_FORMATS = ("q8_0", "q5_0", "q4_0")
BASELINE_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
SWEEP_MARKER = ".edgestill-sweep"  # marks a folder as a sweep's: only such a folder (or an empty one) is written into


@dataclass
class SweepSettings:
    # File-size budgets as fractions of the teacher's fp32 bytes, light to extreme.
    budgets: list[float] = field(default_factory=lambda: [1 / 4, 1 / 6, 1 / 8, 1 / 12, 1 / 16, 1 / 24])
    device: str = "host"
    thresholds: tuple[float, ...] = (0.95, 0.90)
    baseline_types: tuple[str, ...] = BASELINE_TYPES
    calibration_blocks: int = 4


def point_config(base: ShrinkConfig, plan, out: Path, teacher_layers: int, teacher_ffn: int) -> ShrinkConfig:
    """The ShrinkConfig that executes `plan` (an edgestill.plan.Plan) into `out`."""
    cfg = copy.deepcopy(base)
    cfg.student.layers = list(plan.layers)
    cfg.student.num_layers = len(plan.layers)
    cfg.student.intermediate_size = plan.intermediate_size if plan.intermediate_size < teacher_ffn else None
    cfg.quant.format = plan.default_format
    cfg.quant.plan = dict(plan.quant_plan)
    cfg.output.dir = str(out)
    return cfg


def shrink_for_device(cfg: ShrinkConfig, device: str, budget, overwrite: bool = False):
    """`edgestill shrink --device D --max-memory M ...`: plan the best student for the budget, then shrink it.

    The plan (calibrated on the train split) fixes the layers kept, the FFN width and the per-layer
    formats; the run is an ordinary shrink run with those settings, plus plan.json (the prediction)
    next to its metrics so predicted and measured bytes/speed sit side by side.
    """
    import numpy as np
    import torch

    from edgestill.models.load import load_causal_lm, resolve_model_path
    from edgestill.models.slice import decoder_layers
    from edgestill.plan import plan
    from edgestill.plan.allocate import check_budget
    from edgestill.plan.cost import StudentShape, tokenizer_metadata_bytes
    from edgestill.shrink import _blocks_for, shrink

    teacher = load_causal_lm(cfg.teacher.model)
    path = resolve_model_path(cfg.teacher.model)
    metadata = tokenizer_metadata_bytes(path) if str(path).lower().endswith(".gguf") else 0
    # An impossible budget fails here, from the teacher's shape alone, before the text is read or anything measured.
    check_budget(StudentShape.from_config(teacher.model.config), device, budget, TRAIN_FORMATS, metadata_bytes=metadata,
                 plan_options=False)
    _, train, _, _ = _blocks_for(cfg, teacher.tokenizer)
    batches = [torch.from_numpy(np.asarray(train[i : i + 1])).long() for i in range(min(4, len(train)))]
    best = plan(teacher.model, device, budget, batches, formats=TRAIN_FORMATS, metadata_bytes=metadata, top=1)[0]
    log.info("plan for %s: %s", device, best.summary())
    point = point_config(cfg, best, Path(cfg.output.dir), len(decoder_layers(teacher.model)),
                         teacher.model.config.intermediate_size)
    del teacher
    final = shrink(point, overwrite=overwrite)
    if final is not None:
        write_atomic(Path(final) / "plan.json", json.dumps({"device": device, "budget": budget.to_dict(),
                                                            "plan": best.to_dict()}, indent=1))
    return final


def make_plans(cfg: ShrinkConfig, settings: SweepSettings, teacher, train_blocks, metadata_bytes: int,
               folder: Path | None = None) -> list[dict]:
    """The best feasible plan for every budget (the same plan twice is run once).

    The layer sensitivities (the slow part) are measured once for all budgets and kept in
    folder/sensitivity.json, so a sweep killed while planning, or rerun with other budgets, reuses them.
    """
    import numpy as np
    import torch

    from edgestill.plan import Budget, plan
    from edgestill.plan.allocate import floor_error, student_floor, with_device_ram
    from edgestill.plan.cost import StudentShape
    from edgestill.plan.devices import load_device
    from edgestill.plan.sensitivity import Sensitivity, layer_sensitivity

    batches = [torch.from_numpy(np.asarray(train_blocks[i : i + 1])).long() for i in range(settings.calibration_blocks)]
    teacher_bytes = 4 * sum(p.numel() for p in teacher.parameters())
    # Before anything is measured, drop the budgets even the smallest plannable student misses (cost model only).
    device = load_device(settings.device)
    floor = student_floor(StudentShape.from_config(teacher.config), device, TRAIN_FORMATS,
                          metadata_bytes=metadata_bytes)
    n = teacher_bytes // floor.bound.file_bytes  # 1/n: the tightest fraction whose budget the floor's file fits
    fixes = {"file": f"use --budgets no tighter than 1/{n} of the teacher ({teacher_bytes / 1e6:.1f}MB in fp32)"
             if n >= 1 else "no file budget below the teacher's own size can be met"}
    budgets, dropped = [], {}
    for fraction in settings.budgets:
        budget = Budget(max_file_bytes=max(1, int(teacher_bytes * fraction)))  # 0 bytes: refused by Budget
        why = floor_error(with_device_ram(budget, device), floor, device, ram_from_device=True, fixes=fixes,
                          sources={"file": f"--budgets {fraction:.4g} of the teacher"})
        if why is None:
            budgets.append((fraction, budget))
        else:
            dropped[fraction] = why
            log.warning("budget 1/%.0f of the teacher dropped before planning: %s", 1 / fraction, why)
    if not budgets:
        raise EdgestillError(f"no budget of the sweep can be met: {dropped[max(dropped)]}")
    saved = folder / "sensitivity.json" if folder is not None else None
    # valid for exactly these calibration tokens, teacher and formats (whatever data settings produced them)
    tokens = hashlib.sha256(np.ascontiguousarray(train_blocks[: settings.calibration_blocks]).tobytes()).hexdigest()[:16]
    key = {"formats": list(TRAIN_FORMATS), "teacher": cfg.teacher.model, "calibration_tokens_sha256": tokens}
    sensitivity = None
    if saved is not None and saved.is_file():
        stored = json.loads(saved.read_text())
        if stored.get("key") == key:
            sensitivity = Sensitivity.from_dict(stored["sensitivity"])
            log.info("layer sensitivity read from %s", saved)
    if sensitivity is None:
        sensitivity = layer_sensitivity(teacher, batches, TRAIN_FORMATS)  # once for every budget
        if saved is not None:
            write_atomic(saved, json.dumps({"key": key, "sensitivity": sensitivity.to_dict()}, indent=1))
    cache: dict = {}  # reference logits, block influence, structural KL per shape: shared by the budgets
    plans, seen = [], set()
    for fraction, budget in budgets:
        try:
            best = plan(teacher, device, budget, batches, formats=TRAIN_FORMATS, sensitivity=sensitivity,
                        metadata_bytes=metadata_bytes, top=1, cache=cache)[0]
        except EdgestillError as e:
            log.warning("budget 1/%.0f of the teacher: %s", 1 / fraction, e)
            continue
        key = json.dumps([best.layers, best.intermediate_size, best.default_format, best.quant_plan], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        plans.append({"budget_fraction": fraction, "max_file_bytes": budget.max_file_bytes, "plan": best.to_dict(),
                      "summary": best.summary()})
    if not plans:
        raise EdgestillError("no budget of the sweep has a feasible plan; use larger budgets (e.g. --budgets 0.25,0.125)")
    return plans


def baseline_points(folder: Path, teacher, test_blocks, t_logp, teacher_ppl: float, types, teacher_gguf) -> list:
    """The teacher quantized by llama.cpp at each type, scored by llama.cpp (cached in baseline.json)."""
    from edgestill.evaluate.gguf_eval import gguf_quality
    from edgestill.evaluate.shrink_curve import ShrinkPoint
    from edgestill.export.gguf import export_gguf
    from edgestill.export.llamacpp import llamacpp_quantize

    cache_path = folder / "baseline.json"
    done = {p["name"]: p for p in json.loads(cache_path.read_text())} if cache_path.is_file() else {}
    teacher_bytes = 4 * sum(p.numel() for p in teacher.model.parameters())
    ggufs = folder / "baseline"
    ggufs.mkdir(parents=True, exist_ok=True)
    source = ggufs / "teacher-f32.gguf"
    for qtype in types:
        name = f"llama.cpp {qtype}"
        if name in done:
            continue
        if not source.is_file():
            export_gguf(teacher.model, teacher.tokenizer, source, "f32", teacher_gguf=teacher_gguf)
        path = llamacpp_quantize(source, ggufs / f"teacher-{qtype}.gguf", qtype)
        q = gguf_quality(path, test_blocks, t_logp)
        size = path.stat().st_size
        done[name] = ShrinkPoint(name, teacher_bytes / size, teacher_ppl / q["perplexity"], q["top1_agreement"], size,
                                 series="llama.cpp", perplexity=q["perplexity"],
                                 detail={"gguf": str(path), "kl": q["kl_teacher_model"]}).to_dict()
        write_atomic(cache_path, json.dumps(list(done.values()), indent=1))
    source.unlink(missing_ok=True)  # the f32 copy is only a source for the quantizer
    return [ShrinkPoint(**done[f"llama.cpp {t}"]) for t in types if f"llama.cpp {t}" in done]


def run_sweep(cfg: ShrinkConfig, settings: SweepSettings, out: str | Path) -> dict:
    """Plan, shrink every point (resuming), score the llama.cpp baseline, write the shrink curve. Returns its JSON.

    `out` is created if needed; an existing folder must be empty or an earlier sweep's (which is resumed).
    """
    if any(not 0 < f < 1 for f in settings.budgets):
        raise EdgestillError(f"sweep budgets {settings.budgets} must be fractions of the teacher's bytes, between 0 and 1")
    folder = WorkFolder(out, SWEEP_MARKER, "sweep", legacy_files=("plans.json", "sensitivity.json"))
    out = folder.open()
    with folder.cleanup_on_failure():  # a sweep that fails before any work leaves no folder behind
        return _run_sweep(cfg, settings, out)


def _run_sweep(cfg: ShrinkConfig, settings: SweepSettings, out: Path) -> dict:
    from edgestill.evaluate.gguf_eval import teacher_logprobs, teacher_perplexity
    from edgestill.evaluate.shrink_curve import ShrinkPoint, write_shrink_report
    from edgestill.models.load import load_causal_lm, resolve_model_path
    from edgestill.models.slice import decoder_layers
    from edgestill.plan.cost import tokenizer_metadata_bytes
    from edgestill.shrink import _blocks_for, shrink

    teacher = load_causal_lm(cfg.teacher.model)
    _, train, _, test = _blocks_for(cfg, teacher.tokenizer)
    teacher_path = resolve_model_path(cfg.teacher.model)
    teacher_gguf = teacher_path if str(teacher_path).lower().endswith(".gguf") else None
    metadata = tokenizer_metadata_bytes(teacher_gguf) if teacher_gguf else 0

    plans_path = out / "plans.json"
    saved = json.loads(plans_path.read_text()) if plans_path.is_file() else None
    if saved is None or saved.get("budgets") != settings.budgets or saved.get("device") != settings.device:
        plans = make_plans(cfg, settings, teacher.model, train, metadata, out)
        write_atomic(plans_path, json.dumps({"budgets": settings.budgets, "device": settings.device, "plans": plans}, indent=1))
    else:
        plans = saved["plans"]
    for i, p in enumerate(plans):
        log.info("plan %d/%d (budget %.1f MB): %s", i + 1, len(plans), p["max_file_bytes"] / 1e6, p["summary"])

    from edgestill.plan import Plan

    n_layers = len(decoder_layers(teacher.model))
    ffn = teacher.model.config.intermediate_size
    points = []
    for i, p in enumerate(plans):
        plan = Plan.from_dict(p["plan"])
        run = out / "points" / f"{i:02d}-{p['max_file_bytes'] / 1e6:.0f}MB"
        if not (run / "DONE").is_file():
            log.info("sweep point %d/%d -> %s", i + 1, len(plans), run)
            # every point distils from the same teacher on the same text: the first point's cache serves all
            done = sorted(p.parent for p in (out / "points").glob("*/DONE"))
            shrink(point_config(cfg, plan, run, n_layers, ffn), teacher_cache_from=done[0] if done else None)
        m = json.loads((run / "metrics.json").read_text())
        points.append(ShrinkPoint(f"{len(plan.layers)}L {plan.default_format}" + ("+mix" if plan.quant_plan else ""),
                                  m["compression_x_fp32"], m["retention"], m["top1_agreement"], m["student"]["bytes"],
                                  perplexity=m["student"]["perplexity"],
                                  detail={"run": str(run), "plan": p["plan"], "predicted_file_bytes":
                                          p["plan"]["prediction"]["file_bytes"]}))

    t_logp = teacher_logprobs(teacher.model, test, cfg.eval.batch_size)
    teacher_ppl = teacher_perplexity(t_logp, test)
    points += baseline_points(out, teacher, test, t_logp, teacher_ppl, settings.baseline_types, teacher_gguf)
    meta = {"title": f"{cfg.teacher.model} on {cfg.data.path}: held-out retention vs size",
            "teacher": cfg.teacher.model, "data": cfg.data.path, "device": settings.device,
            "budgets": settings.budgets, "held_out_tokens": int(test[:, 1:].size), "teacher_perplexity": teacher_ppl,
            "note": "edgestill points: retention from the PyTorch model holding the exact quantized weights; llama.cpp "
                    "points: from llama.cpp's logits. Bytes are the GGUF files'."}
    return write_shrink_report(out, points, meta, settings.thresholds)
