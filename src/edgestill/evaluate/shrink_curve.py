"""The shrink curve: fidelity and quality kept against file size, with the break points marked.

A point is one deployable file, measured against the *reference* (the corrected teacher, or the teacher as given
when teacher.correct=false; the names are docs/references.md#measurement-conventions):

    bytes                  the file on disk (a device loads exactly this)
    compression_x_fp32/16  reference params × 4 (× 2) ÷ bytes;  compression_x_source: the user's teacher file ÷ bytes
    kl_teacher_student     mean token KL(reference ‖ model), nats         fidelity: does it say what the reference says?
    top1_agreement         share of positions with the reference's argmax
    retention              reference perplexity ÷ model perplexity        quality on the domain
    out_of_domain          the same three on general text nothing trained on (None: not measured)

Three series: "edgestill" (the sweep's students), "llama.cpp" (llama.cpp's own quantizer of the reference, the
strongest simple baseline) and "original file" (the teacher file the user started from, run by llama.cpp).

Fidelity comes first. Retention alone flatters a student distilled on a domain (it can score a better perplexity
than the reference while saying different things), and it cannot compare a trained student with PTQ, which never
sees the domain. So a break point is defined on each measure (`Criterion`): the smallest *measured* file that
still meets it (no interpolation: a curve between two measured points is a guess), per series, so the edgestill
and llama.cpp curves are compared at the same bar. The default bars (DEFAULT_*_THRESHOLDS) are placed between
llama.cpp's own quantization levels of the default teacher (SmolLM2-135M scored by llama.cpp against the teacher
as given, before teacher correction existed, on the held-out plays: benchmarks/results/quant_table.json and
shrink_curve.json of 2026-11-30):

    top-1 agreement  Q8_0 0.95  Q6_K 0.93 | 0.90 | Q4_K_M 0.84  Q5_K_M 0.82 | 0.80 | Q3_K_M 0.76  Q2_K 0.59
    KL, nats/token   Q8_0 0.005  Q6_K 0.013  Q4_K_M 0.066  Q5_K_M 0.097 | 0.10 | Q3_K_M 0.15 | 0.25 | Q2_K 0.47

so "top-1 ≥ 0.90" reads "near-lossless, as faithful as a 6-bit file"; "top-1 ≥ 0.80" and "KL ≤ 0.10" read "as
faithful as the 4-5 bit K-quants people ship"; "KL ≤ 0.25" reads "no worse than a 3-bit K-quant", and past it
lies Q2_K, whose loss is large even on Llama-3-8B (+3.5 perplexity in llama.cpp's published figures). Small models
are hit harder than the 7-8B ones those published figures describe, which is why the bars are read off this teacher.
They are fixed numbers (SweepSettings can change them), not re-derived per run, so two sweeps compare.
In-domain retention keeps its two bars (0.95, 0.90) for continuity with earlier curves.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edgestill.evaluate.report import save_figure
from edgestill.files import write_text_atomic

EDGESTILL, LLAMA_CPP, ORIGINAL_FILE = "edgestill", "llama.cpp", "original file"  # the series
DEFAULT_RETENTION_THRESHOLDS = (0.95, 0.90)
DEFAULT_TOP1_THRESHOLDS = (0.90, 0.80)
DEFAULT_KL_THRESHOLDS = (0.10, 0.25)  # nats/token
# What each row records of the environment it was measured in (BENCHMARKS.md: per row when rows were measured apart).
PROVENANCE_KEYS = ("command", "git_commit", "git_dirty", "date_start", "date", "cpu_model", "threads",
                   "load_average_before", "load_average_after")


@dataclass
class ShrinkPoint:
    name: str
    compression_x_fp32: float
    retention: float  # in domain, reference ppl ÷ model ppl
    top1_agreement: float
    bytes: int
    series: str = EDGESTILL  # or LLAMA_CPP, ORIGINAL_FILE
    perplexity: float | None = None
    detail: dict = field(default_factory=dict)  # plan, run folder, GGUF path
    compression_x_source: float | None = None  # against the teacher file the user started from (< 1: larger than it)
    compression_x_fp16: float | None = None
    kl_teacher_student: float | None = None  # mean token KL(reference ‖ model), nats
    reference: str | None = None  # "corrected" or "original": the teacher every figure is measured against
    out_of_domain: dict | None = None  # {retention, top1_agreement, kl_teacher_student, perplexity}; None: not measured
    environment: dict | None = None  # where and with which code this row was measured (PROVENANCE_KEYS)
    train_tokens: int | None = None  # tokens the student was distilled on (steps x batch x sequence); None: no training
    train_budget: str | None = None  # the distill.budget that set them (None: distill.steps)
    levers: dict | None = None  # what made an edgestill point small (levers_used); None for a file not shrunk by us

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShrinkPoint:
        """A point from to_dict()'s output; keys a filed row adds beside them (a benchmark's `selection`) are dropped."""
        keys = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in keys})

    @classmethod
    def from_metrics(cls, name: str, m: dict, detail: dict | None = None) -> ShrinkPoint:
        """The point of a finished shrink run, from its metrics.json (its student file against its reference)."""
        ood = m.get("out_of_domain")
        return cls(name, m["compression_x_fp32"], m["retention"], m["top1_agreement"], m["student"]["bytes"],
                   perplexity=m["student"]["perplexity"], detail=detail or {},
                   compression_x_source=m.get("compression_x_source"), compression_x_fp16=m.get("compression_x_fp16"),
                   kl_teacher_student=m.get("kl_teacher_student"), reference=m.get("reference"),
                   out_of_domain=None if not ood else {"retention": ood["retention"], "top1_agreement": ood["top1_agreement"],
                                                       "kl_teacher_student": ood["kl_teacher_student"],
                                                       "perplexity": ood.get("student_perplexity")},
                   environment=provenance(m.get("environment")), train_tokens=(m.get("train") or {}).get("tokens"),
                   train_budget=((m.get("train") or {}).get("budget") or {}).get("budget"), levers=levers_used(m))


def levers_used(m: dict) -> dict:
    """The levers a shrink run pulled, from its metrics.json; each is None when left alone. `layers`, `ffn` and
    `hidden`: [student, teacher] (depth slicing, FFN-width and hidden-channel cuts); `vocab`: [student, teacher] (a
    trimmed vocabulary); `format`: the GGUF weight format QAT trained in (a point named "+mix" has per-unit formats on
    top); `low_rank`: the share of parameters the factorised blocks keep and how many matrices were factorised. Runs from before the teacher's
    FFN width was recorded read it as the student's."""
    s, t = m["student"], m.get("teacher") or {}

    def sliced(key: str, teacher_value) -> list | None:
        return [s.get(key), teacher_value] if s.get(key) != teacher_value else None

    trim, low_rank = m.get("vocab_trim"), s.get("low_rank")
    return {"layers": sliced("num_layers", t.get("num_layers")),
            "ffn": sliced("intermediate_size", t.get("intermediate_size", s.get("intermediate_size"))),
            "hidden": sliced("hidden_size", t.get("hidden_size", s.get("hidden_size"))),
            "vocab": [trim["student_vocab"], trim["teacher_vocab"]] if trim else None,
            "format": s.get("quant"),
            "low_rank": {k: v for k, v in low_rank.items() if k != "ranks"} if low_rank else None}


