"""Run reports: metrics.json, report.md, report.html (self-contained, plots inlined) and the
one-screen console summary. Plots: training loss, and teacher-vs-student per-token loss."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from edgestill.evaluate.what_broke import what_broke_line, what_broke_tables
from edgestill.files import atomic_path, write_text_atomic


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Write a matplotlib figure as PNG atomically (a temp file renamed over `path`) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, f"saving {Path(path).name}") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def plot_training(history: list[dict], path: Path, selection: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="total loss", lw=1.5)
    ax.plot(steps, [h["kd"] for h in history], label="KD (KL teacher‖student)", lw=1)
    ax.plot(steps, [h["ce"] for h in history], label="CE (next token)", lw=1)
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", label="validation CE", color="black")
    val_kl = [(h["step"], h["kl_teacher_student"]) for h in history if "kl_teacher_student" in h]
    if selection and selection.get("start", {}).get("kl_teacher_student") is not None:
        val_kl.insert(0, (selection["start"]["step"], selection["start"]["kl_teacher_student"]))
    if val_kl:
        ax.plot(*zip(*val_kl), "s--", label="validation KL(teacher‖student)", color="tab:red")
    if selection:
        ax.axvline(selection["selected_step"], color="grey", ls=":", label=f"kept: step {selection['selected_step']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Distillation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_token_loss(teacher_nll: np.ndarray, student_nll: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, s = teacher_nll.ravel(), student_nll.ravel()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    hb = a.hexbin(t, s, gridsize=45, bins="log", cmap="viridis", mincnt=1)
    top = float(np.percentile(np.concatenate([t, s]), 99.5))
    a.plot([0, top], [0, top], "r--", lw=1, label="student = teacher")
    a.set_xlim(0, top)
    a.set_ylim(0, top)
    a.set_xlabel("teacher NLL per token")
    a.set_ylabel("student NLL per token")
    a.set_title("Held-out tokens: student vs teacher loss")
    a.legend(loc="upper left")
    fig.colorbar(hb, ax=a, label="tokens (log)")
    bins = np.linspace(0, top, 60)
    b.hist(t, bins=bins, alpha=0.55, label=f"teacher (mean {t.mean():.2f})")
    b.hist(s, bins=bins, alpha=0.55, label=f"student (mean {s.mean():.2f})")
    b.set_xlabel("NLL per token (nats)")
    b.set_ylabel("tokens")
    b.set_title("Distribution of per-token loss")
    b.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _rows(m: dict) -> list[tuple[str, str, str, str]]:
    t, s = m["teacher"], m["student"]

    def f(x, fmt="{:,.2f}"):
        return "—" if x is None else fmt.format(x)

    return [
        ("held-out perplexity", f(t["perplexity"]), f(s["perplexity"]), f"retention {m['retention']:.3f}"),
        ("top-1 agreement with teacher", "1.000", f(m["top1_agreement"], "{:.3f}"), f"KL {m['kl_teacher_student']:.3f} nats/token"),
        ("parameters", f(t["params"], "{:,}"), f(s["params"], "{:,}"), f"{t['params'] / s['params']:.2f}× fewer"),
        ("bytes on disk", f(t["bytes"], "{:,}"), f(s["bytes"], "{:,}"),
         f"compression_x_fp32 {m['compression_x_fp32']:.2f}, _fp16 {m['compression_x_fp16']:.2f}"
         + (f", vs the teacher's own file {m['compression_x_source']:.2f}" if m.get("compression_x_source") else "")),
        ("prefill tokens/s", f(t["prefill_tokens_per_s"], "{:,.0f}"), f(s["prefill_tokens_per_s"], "{:,.0f}"),
         f"speedup_x {m['speedup_x_prefill']:.2f}"),
        ("decode tokens/s", f(t["decode_tokens_per_s"], "{:,.1f}"), f(s["decode_tokens_per_s"], "{:,.1f}"),
         f"speedup_x {m['speedup_x']:.2f}"),
    ]


def summary_text(m: dict) -> str:
    rows = _rows(m)
    w = [max(len(r[i]) for r in rows + [("", "teacher", "student", "")]) for i in range(4)]
    kept = m["student"]["layers_kept"]
    shape = f"layers {kept}" if kept is not None else f"{m['student']['num_layers']} layers"
    if m["student"].get("quant"):
        shape += f", {m['student']['quant']}"
    lines = [f"edgestill: {m['teacher']['name']} → student with {shape} "
             f"(held-out: {m['eval_tokens']:,} tokens of {', '.join(m['splits']['test'][:4])})"]
    lines += [f"  {line}" for line in [reference_line(m), selection_line(m)] if line]
    lines.append(f"  {'':{w[0]}}  {'teacher':>{w[1]}}  {'student':>{w[2]}}")
    for r in rows:
        lines.append(f"  {r[0]:{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]}")
    if m.get("baselines"):
        for name, b in m["baselines"].items():
            lines.append(f"  baseline {name}: perplexity {b['perplexity']:.2f}, retention {b['retention']:.3f}")
    lines += [f"  {line}" for line in [vocab_trim_line(m), what_broke_line(m)] if line]
    return "\n".join(lines)


def vocab_trim_line(m: dict) -> str | None:
    """What a trimmed vocabulary kept and what it costs on the teacher's text (None: the full vocabulary)."""
    v = m.get("vocab_trim")
    if not v:
        return None
    ood = v.get("out_of_domain") or {}
    line = (f"vocabulary: {v['student_vocab']:,} of the teacher's {v['teacher_vocab']:,} tokens kept; the student reads "
            f"{v['student_tokens_per_teacher_token']:.3f} tokens per teacher token in domain")
    if ood:
        line += f", {ood['student_tokens_per_teacher_token']:.3f} out of domain"
    line += (f"; the teacher's mass on trimmed tokens ({v['teacher_trimmed_mass']:.4f} in domain"
             + (f", {ood['teacher_trimmed_mass']:.4f} out" if ood else "") + ") is set aside by KL and top-1")
    return line


