"""Sensitivity-aware mixed precision vs uniform formats at equal bytes (EdgeDistill's HPAQD claim, issue 4).

The whole teacher, post-training (round-to-nearest, no training, so only the allocation differs):
  uniform:  every Linear in one GGUF format U (q4_0, q5_0, q8_0; and q4_1, see below)
  mixed:    per-layer formats from {q8_0, q5_0, q4_0} (the formats `edgestill plan`/`sweep` allocate for QAT)
            chosen by edgestill.plan.allocate from the measured layer sensitivities, within a GGUF file budget:
            (a) exactly the bytes of each uniform model (the equal-bytes comparison),
            (b) 90% of uniform Q5_0's bytes (does the mix match Q5_0 with fewer bytes?),
            (c) budgets spread between uniform Q4_0 and Q8_0 (the bytes -> KL curve, plotted)
The teacher is the reference every edgestill run uses: the default teacher corrected on the training split
(teacher.correct; cached in ~/.cache/edgestill/corrected). The original ships as a Q4_1 GGUF, so its weights lie on
the Q4_1 grid; the short correction moves them only a little off it, and re-quantizing the corrected teacher to
Q4_1 mostly snaps them back, undoing the correction (its KL is close to the original file's). Uniform Q4_1 is
therefore reported but kept out of the mixed menu, which is the formats `plan`/`sweep` allocate for QAT
(`--formats`/`--uniform` change both).
Reported: held-out KL(teacher || model), perplexity, top-1 agreement, and the exact GGUF bytes of each.
Calibration (the sensitivities) uses the train split; the held-out split is only scored.

    python benchmarks/mixed_vs_uniform.py        # ~15 min on 2 idle cores
    python benchmarks/mixed_vs_uniform.py --plot-only   # redraw the plot from the JSON
-> benchmarks/results/mixed_vs_uniform.json, docs/img/mixed_vs_uniform.png
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("q8_0", "q5_0", "q4_0")
UNIFORM = ("q4_0", "q5_0", "q8_0", "q4_1")
CURVE = (0.1, 0.25, 0.4, 0.6, 0.8)  # budgets: fraction of the way from uniform q4_0 bytes to q8_0 bytes


def main() -> None:
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS), help="formats the allocator may mix")
    ap.add_argument("--uniform", default=",".join(UNIFORM), help="uniform formats whose bytes are the budgets")
    ap.add_argument("--plot-only", action="store_true", help="only redraw the plot from the result JSON")
    args = ap.parse_args()
    if args.plot_only:
        import json

        r = json.loads((RESULTS / "mixed_vs_uniform.json").read_text())
        _plot(ROOT / r["plot"], r["uniform"], r["formats"], r["rows"], r.get("mixed_at_0.9x_q5_0"), r["curve"])
        return
    formats = tuple(args.formats.split(","))
    uniform_formats = tuple(args.uniform.split(","))

    from edgestill.config import ShrinkConfig
    from edgestill.data.corpus import corpus_blocks
    from edgestill.evaluate.metrics import compare_lm
    from edgestill.jobs.shrink import reference_teacher
    from edgestill.models.load import load_causal_lm, resolve_model_path
    from edgestill.plan.allocate import Budget, allocate, format_bits, plan_dict
    from edgestill.plan.cost import StudentShape, gguf_bytes, tokenizer_metadata_bytes
    from edgestill.plan.load import load_device
    from edgestill.plan.sensitivity import layer_sensitivity
    from edgestill.quant import QuantConfig, quantize_
    from edgestill.quant.formats import format_by_name

    torch.set_num_threads(2)
    cfg = ShrinkConfig()
    original = load_causal_lm(cfg.teacher.model)
    blocks = corpus_blocks(cfg.data, original.tokenizer)
    teacher = reference_teacher(cfg, original, blocks)  # corrected on the train split (cached, shared with every run)
    original_path = original.path
    del original
    train, test = blocks.train, blocks.test
    calibration = [torch.from_numpy(train[i : i + 2]).long() for i in range(0, 8, 2)]  # 8 train blocks
    sensitivity = layer_sensitivity(teacher.model, calibration, formats)
    shape = StudentShape.from_config(teacher.model.config)
    metadata = tokenizer_metadata_bytes(resolve_model_path("smollm2-135m"))
    device = load_device("rpi5-8gb")  # only the file budget binds; the device is needed for the speed terms

    scored: dict[tuple, dict] = {}  # budgets that allocate the same formats are scored once

    def score(default: str, plan: dict[str, str]) -> dict:
        key = (default, tuple(sorted(plan.items())))
        if key not in scored:
            scored[key] = _score(default, plan)
        return dict(scored[key])

    def _score(default: str, plan: dict[str, str]) -> dict:
        model = copy.deepcopy(teacher.model)
        quantize_(model, QuantConfig(default=format_by_name(default), plan={k: format_by_name(v) for k, v in plan.items()}),
                  step="convert")
        s = compare_lm(teacher.model, model, test)["summary"]
        del model
        return {"file_bytes": gguf_bytes(shape, plan, default, metadata)["file"], "kl_teacher_model": s["kl_teacher_student"],
                "perplexity": s["student_perplexity"], "retention": s["retention"], "top1_agreement": s["top1_agreement"]}

    def mixed_at(max_bytes: int) -> dict:
        unit_formats, _, predicted_kl = allocate(shape, sensitivity, device, Budget(max_file_bytes=max_bytes),
                                                 formats=formats, metadata_bytes=metadata)
        default, plan = plan_dict(unit_formats)
        counts = {f: list(unit_formats.values()).count(f) for f in formats if f in unit_formats.values()}
        return {"budget_bytes": max_bytes, "default": default, "plan": plan, "unit_format_counts": counts,
                "predicted_kl_sum": predicted_kl, **score(default, plan)}

    def show(label: str, r: dict) -> None:
        print(f"{label:<28} {r['file_bytes'] / 1e6:7.2f} MB  KL {r['kl_teacher_model']:.4f}  "
              f"top-1 {r['top1_agreement']:.3f}  {r.get('unit_format_counts', '')}", flush=True)

    uniform = {}
    for fmt in dict.fromkeys((*uniform_formats, "q4_0", "q8_0")):
        uniform[fmt] = {"format": fmt, **score(fmt, {})}
        show(f"uniform {fmt}", uniform[fmt])

    rows = []  # (a) equal bytes
    for fmt in uniform_formats:
        if fmt in (min(formats, key=format_bits), max(formats, key=format_bits)):
            continue  # the lowest / highest menu format: the mix can only be that same uniform model
        mixed = mixed_at(uniform[fmt]["file_bytes"])
        show(f"mixed at uniform {fmt} bytes", mixed)
        rows.append({"budget": f"uniform {fmt}", "uniform": uniform[fmt], "mixed": mixed,
                     "mixed_kl_over_uniform": mixed["kl_teacher_model"] / uniform[fmt]["kl_teacher_model"]})

    fewer = None  # (b) fewer bytes than uniform q5_0
    if "q5_0" in uniform:
        fewer = mixed_at(int(0.9 * uniform["q5_0"]["file_bytes"]))
        show("mixed at 0.9 x q5_0 bytes", fewer)
        fewer["kl_over_uniform_q5_0"] = fewer["kl_teacher_model"] / uniform["q5_0"]["kl_teacher_model"]

    lo, hi = uniform["q4_0"]["file_bytes"], uniform["q8_0"]["file_bytes"]  # (c) the curve
    curve = []
    for f in CURVE:
        curve.append(mixed_at(int(lo + f * (hi - lo))))
        show(f"mixed at {curve[-1]['budget_bytes'] / 1e6:.1f} MB", curve[-1])

    # Uniform menu formats joined by straight lines: what picking between uniform files gets you; a mix below it wins.
    def uniform_line(nbytes: int) -> float:
        pts = sorted((uniform[f]["file_bytes"], uniform[f]["kl_teacher_model"]) for f in formats if f in uniform)
        for (b0, k0), (b1, k1) in zip(pts, pts[1:]):
            if b0 <= nbytes <= b1:
                return k0 + (k1 - k0) * (nbytes - b0) / (b1 - b0)
        return float("nan")

    for m in curve:
        m["uniform_interpolated_kl"] = uniform_line(m["file_bytes"])
        # the best uniform menu format that fits in the same bytes (what a user without a mix would ship)
        fits = [uniform[f] for f in formats if f in uniform and uniform[f]["file_bytes"] <= m["budget_bytes"]]
        best = min(fits, key=lambda u: u["kl_teacher_model"]) if fits else None
        m["best_uniform_that_fits"] = best and {"format": best["format"], "kl_teacher_model": best["kl_teacher_model"]}

    plot = ROOT / "docs" / "img" / "mixed_vs_uniform.png"
    _plot(plot, uniform, formats, rows, fewer, curve)
    write_result("mixed_vs_uniform", {
        "command": " ".join(["python", "benchmarks/mixed_vs_uniform.py", *sys.argv[1:]]), "method": "RTN post-training, whole teacher",
        "calibration": "8 train blocks x 256 tokens", "held_out_tokens": int(test[:, 1:].size),
        "formats": list(formats), "uniform": uniform, "rows": rows, "mixed_at_0.9x_q5_0": fewer, "curve": curve,
        "plot": str(plot.relative_to(ROOT)),
        "reference": "corrected" if teacher.path != original_path else "original", "reference_path": teacher.path,
        "sensitivity": sensitivity.to_dict()})


def _plot(path: Path, uniform: dict, formats, rows: list, fewer: dict | None, curve: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgestill.evaluate.report import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.2))
    menu = sorted((u["file_bytes"] / 1e6, u["kl_teacher_model"], f) for f, u in uniform.items() if f in formats)
    ax.plot([m[0] for m in menu], [m[1] for m in menu], "o--", color="tab:gray",
            label="uniform formats (dashed: linear interpolation between them)")
    for mb, kl, f in menu:
        ax.annotate(f.upper(), (mb, kl), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for f, u in uniform.items():
        if f not in formats:
            ax.plot(u["file_bytes"] / 1e6, u["kl_teacher_model"], "x", color="tab:red")
            ax.annotate(f"{f.upper()} (not in the mix menu)", (u["file_bytes"] / 1e6, u["kl_teacher_model"]),
                        textcoords="offset points", xytext=(6, -10), fontsize=8, color="tab:red")
    pts = sorted([*(r["mixed"] for r in rows), *([fewer] if fewer else []), *curve], key=lambda m: m["file_bytes"])
    ax.plot([m["file_bytes"] / 1e6 for m in pts], [m["kl_teacher_model"] for m in pts], "s-", color="tab:blue",
            label="sensitivity-aware mix (q8_0/q5_0/q4_0)")
    ax.set_xlabel("GGUF file (MB)")
    ax.set_ylabel("held-out KL(teacher || model)")
    ax.set_ylim(bottom=0)
    ax.set_title("SmolLM2-135M, round-to-nearest: per-layer mix vs one format")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
