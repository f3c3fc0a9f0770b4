"""`edgestill sweep`: plans from light to extreme compression, each one shrunk end to end, and the shrink curve.

    for each file-size budget (fractions of the teacher's fp32 bytes, light -> extreme):
        best plan = plan(teacher, device, Budget(max_file_bytes=...))   # shape + per-layer formats (EdgeDistill)
        run it:  edgestill shrink student.layers=... quant.format=... quant.plan=...   -> SWEEP/points/NN-<size>/
    baseline: the teacher quantized by llama.cpp's own quantizer (Q8_0 ... Q2_K), scored by llama.cpp
    -> SWEEP/shrink_curve.{json,png}, SWEEP/report.html: retention and top-1 vs compression_x_fp32, break points

Every point is an ordinary run folder, so a killed sweep continues where it stopped: finished points are
read back, an interrupted one resumes from its last checkpoint, and the baseline is cached in
SWEEP/baseline.json. The plans themselves are written to SWEEP/plans.json before any training starts, and the
layer sensitivities (the slow part of planning) to SWEEP/sensitivity.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgestill.config import ShrinkConfig
from edgestill.data.corpus import CALIBRATION_BLOCKS, calibration_batches, corpus_blocks
from edgestill.errors import EdgestillError
from edgestill.files import write_text_atomic
from edgestill.jobs.plan import point_config
from edgestill.plan.allocate import DEFAULT_FORMATS
from edgestill.runs import WorkFolder

log = logging.getLogger("edgestill")

BASELINE_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
SWEEP_MARKER = ".edgestill-sweep"  # marks a folder as a sweep's: only such a folder (or an empty one) is written into


@dataclass
class SweepSettings:
    # File-size budgets as fractions of the teacher's fp32 bytes, light to extreme.
    budgets: list[float] = field(default_factory=lambda: [1 / 4, 1 / 6, 1 / 8, 1 / 12, 1 / 16, 1 / 24])
    device: str = "host"
    thresholds: tuple[float, ...] = (0.95, 0.90)
    baseline_types: tuple[str, ...] = BASELINE_TYPES
    calibration_blocks: int = CALIBRATION_BLOCKS
    formats: tuple[str, ...] = DEFAULT_FORMATS  # what quantization-aware training can use (q4_k's search is too slow)


def make_plans(cfg: ShrinkConfig, settings: SweepSettings, teacher, train_blocks, metadata_bytes: int,
               folder: Path | None = None, dropped: list | None = None) -> list[dict]:
    """The best feasible plan for every budget (the same plan twice is run once).

    Budgets even the smallest student misses are dropped first, from the cost model alone; budgets no plan meets
    after measuring are dropped too. Each drop is appended to `dropped` as {budget_fraction, max_file_bytes, reason}.
    The layer sensitivities are measured once for all budgets and kept in folder/sensitivity.json.
    """
    dropped = [] if dropped is None else dropped
    from edgestill.plan import cached_sensitivity, plan
    from edgestill.plan.allocate import feasible_file_budgets
    from edgestill.plan.cost import StudentShape

    teacher_bytes = 4 * sum(p.numel() for p in teacher.parameters())
    budgets, too_small = feasible_file_budgets(StudentShape.from_config(teacher.config), settings.device, teacher_bytes,
                                               settings.budgets, settings.formats, metadata_bytes)
    dropped += [{"budget_fraction": f, "max_file_bytes": int(teacher_bytes * f), "reason": why} for f, why in too_small.items()]
    batches = calibration_batches(train_blocks, settings.calibration_blocks)
    # valid for exactly these calibration tokens, teacher and formats (whatever data settings produced them)
    tokens = hashlib.sha256(np.ascontiguousarray(train_blocks[: settings.calibration_blocks]).tobytes()).hexdigest()[:16]
    key = {"formats": list(settings.formats), "teacher": cfg.teacher.model, "calibration_tokens_sha256": tokens}
    sensitivity = cached_sensitivity(teacher, batches, settings.formats, folder / "sensitivity.json" if folder else None, key)
    cache: dict = {}  # reference logits, block influence, structural KL per shape: shared by the budgets
    plans, seen = [], set()
    for fraction, budget in budgets:
        try:
            best = plan(teacher, settings.device, budget, batches, formats=settings.formats, sensitivity=sensitivity,
                        metadata_bytes=metadata_bytes, top=1, cache=cache)[0]
        except EdgestillError as e:
            log.warning("budget 1/%.0f of the teacher: %s", 1 / fraction, e)
            dropped.append({"budget_fraction": fraction, "max_file_bytes": budget.max_file_bytes, "reason": str(e)})
            continue
        same = json.dumps([best.layers, best.intermediate_size, best.default_format, best.quant_plan], sort_keys=True)
        if same in seen:
            continue
        seen.add(same)
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
    from edgestill.runtime.llamacpp import llamacpp_quantize

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
        source_x = teacher_gguf.stat().st_size / size if teacher_gguf is not None else None
        done[name] = ShrinkPoint(name, teacher_bytes / size, teacher_ppl / q["perplexity"], q["top1_agreement"], size,
                                 series="llama.cpp", perplexity=q["perplexity"],
                                 detail={"gguf": str(path), "kl": q["kl_teacher_model"]},
                                 compression_x_source=source_x).to_dict()
        write_text_atomic(cache_path, json.dumps(list(done.values()), indent=1))
    source.unlink(missing_ok=True)  # the f32 copy is only a source for the quantizer
    return [ShrinkPoint(**done[f"llama.cpp {t}"]) for t in types if f"llama.cpp {t}" in done]


def _plans(cfg: ShrinkConfig, settings: SweepSettings, out: Path, teacher, train, metadata: int) -> tuple[list, list]:
    """(plans, dropped budgets with their reasons): SWEEP/plans.json when it was made for these budgets and device,
    else new plans (written before training)."""
    plans_path = out / "plans.json"
    saved = json.loads(plans_path.read_text()) if plans_path.is_file() else None
    if saved is not None and saved.get("budgets") == settings.budgets and saved.get("device") == settings.device:
        return saved["plans"], saved.get("dropped", [])
    dropped: list = []
    plans = make_plans(cfg, settings, teacher.model, train, metadata, out, dropped)
    write_text_atomic(plans_path, json.dumps({"budgets": settings.budgets, "device": settings.device, "plans": plans,
                                              "dropped": dropped}, indent=1))
    return plans, dropped


def _shrink_points(cfg: ShrinkConfig, plans: list[dict], out: Path, teacher_ffn: int) -> list:
    """Shrink every plan not yet finished (each an ordinary run folder) and read back its point of the curve."""
    from edgestill.evaluate.shrink_curve import ShrinkPoint
    from edgestill.jobs.shrink import shrink
    from edgestill.plan import Plan

    points = []
    for i, p in enumerate(plans):
        plan = Plan.from_dict(p["plan"])
        run = out / "points" / f"{i:02d}-{p['max_file_bytes'] / 1e6:.0f}MB"
        if not (run / "DONE").is_file():
            log.info("sweep point %d/%d -> %s", i + 1, len(plans), run)
            # every point distils from the same teacher on the same text: the first point's cache serves all
            done = sorted(d.parent for d in (out / "points").glob("*/DONE"))
            shrink(point_config(cfg, plan, run, teacher_ffn), teacher_cache_from=done[0] if done else None)
        m = json.loads((run / "metrics.json").read_text())
        points.append(ShrinkPoint(f"{len(plan.layers)}L {plan.default_format}" + ("+mix" if plan.quant_plan else ""),
                                  m["compression_x_fp32"], m["retention"], m["top1_agreement"], m["student"]["bytes"],
                                  perplexity=m["student"]["perplexity"],
                                  detail={"run": str(run), "plan": p["plan"], "predicted_file_bytes":
                                          p["plan"]["prediction"]["file_bytes"]},
                                  compression_x_source=m.get("compression_x_source")))
    return points


def sweep(cfg: ShrinkConfig, settings: SweepSettings, out: str | Path) -> dict:
    """Plan, shrink every point (resuming), score the llama.cpp baseline, write the shrink curve. Returns its JSON.

    `out` is created if needed; an existing folder must be empty or an earlier sweep's (which is resumed).
    """
    if any(not 0 < f < 1 for f in settings.budgets):
        raise EdgestillError(f"sweep budgets {settings.budgets} must be fractions of the teacher's bytes, between 0 and 1")
    folder = WorkFolder(out, SWEEP_MARKER, "sweep", legacy_files=("plans.json", "sensitivity.json"))
    out = folder.open()
    with folder.cleanup_on_failure():  # a sweep that fails before any work leaves no folder behind
        return _sweep(cfg, settings, out)


def _sweep(cfg: ShrinkConfig, settings: SweepSettings, out: Path) -> dict:
    from edgestill.evaluate.gguf_eval import teacher_logprobs, teacher_perplexity
    from edgestill.evaluate.shrink_curve import write_shrink_report
    from edgestill.models.load import gguf_file, load_causal_lm
    from edgestill.plan.cost import tokenizer_metadata_bytes

    teacher = load_causal_lm(cfg.teacher.model)
    data = corpus_blocks(cfg.data, teacher.tokenizer)
    teacher_gguf = gguf_file(cfg.teacher.model)
    metadata = tokenizer_metadata_bytes(teacher_gguf) if teacher_gguf else 0
    plans, dropped = _plans(cfg, settings, out, teacher, data.train, metadata)
    for i, p in enumerate(plans):
        log.info("plan %d/%d (budget %.1f MB): %s", i + 1, len(plans), p["max_file_bytes"] / 1e6, p["summary"])
    points = _shrink_points(cfg, plans, out, teacher.model.config.intermediate_size)

    test = data.test
    t_logp = teacher_logprobs(teacher.model, test, cfg.eval.batch_size)
    teacher_ppl = teacher_perplexity(t_logp, test)
    points += baseline_points(out, teacher, test, t_logp, teacher_ppl, settings.baseline_types, teacher_gguf)
    meta = {"title": f"{cfg.teacher.model} on {cfg.data.path}: held-out retention vs size",
            "teacher": cfg.teacher.model, "data": cfg.data.path, "device": settings.device,
            "budgets": settings.budgets, "dropped_budgets": dropped, "held_out_tokens": int(test[:, 1:].size), "teacher_perplexity": teacher_ppl,
            "note": "edgestill points: retention from the PyTorch model holding the exact quantized weights; llama.cpp "
                    "points: from llama.cpp's logits. Bytes are the GGUF files'."}
    return write_shrink_report(out, points, meta, settings.thresholds)