def reference_line(m: dict) -> str | None:
    """Which teacher the scores are against: the corrected one (with what the correction did) or the original."""
    c = m["teacher"].get("correction")
    if not c:
        return None
    orig = (m.get("original_teacher") or {}).get("perplexity")
    return (f"teacher = the reference: corrected on the training split ({c['best_step']} of {c['steps_run']} steps kept, "
            f"val loss {c['val_loss_before']:.3f} → {c['val_loss_best']:.3f})"
            + (f"; the original teacher's held-out perplexity is {orig:.2f}" if orig else ""))


def selection_line(m: dict) -> str | None:
    """Which evaluated state the student is (distill.select), against the student as cut and the last step."""
    sel = (m.get("train") or {}).get("selection")
    if not sel:
        return None
    key = sel["selected_on"]
    name = {"kl_teacher_student": "held-out KL to the teacher", "val_loss": "held-out CE"}.get(key, key)

    def at(rec):
        return f"{rec[key]:.4f}" if rec and rec.get(key) is not None else "n/a"

    kept = (f"the student as cut (step {sel['selected_step']}): training did not improve it"
            if sel["selected_step"] == sel["start"]["step"] else f"step {sel['selected_step']} of {sel['last_step']}")
    return (f"student = {kept}, chosen on {name} ({at(sel['start'])} as cut, {at(sel['selected'])} kept, "
            f"{at(sel['last'])} at the last step)")


def _md_table(caption: str, header: list[str], rows: list[tuple]) -> list[str]:
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = [caption, ""]
    if header:
        out += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
        out.append("")
    return out