def provenance(env: dict | None) -> dict | None:
    """The PROVENANCE_KEYS of an environment record (evaluate/environment.py), or None when there is none."""
    return None if env is None else {k: env.get(k) for k in PROVENANCE_KEYS}


@dataclass(frozen=True)
class Criterion:
    """A bar a point meets or not: `measure` (a ShrinkPoint field) >= threshold, or <= for the KL."""

    measure: str  # "retention", "top1_agreement" or "kl_teacher_student"
    threshold: float

    @property
    def rule(self) -> str:
        return "<=" if self.measure == "kl_teacher_student" else ">="

    @property
    def key(self) -> str:
        return f"{self.measure}{self.rule}{self.threshold:.2f}"

    def holds(self, point: ShrinkPoint) -> bool:
        value = getattr(point, self.measure)
        if value is None:
            return False
        return value <= self.threshold if self.rule == "<=" else value >= self.threshold

    def describe(self) -> str:
        return {"retention": f"in-domain retention ≥ {self.threshold:.0%} (reference perplexity ÷ model perplexity "
                             "on the held-out split)",
                "top1_agreement": f"top-1 agreement ≥ {self.threshold:.2f} (share of held-out positions where the "
                                  "model's most likely next token is the reference's)",
                "kl_teacher_student": f"KL ≤ {self.threshold:.2f} nats/token (mean KL(reference ‖ model) on the "
                                      "held-out split)"}[self.measure]


