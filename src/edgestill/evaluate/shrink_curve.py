"""The shrink curve: quality retained against compression, with the break points marked.

A point is one deployable model: its `compression_x_fp32` (teacher params × 4 bytes ÷ the artifact's
bytes) and its retention (teacher ppl ÷ model ppl) and top-1 agreement on held-out text. A break
point at threshold t is the most compressed *measured* point that still keeps retention ≥ t (no
interpolation: a curve between two measured points is a guess). The llama.cpp quantizer's curve of
the teacher (Q8_0 → Q2_K) is drawn on the same axes as the baseline.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgestill.evaluate.report import save_figure
from edgestill.files import write_text_atomic


@dataclass
class ShrinkPoint:
    name: str
    compression_x_fp32: float
    retention: float
    top1_agreement: float
    bytes: int
    series: str = "edgestill"  # or "llama.cpp" for the baseline
    perplexity: float | None = None
    detail: dict = field(default_factory=dict)  # plan, run folder, command
    compression_x_source: float | None = None  # against the teacher file the user started from (< 1: larger than it)

    def to_dict(self) -> dict:
        return asdict(self)


def break_points(points: list[ShrinkPoint], thresholds=(0.95, 0.90)) -> dict[str, dict | None]:
    """{"0.95": the most compressed point with retention >= 0.95 (or None), ...}."""
    out = {}
    for t in thresholds:
        keeping = [p for p in points if p.retention >= t]
        best = max(keeping, key=lambda p: p.compression_x_fp32, default=None)
        out[f"{t:.2f}"] = None if best is None else {"name": best.name, "compression_x_fp32": best.compression_x_fp32,
                                                      "retention": best.retention, "bytes": best.bytes}
    return out


def plot_shrink_curve(points: list[ShrinkPoint], path: Path, thresholds=(0.95, 0.90), title: str = "",
                      retention_label: str = "retention (teacher ppl ÷ model ppl)",
                      edgestill_label: str = "edgestill (slice + QAT/KD)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {"edgestill": dict(color="tab:blue", marker="o"), "llama.cpp": dict(color="tab:gray", marker="s", ls="--")}
    for series in sorted({p.series for p in points}, key=lambda s: s != "edgestill"):
        pts = sorted((p for p in points if p.series == series), key=lambda p: p.compression_x_fp32)
        style = styles.get(series, dict(marker="^"))
        label = edgestill_label if series == "edgestill" else f"{series} quantizer, teacher"
        xs = [p.compression_x_fp32 for p in pts]
        ax.plot(xs, [p.retention for p in pts], label=label, **style)
        ax2.plot(xs, [p.top1_agreement for p in pts], label=label, **style)
        ours = series == "edgestill"
        for i, p in enumerate(pts):  # ours above-right, the baseline's below, alternating to keep labels apart
            name = p.name.removeprefix(f"{series} ")
            offset = (4, 5) if ours else (4, -11 if i % 2 == 0 else -20)
            for a, y in ((ax, p.retention), (ax2, p.top1_agreement)):
                a.annotate(name, (p.compression_x_fp32, y), fontsize=7, xytext=offset, textcoords="offset points",
                           color=style.get("color", "black"))
    for t, bp in break_points([p for p in points if p.series == "edgestill"], thresholds).items():
        ax.axhline(float(t), color="tab:red", lw=0.8, alpha=0.5, ls=":")
        ax.annotate(f"{float(t):.0%}", (1, float(t)), xycoords=("axes fraction", "data"), fontsize=7, color="tab:red",
                    xytext=(-22, 2), textcoords="offset points")
        if bp:
            ax.plot([bp["compression_x_fp32"]], [bp["retention"]], marker="*", ms=15, color="tab:red", zorder=5,
                    label=f"break point ≥{float(t):.0%}: {bp['compression_x_fp32']:.1f}×")
    xs_all = [p.compression_x_fp32 for p in points]
    for a, ylabel in ((ax, retention_label), (ax2, "top-1 agreement with the teacher")):
        a.set_xscale("log")
        a.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 1.5, 2, 3, 4, 5, 6, 8)))
        a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        a.xaxis.set_minor_formatter(NullFormatter())
        if xs_all:
            a.set_xlim(min(xs_all) / 1.15, max(xs_all) * 1.3)
        a.set_xlabel("compression_x_fp32 (teacher fp32 bytes ÷ file bytes, log)")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(title or "Shrink curve")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _dropped_html(dropped: list[dict]) -> str:
    """The budgets that have no point on the curve, each with the reason it was dropped."""
    if not dropped:
        return ""
    items = "".join(f"<li>{d['max_file_bytes'] / 1e6:.1f} MB ({d['budget_fraction']:.4g} of the teacher): "
                    f"{html.escape(d['reason'])}</li>" for d in dropped)
    return f"<h2>Budgets without a point</h2><ul>{items}</ul>"


def write_shrink_report(folder: Path, points: list[ShrinkPoint], meta: dict, thresholds=(0.95, 0.90)) -> dict:
    """shrink_curve.json, shrink_curve.png and a self-contained report.html in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ours = [p for p in points if p.series == "edgestill"]
    result = {**meta, "thresholds": list(thresholds), "break_points": break_points(ours, thresholds),
              "points": [p.to_dict() for p in sorted(points, key=lambda p: (p.series, p.compression_x_fp32))]}
    write_text_atomic(folder / "shrink_curve.json", json.dumps(result, indent=1))
    png = folder / "shrink_curve.png"
    plot_shrink_curve(points, png, thresholds, meta.get("title", ""))
    rows = "".join(
        f"<tr><td>{html.escape(p.series)}</td><td>{html.escape(p.name)}</td><td>{p.compression_x_fp32:.2f}×</td>"
        f"<td>{p.bytes / 1e6:.1f} MB</td><td>{'' if p.perplexity is None else f'{p.perplexity:.2f}'}</td>"
        f"<td>{p.retention:.3f}</td><td>{p.top1_agreement:.3f}</td></tr>"
        for p in sorted(points, key=lambda p: (p.series, p.compression_x_fp32)))
    bps = "".join(f"<li>retention ≥ {float(t):.0%}: " + (f"<b>{bp['compression_x_fp32']:.2f}×</b> ({html.escape(bp['name'])}, "
                                                          f"retention {bp['retention']:.3f})" if bp else "no measured point")
                  + "</li>" for t, bp in result["break_points"].items())
    image = base64.b64encode(png.read_bytes()).decode()
    page = f"""<!doctype html><meta charset="utf-8"><title>edgestill shrink curve</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 10px;text-align:right}}</style>
<h1>Shrink curve</h1><p>{html.escape(meta.get('title', ''))}</p>
<img src="data:image/png;base64,{image}" style="max-width:100%">
<h2>Break points (most compressed measured point keeping the retention)</h2><ul>{bps}</ul>
<h2>Points</h2><table><tr><th>series</th><th>model</th><th>compression_x_fp32</th><th>bytes</th><th>ppl</th>
<th>retention</th><th>top-1</th></tr>{rows}</table>
<p>{html.escape(meta.get('note', ''))}</p>{_dropped_html(meta.get('dropped_budgets') or [])}"""
    write_text_atomic(folder / "report.html", page)
    return result
