"""The classifier run's report: the one-line summary, report.md and its own shrink curve (one point per ONNX type)."""

from __future__ import annotations

from pathlib import Path


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def summary_line(m: dict) -> str:
    t, s = m["teacher"]["test"], m["student"]["test"]
    speed = f", {m['speedup_x']:.1f}x faster per example" if m.get("speedup_x") else ""
    return (f"teacher acc {t['accuracy']:.4f} / macro-F1 {t['macro_f1']:.4f}; student ({m['student']['onnx_type']} ONNX) "
            f"acc {s['accuracy']:.4f} / macro-F1 {s['macro_f1']:.4f} (retention {m['retention_accuracy']:.3f} / "
            f"{m['retention_macro_f1']:.3f}); {m['compression_x_fp32']:.1f}x smaller than fp32 "
            f"({m['compression_x_fp16']:.1f}x vs fp16){speed}"
            + (f"\n{m['verdict']['text']}" if m.get("failed") and m.get("verdict") else ""))


def plot_curve(curve: list[dict], path: Path, teacher: str) -> None:
    """shrink_curve.png of one run: accuracy retention and agreement against compression, one point per ONNX type."""
    from edgestill.evaluate.shrink_curve import ShrinkPoint, plot_shrink_curve

    points = [ShrinkPoint(name=c["type"], compression_x_fp32=c["compression_x_fp32"], retention=c["retention_accuracy"],
                          top1_agreement=c["top1_agreement_with_teacher"], bytes=c["onnx_bytes"]) for c in curve]
    plot_shrink_curve(points, path, title=f"Classifier shrink curve: {Path(teacher).name} -> this run's student, per ONNX type",
                      retention_label="retention (student ÷ teacher accuracy, test split)",
                      edgestill_label="student (slice + low-rank + KD), ONNX type")


def _transfer_line(ts: dict | None) -> list[str]:
    """What the student learned from: the labelled texts, their perturbed copies, unlabelled texts (kd.transfer)."""
    if not ts:
        return []
    line = f"- transfer set: {ts['labelled']:,} labelled texts + {ts.get('augmented', 0):,} perturbed copies"
    src = ts.get("source")
    if src:
        line += (f" + {ts.get('unlabelled', 0):,} unlabelled texts from {src['spec']}"
                 f"{' (cut into sentences)' if src.get('sentences') else ''}, {src['dropped_in_splits']:,} dropped "
                 "as texts of the labelled splits")
    return [line + " (the copies and unlabelled texts carry the teacher's soft labels only)"]


def _soup_line(soup: dict | None) -> list[str]:
    """soup.ingredients: each ingredient's scores beside the averaged student's (PyTorch, before export)."""
    if not soup:
        return []
    parts = ", ".join(f"seed {r['seed']} {r['val']['macro_f1']:.4f} / {r['test']['macro_f1']:.4f}" for r in soup["ingredients"])
    return [f"- student: a {soup['method']} soup of {len(soup['ingredients'])} students distilled with seeds "
            f"{', '.join(map(str, soup['seeds']))} from the same cut, their weights averaged; val / test macro-F1 (PyTorch): "
            f"soup {soup['val']['macro_f1']:.4f} / {soup['test']['macro_f1']:.4f}, ingredients {parts}"]