def criteria(retention=DEFAULT_RETENTION_THRESHOLDS, top1=DEFAULT_TOP1_THRESHOLDS,
             kl=DEFAULT_KL_THRESHOLDS) -> list[Criterion]:
    """Fidelity first: the KL bars, the top-1 bars, then in-domain retention."""
    return ([Criterion("kl_teacher_student", t) for t in kl] + [Criterion("top1_agreement", t) for t in top1]
            + [Criterion("retention", t) for t in retention])


def break_point(points: list[ShrinkPoint], criterion: Criterion) -> ShrinkPoint | None:
    """The smallest measured file meeting `criterion` (a non-monotone curve: a better point further out counts)."""
    return min((p for p in points if criterion.holds(p)), key=lambda p: p.bytes, default=None)


def _summary(p: ShrinkPoint | None) -> dict | None:
    if p is None:
        return None
    keys = ("name", "bytes", "compression_x_fp32", "compression_x_fp16", "compression_x_source", "retention",
            "top1_agreement", "kl_teacher_student")
    return {k: getattr(p, k) for k in keys}


def break_points(points: list[ShrinkPoint], bars: list[Criterion] | None = None) -> dict[str, dict]:
    """{criterion.key: {measure, rule, threshold, description, "edgestill": point | None, "llama.cpp": point | None}}.

    Each series is judged on its own (the original file is one point, not a curve, and has none). A point is
    {name, bytes, compression_x_fp32, compression_x_fp16, compression_x_source, retention, top1_agreement,
    kl_teacher_student}; None when no measured file of that series meets the bar.
    """
    bars = criteria() if bars is None else bars
    series = [EDGESTILL, LLAMA_CPP] + sorted({p.series for p in points} - {EDGESTILL, LLAMA_CPP, ORIGINAL_FILE})
    return {c.key: {"measure": c.measure, "rule": c.rule, "threshold": c.threshold, "description": c.describe(),
                    **{s: _summary(break_point([p for p in points if p.series == s], c)) for s in series}}
            for c in bars}


def break_point_lines(result: dict) -> list[str]:
    """One line per break point of a shrink_curve.json, edgestill beside llama.cpp (for the console)."""
    def one(bp: dict | None) -> str:
        if bp is None:
            return "none measured"
        return f"{bp['bytes'] / 1e6:.1f} MB ({bp['name']}, {bp['compression_x_fp32']:.2f}x vs fp32)"

    return [f"break point, {key}: edgestill {one(bp.get(EDGESTILL))}; llama.cpp {one(bp.get(LLAMA_CPP))}"
            for key, bp in result["break_points"].items()]