def _html_table(caption: str, header: list[str], rows: list[tuple]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<p>{html.escape(caption)}</p>" + (f"<table><tr>{head}</tr>{body}</table>" if header else "")


def _markdown(m: dict, generations: list[dict]) -> str:
    out = [f"# edgestill run: {m['teacher']['name']} → {m['student']['params']:,}-parameter student", ""]
    out.append(f"Held-out split (never seen in distillation): {', '.join(m['splits']['test'])} "
               f"— {m['eval_tokens']:,} tokens. Speeds: transformers on this CPU, {m['teacher']['threads']} threads, median of {m['speed_repeats']} alternated runs.")
    for line in (reference_line(m), selection_line(m)):
        if line:
            out += ["", line[0].upper() + line[1:] + "."]
    out += ["", "| | teacher | student | |", "|---|---:|---:|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _rows(m)]
    if m.get("baselines"):
        out += ["", "Baselines (same held-out text):", ""]
        out += [f"- **{k}**: perplexity {v['perplexity']:.2f}, retention {v['retention']:.3f}" for k, v in m["baselines"].items()]
    out += ["", f"Student layers kept (of the teacher's {m['teacher']['num_layers']}): {m['student']['layers_kept']}",
            "", "![training loss](training_loss.png)", "", "![per-token loss](token_loss.png)", "", "## What broke", ""]
    for table in what_broke_tables(m):
        out += _md_table(*table)
    out += ["## Generations (greedy)", ""]
    for g in generations:
        out += [f"**Prompt:** `{g['prompt']!r}`", "", f"- teacher: {g['teacher']!r}", f"- student: {g['student']!r}", ""]
    return "\n".join(out)


def _html(m: dict, generations: list[dict], run_dir: Path) -> str:
    def img(name):
        data = base64.b64encode((run_dir / name).read_bytes()).decode()
        return f'<img alt="{name}" src="data:image/png;base64,{data}" style="max-width:100%">'

    rows = "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td><td>{c}</td><td>{html.escape(d)}</td></tr>" for a, b, c, d in _rows(m))
    gens = "".join(
        f"<h4>{html.escape(g['prompt'])}</h4><p><b>teacher:</b> <code>{html.escape(g['teacher'])}</code></p>"
        f"<p><b>student:</b> <code>{html.escape(g['student'])}</code></p>" for g in generations)
    broke = "".join(_html_table(*t) for t in what_broke_tables(m))
    base = "".join(f"<li><b>{html.escape(k)}</b>: perplexity {v['perplexity']:.2f}, retention {v['retention']:.3f}</li>"
                   for k, v in (m.get("baselines") or {}).items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgestill report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}
td:nth-child(2),td:nth-child(3){{text-align:right;font-family:monospace}}</style></head><body>
<h1>{html.escape(m['teacher']['name'])} → {m['student']['params']:,}-parameter student</h1>
<p>Held-out split: {html.escape(', '.join(m['splits']['test']))} ({m['eval_tokens']:,} tokens).</p>
<p>{html.escape(reference_line(m) or "")}</p>
<p>{html.escape(selection_line(m) or "")}</p>
<table><tr><th></th><th>teacher</th><th>student</th><th></th></tr>{rows}</table>
<ul>{base}</ul>
<p>Layers kept: {m['student']['layers_kept']}</p>
<h2>Training</h2>{img('training_loss.png')}
<h2>Per-token loss on held-out text</h2>{img('token_loss.png')}
<h2>What broke</h2>{broke}
<h2>Generations (greedy)</h2>{gens}
</body></html>"""


def write_report(run_dir: Path, metrics: dict, history: list[dict], comparison: dict, generations: list[dict]) -> None:
    plot_training(history, run_dir / "training_loss.png", (metrics.get("train") or {}).get("selection"))
    plot_token_loss(comparison["teacher_token_nll"], comparison["student_token_nll"], run_dir / "token_loss.png")
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    write_text_atomic(run_dir / "generations.json", json.dumps(generations, indent=2, ensure_ascii=False))
    write_text_atomic(run_dir / "report.md", _markdown(metrics, generations))
    write_text_atomic(run_dir / "report.html", _html(metrics, generations, run_dir))