def classifier_report(m: dict) -> str:
    """A short report.md from metrics.json."""
    t, s = m["teacher"], m["student"]
    rows = [("teacher (PyTorch)", t["test"]), (f"student, {s['onnx_type']} ONNX in onnxruntime", s["test"])]
    names = {"student_sliced_untrained": "student cut from the teacher, untrained", "student_pytorch": "student (PyTorch)",
             "tfidf_logreg": "TF-IDF + logistic regression (baseline)", "majority_class": "majority class (baseline)"}
    rows += [(names.get(name, name), b["test"]) for name, b in m["baselines"].items()]
    lines = [f"# Classifier shrink: {t['path']}", "",
             f"Scored on the {m['data']['scored_on']}: {m['data']['test']['n']} examples.", "",
             "| model | accuracy | macro-F1 |", "|---|---|---|"]
    lines += [f"| {name} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} |" for name, r in rows]
    par = m.get("onnx_parity_vs_pytorch") or {}
    lat_t = f"{t['latency_ms_per_example']:.2f} ms (spread {t['latency_ms_spread'][0]:.2f}–{t['latency_ms_spread'][1]:.2f})" \
        if "latency_ms_per_example" in t else "not measured"
    lines += [
        "", f"- retention (student ÷ teacher): accuracy {m['retention_accuracy']:.4f}, macro-F1 {m['retention_macro_f1']:.4f}",
        f"- student and teacher predict the same label on {m['top1_agreement_with_teacher']:.4f} of the test examples",
        f"- size: teacher {t['params']:,} params ({t['fp32_bytes']:,} bytes fp32); student model.onnx {s['onnx_bytes']:,} bytes "
        f"(+ tokenizer {s['tokenizer_bytes']:,} bytes): compression_x_fp32 {m['compression_x_fp32']:.1f}, "
        f"compression_x_fp16 {m['compression_x_fp16']:.1f}",
        f"- student: teacher layers {s['layers_kept']}, vocabulary {s['vocab_kept']:,} tokens, max {s['max_len']} tokens, "
        f"{s['params']:,} params (low-rank factors)",
        *_transfer_line(m.get("train", {}).get("transfer_set")),
        *_soup_line(m.get("soup")),
        f"- latency per example, onnxruntime, batch 1, {m['environment']['onnxruntime_threads']} threads, median of "
        f"{s['repeats']} alternated repeats over {s['examples']} texts: student {s['latency_ms_per_example']:.2f} ms "
        f"(spread {s['latency_ms_spread'][0]:.2f}–{s['latency_ms_spread'][1]:.2f}), teacher {lat_t}; "
        "speed-up " + (f"{m['speedup_x']:.2f}x" if m.get("speedup_x") else "not measured"),
        f"- onnxruntime vs PyTorch student: same prediction on {_pct(par.get('prediction_agreement'))} of "
        f"{par.get('examples', 0)} test examples (max |logit diff| {par.get('max_abs_diff', float('nan')):.3g})",
        f"- machine: {m['environment'].get('cpu_cores')} cores; commit {m['environment'].get('git_commit')}; "
        f"{m['environment'].get('date')}",
    ]
    vt = m.get("vocab_trim")
    if vt:
        acc = (f"; student accuracy on them {vt['student_accuracy_changed']:.4f} (teacher {vt['teacher_accuracy_changed']:.4f})"
               if "student_accuracy_changed" in vt else "")
        lines.append(f"- vocabulary trim on the test split: {vt['test_texts_changed']} texts ({_pct(vt['texts_changed_fraction'])}) "
                     f"tokenize differently ({vt['fallback']}); [UNK] tokens {_pct(vt['unk_fraction'])} vs "
                     f"{_pct(vt['full_unk_fraction'])} with the full vocabulary{acc}")
    if m.get("curve"):
        lines += ["", "Shrink curve (`shrink_curve.png`): the same student in each ONNX type, scored in onnxruntime on the test split.",
                  "", "| ONNX type | MB | × fp32 | accuracy | macro-F1 | retention (acc / F1) | agreement with teacher | ms/example | speed-up |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in m["curve"]:
            sp = f"{c['speedup_x']:.1f}×" if c.get("speedup_x") else "—"
            lines.append(f"| {c['type']} | {c['onnx_bytes'] / 1e6:.2f} | {c['compression_x_fp32']:.1f}× | {c['test']['accuracy']:.4f} | "
                         f"{c['test']['macro_f1']:.4f} | {c['retention_accuracy']:.3f} / {c['retention_macro_f1']:.3f} | "
                         f"{c['top1_agreement_with_teacher']:.3f} | {c['latency_ms_per_example']:.2f} | {sp} |")
    if not m["data"]["same_split_as_teacher_finetuning"]:
        lines.append("- WARNING: the data or split differs from the teacher's fine-tuning; the teacher may have seen test rows.")
    if t.get("max_len") != s["max_len"]:
        lines.append(f"- note: the teacher reads up to {t.get('max_len')} tokens, the student {s['max_len']}.")
    return "\n".join(lines) + "\n"