def plot_shrink_curve(points: list[ShrinkPoint], path: Path, thresholds=DEFAULT_RETENTION_THRESHOLDS, title: str = "",
                      retention_label: str = "retention (teacher ppl ÷ model ppl)",
                      edgestill_label: str = "edgestill (slice + QAT/KD)") -> None:
    """Retention and top-1 agreement against compression_x_fp32 (the classifier run's curve, one point per type)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for series in sorted({p.series for p in points}, key=lambda s: s != EDGESTILL):
        pts = sorted((p for p in points if p.series == series), key=lambda p: p.compression_x_fp32)
        style = _STYLES.get(series, {"marker": "^"})
        label = edgestill_label if series == EDGESTILL else f"{series} quantizer, teacher"
        xs = [p.compression_x_fp32 for p in pts]
        ax.plot(xs, [p.retention for p in pts], label=label, **style)
        ax2.plot(xs, [p.top1_agreement for p in pts], label=label, **style)
        for i, p in enumerate(pts):  # ours above-right, the baseline's below, alternating to keep labels apart
            offset = (4, 5) if series == EDGESTILL else (4, -11 if i % 2 == 0 else -20)
            for a, y in ((ax, p.retention), (ax2, p.top1_agreement)):
                a.annotate(p.name.removeprefix(f"{series} "), (p.compression_x_fp32, y), fontsize=7, xytext=offset,
                           textcoords="offset points", color=style.get("color", "black"))
    ours = [p for p in points if p.series == EDGESTILL]
    for t in thresholds:
        ax.axhline(t, color="tab:red", lw=0.8, alpha=0.5, ls=":")
        bp = break_point(ours, Criterion("retention", t))
        if bp:
            ax.plot([bp.compression_x_fp32], [bp.retention], marker="*", ms=15, color="tab:red", zorder=5,
                    label=f"break point ≥{t:.0%}: {bp.compression_x_fp32:.1f}×")
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


_STYLES = {EDGESTILL: {"color": "tab:blue", "marker": "o"}, LLAMA_CPP: {"color": "tab:gray", "marker": "s", "ls": "--"},
           ORIGINAL_FILE: {"color": "black", "marker": "D", "ms": 9, "ls": "none"}}
_LABELS = {EDGESTILL: "edgestill (slice + QAT/KD)", LLAMA_CPP: "llama.cpp quantizer of the reference",
           ORIGINAL_FILE: "the original teacher file (llama.cpp)"}
# (panel title / y label, value of a point or None)
_PANELS = (("KL(reference ‖ model), nats/token, in domain", lambda p: p.kl_teacher_student),
           ("top-1 agreement with the reference, in domain", lambda p: p.top1_agreement),
           ("retention, in domain (reference ppl ÷ model ppl)", lambda p: p.retention),
           ("retention, out of domain (general English)", lambda p: (p.out_of_domain or {}).get("retention")))
_PANEL_MEASURE = ("kl_teacher_student", "top1_agreement", "retention", None)


def plot_fidelity_curve(points: list[ShrinkPoint], path: Path, bars: list[Criterion] | None = None, title: str = "",
                        source_bytes: int | None = None) -> None:
    """Four panels against the file size in MB (log): KL, top-1 agreement, in-domain and out-of-domain retention.

    The original file is its own marker, and its size a vertical line; with `source_bytes` the top axis reads
    compression_x_source (that file's bytes ÷ a point's; under 1× the point is bigger). Each bar of `bars` is a
    horizontal line on its panel, with the edgestill break point as a filled star and llama.cpp's as a hollow one.
    """
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    bars = criteria() if bars is None else bars
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    sizes = [p.bytes / 1e6 for p in points] + ([source_bytes / 1e6] if source_bytes else [])
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    for ax, (ylabel, value), measure in zip(axes.flat, _PANELS, _PANEL_MEASURE):
        drawn = _draw_series(ax, points, value)
        for c in (c for c in bars if c.measure == measure):
            _draw_bar(ax, points, c)
        if not drawn:
            ax.text(0.5, 0.5, "not measured (eval.out_of_domain is null)", transform=ax.transAxes, ha="center",
                    color="gray")
        if measure == "kl_teacher_student" and drawn and all(v > 0 for v in drawn):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
        ax.set_xscale("log")
        if sizes:  # the same x range on every panel, so the panels read across
            ax.set_xlim(min(sizes) / 1.25, max(sizes) * 1.25)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        if source_bytes:
            ax.axvline(source_bytes / 1e6, color="black", lw=0.8, ls=":")
            ax.annotate(f"original file, {source_bytes / 1e6:.1f} MB", (source_bytes / 1e6, 0), rotation=90, fontsize=7,
                        xycoords=("data", "axes fraction"), xytext=(-9, 4), textcoords="offset points", va="bottom")
            ratio = lambda v: source_bytes / 1e6 / np.maximum(v, 1e-12)  # MB <-> × smaller: its own inverse
            top = ax.secondary_xaxis("top", functions=(ratio, ratio))
            top.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 1.5, 2, 3, 5, 7)))
            top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
            top.xaxis.set_minor_formatter(NullFormatter())
            top.set_xlabel("compression_x_source: original file ÷ this file (under 1×: bigger than the original)", fontsize=8)
        ax.set_xlabel("file size, MB (log)")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        stars = [(h, label) for h, label in zip(*ax.get_legend_handles_labels()) if " break point," in label]
        if stars:
            ax.legend(*zip(*stars), fontsize=7, loc="best")
    series = [(h, label) for h, label in zip(*axes.flat[0].get_legend_handles_labels()) if " break point," not in label]
    if series:
        fig.legend(*zip(*series), loc="lower center", ncol=len(series), fontsize=8, frameon=False)
    fig.suptitle(title or "Shrink curve")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, path, dpi=110)


def _draw_series(ax, points: list[ShrinkPoint], value) -> list[float]:
    """Every series' points that have this panel's value; returns the values drawn."""
    drawn = []
    for series in sorted({p.series for p in points}, key=lambda s: (s != EDGESTILL, s)):
        pts = sorted((p for p in points if p.series == series and value(p) is not None), key=lambda p: p.bytes)
        if not pts:
            continue
        style = _STYLES.get(series, {"marker": "^"})
        ys = [value(p) for p in pts]
        ax.plot([p.bytes / 1e6 for p in pts], ys, label=_LABELS.get(series, series), **style)
        for i, p in enumerate(pts):  # ours above-right, the others below, alternating to keep labels apart
            offset = (4, 5) if series == EDGESTILL else (4, -11 if i % 2 == 0 else -20)
            name = ORIGINAL_FILE if series == ORIGINAL_FILE else p.name.removeprefix(f"{series} ")
            ax.annotate(name, (p.bytes / 1e6, value(p)), fontsize=6, xytext=offset, textcoords="offset points",
                        color=style.get("color", "black"))
        drawn += ys
    return drawn


def _draw_bar(ax, points: list[ShrinkPoint], c: Criterion) -> None:
    ax.axhline(c.threshold, color="tab:red", lw=0.8, alpha=0.5, ls=":")
    for series, face in ((EDGESTILL, "tab:red"), (LLAMA_CPP, "none")):
        bp = break_point([p for p in points if p.series == series], c)
        if bp is not None:
            ax.plot([bp.bytes / 1e6], [getattr(bp, c.measure)], marker="*", ms=15, mfc=face, mec="tab:red", ls="none",
                    zorder=5, label=f"{series} break point, {c.rule} {c.threshold:g}: {bp.bytes / 1e6:.1f} MB ({bp.name})")


def _dropped_html(dropped: list[dict]) -> str:
    """The budgets that have no point on the curve, each with the reason it was dropped."""
    if not dropped:
        return ""
    items = "".join(f"<li>{d['max_file_bytes'] / 1e6:.1f} MB ({d['budget_fraction']:.4g} of the teacher): "
                    f"{html.escape(d['reason'])}</li>" for d in dropped)
    return f"<h2>Budgets without a point</h2><ul>{items}</ul>"


def _f(x, fmt: str = "{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


def _bp_cell(bp: dict | None) -> str:
    if bp is None:
        return "no measured file"
    return (f"<b>{bp['bytes'] / 1e6:.1f} MB</b> ({html.escape(bp['name'])}; {_f(bp['compression_x_fp16'], '{:.2f}')}× "
            f"vs fp16, {_f(bp['compression_x_source'], '{:.2f}')}× vs the original file)")


def _tokens(p: ShrinkPoint) -> str:
    if p.train_tokens is None:
        return "–"
    return f"{p.train_tokens:,}" + (f" ({html.escape(p.train_budget)})" if p.train_budget else "")


def _points_html(points: list[ShrinkPoint]) -> str:
    head = ("<tr><th>series</th><th>model</th><th>MB</th><th>× fp16</th><th>× original file</th><th>KL</th>"
            "<th>top-1</th><th>retention</th><th>ppl</th><th>KL, out of domain</th><th>top-1, out of domain</th>"
            "<th>retention, out of domain</th><th>trained on (tokens)</th><th>commit</th></tr>")
    rows = []
    for p in sorted(points, key=lambda p: (p.series, -p.bytes)):
        ood, env = p.out_of_domain or {}, p.environment or {}
        commit = (env.get("git_commit") or "")[:8] + (" (dirty)" if env.get("git_dirty") else "")
        rows.append(f"<tr><td>{html.escape(p.series)}</td><td>{html.escape(p.name)}</td><td>{p.bytes / 1e6:.1f}</td>"
                    f"<td>{_f(p.compression_x_fp16, '{:.2f}')}</td><td>{_f(p.compression_x_source, '{:.2f}')}</td>"
                    f"<td>{_f(p.kl_teacher_student, '{:.3g}')}</td><td>{p.top1_agreement:.3f}</td><td>{p.retention:.3f}</td>"
                    f"<td>{_f(p.perplexity, '{:.2f}')}</td><td>{_f(ood.get('kl_teacher_student'), '{:.3g}')}</td>"
                    f"<td>{_f(ood.get('top1_agreement'))}</td><td>{_f(ood.get('retention'))}</td>"
                    f"<td>{_tokens(p)}</td><td>{html.escape(commit)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def write_shrink_report(folder: Path, points: list[ShrinkPoint], meta: dict, bars: list[Criterion] | None = None) -> dict:
    """shrink_curve.json, shrink_curve.png and a self-contained report.html in `folder`; returns the JSON.

    The JSON: `meta`'s keys, "thresholds" ({measure: [bars]}), "break_points" (break_points()) and "points"
    (ShrinkPoint.to_dict(), by series then size).
    """
    bars = criteria() if bars is None else bars
    folder.mkdir(parents=True, exist_ok=True)
    thresholds = {m: [c.threshold for c in bars if c.measure == m] for m in ("kl_teacher_student", "top1_agreement", "retention")}
    result = {**meta, "thresholds": thresholds, "break_points": break_points(points, bars),
              "points": [p.to_dict() for p in sorted(points, key=lambda p: (p.series, -p.bytes))]}
    write_text_atomic(folder / "shrink_curve.json", json.dumps(result, indent=1))
    png = folder / "shrink_curve.png"
    plot_fidelity_curve(points, png, bars, meta.get("title", ""), (meta.get("source_file") or {}).get("bytes"))
    bps = "".join(f"<tr><td>{html.escape(key)}</td><td style='text-align:left'>{html.escape(bp['description'])}</td>"
                  f"<td>{_bp_cell(bp.get(EDGESTILL))}</td><td>{_bp_cell(bp.get(LLAMA_CPP))}</td></tr>"
                  for key, bp in result["break_points"].items())
    reference = ("the corrected teacher (the teacher fine-tuned on the training split; the students were sliced "
                 "from and distilled from it)" if meta.get("reference") == "corrected" else "the teacher as given")
    image = base64.b64encode(png.read_bytes()).decode()
    page = f"""<!doctype html><meta charset="utf-8"><title>edgestill shrink curve</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}td,th{{padding:2px 8px;text-align:right}}</style>
<h1>Shrink curve</h1><p>{html.escape(meta.get('title', ''))}</p>
<p>Every figure (every series) is measured against the reference: {html.escape(reference)}. KL and top-1 agreement
say how faithfully a file reproduces the reference's next-token distribution; retention how good its perplexity is.
Out of domain: the same figures on general text that no training or calibration touched.</p>
<img src="data:image/png;base64,{image}" style="max-width:100%">
<h2>Break points: the smallest measured file meeting each bar, per series</h2>
<table><tr><th>break point</th><th style="text-align:left">what it means</th><th>edgestill</th><th>llama.cpp</th></tr>
{bps}</table>
<h2>Points</h2>{_points_html(points)}
<p>{html.escape(meta.get('note', ''))}</p>{_dropped_html(meta.get('dropped_budgets') or [])}"""
    write_text_atomic(folder / "report.html", page)
    return result
