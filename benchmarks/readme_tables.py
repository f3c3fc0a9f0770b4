"""Regenerate the README's result tables from benchmarks/results/*.json (never typed by hand).

Each table sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in README.md or a docs/*.md page.
    python benchmarks/readme_tables.py
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _load1(load) -> str:
    """The 1-minute figure of a recorded load average ([1, 5, 15] minutes), or '?'."""
    return f"{load[0]:.1f}" if isinstance(load, list) and load else "?"


def _measured(env: dict) -> str:
    """'Measured <date> on <cpu> (<threads> threads[, <kernels' ISA>], 1-min load a → b), commit `x`': a result's
    provenance in prose."""
    isa = f", {env['cpu_capability']}" if env.get("cpu_capability") else ""  # recorded from 2026-12-06 on
    return (f"Measured {env['date'][:10]} on {env.get('cpu_model') or '?'} ({env.get('threads', '?')} threads{isa}, 1-min load "
            f"{_load1(env.get('load_average_before'))} → {_load1(env.get('load_average_after'))}), commit "
            f"`{(env.get('git_commit') or '?')[:8]}`{' (dirty)' if env.get('git_dirty') else ''}")


def _provenance(r: dict) -> str:
    """'Measured ... commit `x`, by `command` → `benchmarks/results/<name>.json`': where a table's numbers come from."""
    return f"{_measured(r['environment'])}, by `{r['command'].strip()}` → `benchmarks/results/{r['benchmark']}.json`"


def default_run_table(r: dict) -> str:
    """Original teacher | corrected teacher (the reference) | student, in domain and out of domain."""
    t, s, o = r["teacher"], r["student"], r.get("original_teacher") or {}
    ood, zs, chat = r.get("out_of_domain") or {}, r.get("zero_shot") or {}, r.get("chat") or {}
    mb = 1e6

    def f(x, fmt="{:.2f}"):
        return "" if x is None else fmt.format(x)

    rows = [
        "| | original teacher | corrected teacher (reference) | student |",
        "|---|---:|---:|---:|",
        f"| model | {t['name']}, {t['num_layers']} layers | the same, fine-tuned {f((t.get('correction') or {}).get('best_step'), '{}')} "
        f"steps on the training plays | {s['num_layers']} sliced layers, FFN {s['intermediate_size']}, {s['dtype']} |",
        f"| file | {t['source_bytes'] / mb:.1f} MB (Q4_1 GGUF) | {t['bytes'] / mb:.1f} MB (fp32) | {s['bytes'] / mb:.1f} MB |",
        f"| **student ÷ original file** (compression_x_source) | | | **{r['compression_x_source']:.2f}×** "
        f"({r['compression_x_fp16']:.2f}× vs F16, {r['compression_x_fp32']:.2f}× vs fp32) |",
        f"| held-out perplexity, in domain (test plays) | {f(o.get('perplexity'))} | {t['perplexity']:.2f} | {s['perplexity']:.2f} |",
        f"| perplexity out of domain (general English) | {f(o.get('out_of_domain_perplexity'))} | "
        f"{f(ood.get('reference_perplexity'))} | {f(ood.get('student_perplexity'))} |",
        f"| top-1 agreement with the reference: in / out of domain | | 1.000 | **{r['top1_agreement']:.3f}** / "
        f"**{f(ood.get('top1_agreement'), '{:.3f}')}** |",
        f"| KL(reference ‖ student), nats/token: in / out | | 0 | {r['kl_teacher_student']:.3f} / {f(ood.get('kl_teacher_student'), '{:.3f}')} |",
        f"| retention (reference ppl ÷ student ppl): in / out | | 1.000 | {r['retention']:.3f} / {f(ood.get('retention'), '{:.3f}')} |",
    ]
    if zs:
        rows.append(f"| zero-shot last-word accuracy ({zs['n']} news passages) | {f((zs.get('original_teacher') or {}).get('accuracy'), '{:.3f}')} | "
                    f"{zs['reference']['accuracy']:.3f} | {zs['student']['accuracy']:.3f} |")
    if chat:
        ref_chat = chat.get("reference") or {}
        rows.append(f"| chat prompts: NLL/token of the original teacher's answers | {chat['student']['reference_answer_nll']:.3f} | "
                    f"{f(ref_chat.get('student_answer_nll'), '{:.3f}')} | {chat['student']['student_answer_nll']:.3f} |")
        rows.append(f"| chat prompts: answer tokens that are the model's top-1 | 1.000 | {f(ref_chat.get('answer_top1'), '{:.3f}')} | "
                    f"{chat['student']['answer_top1']:.3f} |")
    rows += [
        f"| parameters | {t['params']:,} | {t['params']:,} | {s['params']:,} |",
        f"| decode tokens/s (transformers, {r['environment'].get('threads', 2)} threads) | | {t['decode_tokens_per_s']:.1f} | "
        f"{s['decode_tokens_per_s']:.1f} ({r['speedup_x']:.2f}×) |",
        f"| prefill tokens/s | | {t['prefill_tokens_per_s']:.0f} | {s['prefill_tokens_per_s']:.0f} ({r['speedup_x_prefill']:.2f}×) |",
    ]
    for name, b in (r.get("baselines") or {}).items():
        rows.append(f"| baseline: {name.replace('_', ' ')} | | | ppl {b['perplexity']:.1f}, retention {b['retention']:.3f} |")
    env = r["environment"]
    rows.append("")
    rows.append(f"Held-out: {r['held_out']['tokens']:,} tokens of {', '.join(r['held_out']['plays'])} (never seen in training or "
                f"correction); out of domain: {f(ood.get('eval_tokens'), '{:,}')} tokens of the Lee news corpus. "
                f"{r['train']['steps']} distillation steps. Measured {env['date'][:10]} on {env.get('cpu_model') or '?'} "
                f"({env.get('threads', '?')} threads, 1-min load {_load1(env.get('load_average_before'))} → "
                f"{_load1(env.get('load_average_after'))}), commit `{(env.get('git_commit') or '?')[:8]}`"
                f"{' (dirty)' if env.get('git_dirty') else ''}, by `{env['command']}` → `benchmarks/results/default_run.json`.")
    return "\n".join(rows)


def throughput_table(r: dict) -> str:
    modes = {"cached": f"cached top-{r['top_k']} logits (memory-mapped), fp32",
             "cached_bf16": "the same under bf16 autocast", "live": "teacher recomputed every step, fp32",
             "cached_compile": "cached, fp32, `distill.compile=true`",
             "cached_bf16_compile": "cached, bf16 autocast, `distill.compile=true`"}
    first = any("first_step_s" in r[k] for k in modes if k in r)
    rows = ["| teacher signal | student training tokens/s (median, spread) | bound from measured matmul FLOP/s | of bound |"
            + (" first step, s (not timed) |" if first else ""),
            "|---|---:|---:|---:|" + ("---:|" if first else "")]
    for key, label in modes.items():
        if key not in r:
            continue
        m = r[key]
        bound = f"{m['bound_tokens_per_s']:.0f}" if "bound_tokens_per_s" in m else ""
        frac = f"{m['fraction_of_bound']:.2f}" if "fraction_of_bound" in m else ""
        rows.append(f"| {label} | {m['tokens_per_s']:.0f} ({m['tokens_per_s_spread'][0]:.0f}–{m['tokens_per_s_spread'][1]:.0f}) "
                    f"| {bound} | {frac} |" + (f" {m['first_step_s']:.1f} |" if first else ""))
    ratios = [("speedup_cached_over_live", "cached ÷ live"), ("speedup_bf16_over_fp32", "bf16 ÷ fp32 (cached)"),
              ("speedup_cached_compile_over_cached", "compiled ÷ eager (fp32)"),
              ("speedup_cached_bf16_compile_over_cached_bf16", "compiled ÷ eager (bf16)")]
    for key, label in ratios:
        if key in r:
            rows.append(f"| **{label}** | **{r[key]:.2f}×** | | |" + (" |" if first else ""))
    pays = [f"compiling{' (bf16)' if 'bf16' in k else ''} pays for itself after {r[k]:.0f} steps"
            for k in ("cached_compile_pays_off_after_steps", "cached_bf16_compile_pays_off_after_steps")
            if r.get(k) is not None]
    pay = r.get("cache_pays_off_after_epochs")
    flops = (f" One training token is {r['training_flops_per_token'] / 1e6:.0f} M matmul FLOPs (the live teacher's "
             "forward pass not counted)." if "training_flops_per_token" in r else "")
    return "\n".join(rows + [
        "",
        f"Building the cache ran the teacher at {r['cache_build_tokens_per_s']:.0f} tokens/s once"
        + (f"; it pays for itself after {pay:.1f} epochs" if pay else "")
        + "".join(f"; {p}" for p in pays)
        + f". {r['student_layers']}-layer student, batch {r['batch_size']}×{r['seq_len']}.{flops} "
        f"{_measured(r['environment'])}, `benchmarks/distill_throughput.py` → `benchmarks/results/distill_throughput.json`.",
    ])


def quant_table(r: dict) -> str:
    if "reference_perplexity" not in r:
        return "_Old result format (scored against the teacher as given): rerun `python benchmarks/quant_table.py`._"
    rows = ["| group | model | held-out ppl | retention | top-1 | KL | MB | × original file | × F16 | decode tok/s (2 threads) "
            "| of bandwidth bound |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        frac = x.get("bandwidth_bound_fraction")
        runtime = "" if x.get("runtime", "llama.cpp") == "llama.cpp" else f" ({x['runtime']})"
        rows.append(f"| {x['group']} | {x['name']} | {x['perplexity']:.2f} | {x['retention']:.3f} | {x['top1_agreement']:.3f} "
                    f"| {x['kl_teacher_model']:.3f} | {x['file_bytes'] / 1e6:.1f} | {x['compression_x_source']:.2f}× "
                    f"| {x['compression_x_fp16']:.2f}× | {x['decode_tokens_per_s']:.1f}{runtime} "
                    f"| {'' if frac is None else f'{frac:.2f}'} |")
    env, t = r["environment"], r.get("targets", {})
    notes = []
    for base in ("rtn", "gptq"):
        if f"qat_recovers_of_{base}_kl" in t:
            notes.append(f"of what {base.upper()} Q4_0 loses against the corrected teacher, QAT+KD wins back "
                         f"**{t[f'qat_recovers_of_{base}_kl']:.0%}** of the KL and **{t[f'qat_recovers_of_{base}_top1']:.0%}** "
                         f"of the top-1 agreement ({t[f'qat_recovers_of_{base}_perplexity']:.0%} of the perplexity)")
    qat = next((x for x in r["rows"] if x["name"].startswith("edgestill QAT+KD")), None)
    selection = ((qat or {}).get("run") or {}).get("selection")
    if selection:
        notes.append(f"the QAT+KD run kept step {selection['selected_step']} of {selection['last_step']} "
                     f"(distill.select={selection['select']}: the evaluated step with the lowest held-out "
                     f"{selection.get('selected_on', 'score')})")
    ood = [(x["name"], x["run"]["out_of_domain"]) for x in r["rows"] if (x.get("run") or {}).get("out_of_domain", {}).get("retention")]
    if ood:
        notes.append("out of domain (general English), retention: " + ", ".join(f"{n} {o['retention']:.3f}" for n, o in ood))
    rows.append("")
    rows.append(("; ".join(notes) + ". " if notes else "")
                + f"Quality from llama.cpp's own logits on {r['held_out_tokens']:,} held-out tokens against the corrected "
                f"teacher in transformers (ppl {r['reference_perplexity']:.2f}); the original file is "
                f"{r['source_file']['bytes'] / 1e6:.1f} MB. Decode = {r['decode_tokens']} greedy tokens after a "
                f"{r['prompt_tokens']}-token prompt, median of {r['repeats']} alternated rounds; bandwidth bound from a measured "
                f"{r['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s read. {_measured(env)}, "
                f"`{r['command']}` → `benchmarks/results/quant_table.json`.")
    return "\n".join(rows)


def cost_model_table(r: dict) -> str:
    rows = ["| student (sliced from the teacher) | GGUF MB (predicted / real) | prefill tok/s predicted / measured | "
            "decode tok/s predicted / measured |", "|---|---:|---:|---:|"]
    for x in r["rows"]:
        p, m, q = x["predicted"], x["measured"], x["predicted_over_measured"]
        rows.append(f"| {x['case']} | {p['file_bytes'] / 1e6:.2f} / {m['file_bytes'] / 1e6:.2f} | "
                    f"{p['prefill_tokens_per_s']:.0f} / {m['prefill_tokens_per_s']:.0f} ({q['prefill']:.2f}) | "
                    f"{p['decode_tokens_per_s']:.0f} / {m['decode_tokens_per_s']:.0f} ({q['decode']:.2f}) |")
    env = r["environment"]
    rows += ["", f"{r['cases_within_tolerance_both']} of {r['cases']} cases within ±{r['tolerance']:.0%} for both prefill and "
                 f"decode (ratio predicted ÷ measured in brackets). llama.cpp, {r['threads']} threads, medians of alternated "
                 f"rounds; the host profile is fitted on synthetic models of other shapes. {_measured(env)}, with the "
                 f"benchmark at raised CPU priority (nice {r['priority'].get('nice')}: the machine is shared), "
                 "`python benchmarks/cost_model.py --boost-priority` → `benchmarks/results/cost_model.json`."]
    return "\n".join(rows)


def mixed_vs_uniform_table(r: dict) -> str:
    """Sensitivity-aware per-layer formats vs one format for the whole teacher (benchmarks/mixed_vs_uniform.py)."""
    if "uniform" not in r:
        return "_Old result format: rerun `python benchmarks/mixed_vs_uniform.py`._"

    def counts(m: dict) -> str:
        return " + ".join(f"{n}×{f}" for f, n in m["unit_format_counts"].items())

    rows = ["| model | GGUF MB | held-out KL(teacher ‖ model) | top-1 | retention | vs uniform |",
            "|---|---:|---:|---:|---:|---|"]
    for f, u in sorted(r["uniform"].items(), key=lambda kv: kv[1]["file_bytes"]):
        mark = " (not in the mix menu)" if f not in r["formats"] else ""
        rows.append(f"| uniform {f.upper()}{mark} | {u['file_bytes'] / 1e6:.2f} | {u['kl_teacher_model']:.4f} | "
                    f"{u['top1_agreement']:.3f} | {u['retention']:.3f} | |")
    for x in r["rows"]:
        m = x["mixed"]
        rows.append(f"| mix at uniform {x['uniform']['format'].upper()}'s bytes: {counts(m)} | {m['file_bytes'] / 1e6:.2f} | "
                    f"{m['kl_teacher_model']:.4f} | {m['top1_agreement']:.3f} | {m['retention']:.3f} | "
                    f"KL × {x['mixed_kl_over_uniform']:.2f} |")
    fewer = r.get("mixed_at_0.9x_q5_0")
    if fewer:
        rows.append(f"| mix at 90% of Q5_0's bytes: {counts(fewer)} | {fewer['file_bytes'] / 1e6:.2f} | "
                    f"{fewer['kl_teacher_model']:.4f} | {fewer['top1_agreement']:.3f} | {fewer['retention']:.3f} | "
                    f"KL × {fewer['kl_over_uniform_q5_0']:.2f} of uniform Q5_0 |")
    for m in r.get("curve", []):
        best = m.get("best_uniform_that_fits")
        vs = (f"line between uniform files: {m['uniform_interpolated_kl']:.4f}; best uniform that fits "
              f"({best['format'].upper()}): {best['kl_teacher_model']:.4f}") if best else ""
        rows.append(f"| mix within {m['budget_bytes'] / 1e6:.1f} MB: {counts(m)} | {m['file_bytes'] / 1e6:.2f} | "
                    f"{m['kl_teacher_model']:.4f} | {m['top1_agreement']:.3f} | {m['retention']:.3f} | {vs} |")
    env = r["environment"]
    reference = ("the corrected teacher (fine-tuned on the train split; the reference of every run)"
                 if r.get("reference") == "corrected" else "the teacher as given (not corrected)")
    rows += ["", f"Round-to-nearest on {reference}, KL against it (no training: only the allocation differs); mixes choose per layer "
                 f"from {', '.join(f.upper() for f in r['formats'])} by the sensitivities measured on {r['calibration']} of "
                 f"the train split; KL and top-1 on {r['held_out_tokens']:,} held-out tokens. {_measured(env)}, "
                 f"`{r['command']}` → `benchmarks/results/mixed_vs_uniform.json` and "
                 f"`{r['plot']}`."]
    return "\n".join(rows)


CLASSIFIER_DATA = {"spamassassin": "SpamAssassin (ham / spam)", "drugreview": "Drug reviews (negative / neutral / positive)",
                   "moviereviews": "Movie-review sentences (negative / positive)"}


def _classifier_row(x: dict) -> str:
    mb = f"{x['deploy_bytes'] / 1e6:.2f}" if x.get("deploy_bytes") else "—"
    cx = f"{x['compression_x_fp32']:.1f}×" if x.get("compression_x_fp32") else "—"
    cw = f"{x['compression_x_fp32_weights_only']:.1f}×" if x.get("compression_x_fp32_weights_only") else "—"
    ms = x.get("latency_ms_per_example")
    lat = "—" if ms is None else f"{ms:.2f} ({x['latency_ms_spread'][0]:.2f}–{x['latency_ms_spread'][1]:.2f})"
    sp = f"{x['speedup_x']:.1f}×" if x.get("speedup_x") else "—"
    if x["kind"] in ("majority", "tfidf"):
        verdict, ret = "baseline", "—"
    else:
        failed = x.get("failed")
        verdict = ("**FAILED** (≤ majority class)" if failed else "—" if "beats_tfidf_logreg" not in x else
                   "beats TF-IDF" if x["beats_tfidf_logreg"] else "below TF-IDF")
        # a failed row's retention is not a result: it is shown struck through
        ret = (f"~~{x['retention_macro_f1']:.3f}~~" if failed else f"{x['retention_macro_f1']:.3f}")
    commit = ((x.get("environment") or {}).get("git_commit") or "")[:7] or "—"
    label = x["label"].replace(" — FAILED (≤ majority class)", "")
    return (f"| {label} | {mb} | {cx} | {cw} | {x['accuracy']:.4f} | {x['macro_f1']:.4f} | {ret} | {verdict} | {lat} | "
            f"{sp} | {commit} |")


def _classifier_target(t: dict) -> str:
    if "qualifies" not in t:
        return "Target: judged by an older rule; rerun `python benchmarks/classifier.py`."
    lead = t.get("teacher_lead_over_tfidf_macro_f1")
    if lead is None:
        qual = "the teacher's lead over TF-IDF + LR is unknown"
    elif lead < 0:
        qual = f"the teacher trails TF-IDF + LR by {-lead * 100:.1f} macro-F1 points"
    else:
        qual = f"the teacher beats TF-IDF + LR by {'' if t.get('qualifies') else 'only '}{lead * 100:.1f} macro-F1 points"
    seeds = ""
    if (t.get("seeds") or 1) > 1:
        per = ", ".join(f"{v:.1%}" for v in t["retention_macro_f1_per_seed"])
        seeds = f" on the mean of {t['seeds']} student seeds ({per}; std {t['retention_macro_f1_std'] * 100:.1f} points)"
    best = (f"; best student {t['best_row']} at {t['compression_x_fp32']:.1f}× keeps {t['retention_macro_f1']:.1%} of the "
            f"teacher's macro-F1{seeds}" if "best_row" in t else "")
    why = f" ({t['reason']})" if t.get("reason") and not t["met"] else ""
    return (f"Target (data set where the teacher beats TF-IDF + LR by ≥ 2 points; a student ≥ "
            f"{t['min_compression_x_fp32']:g}× smaller, all files counted, keeping ≥ {t['min_retention']:.0%} of its "
            f"macro-F1 and beating TF-IDF + LR): **{'met' if t['met'] else 'not met'}** — {qual}{best}{why}.")


def _seed_rows(r: dict | None, data: str, size: str) -> list[dict]:
    """A classifier result's KD rows of one size (`kd-50x` and its `kd-50x-seed<S>` repeats)."""
    rows = ((r or {}).get("datasets") or {}).get(data, {}).get("rows", [])
    return [x for x in rows if x["kind"] == "kd" and (x["name"] == size or x.get("seed_of") == size)]


# settings older results did not record: what they ran with
_RECIPE_DEFAULTS = {"strategy": "global", "ema": 0.0, "transfer": "", "transfer_sentences": False, "transfer_max": 0,
                    "soup": 1}
_RECIPE_ARGS = {"strategy": "ranks by {} share", "num_layers": "{} layers", "student_steps": "at most {} steps",
                "student_patience": "patience {}", "augment": "{} perturbed copies",
                "temperature": "T = {}", "alpha": "α = {}", "hidden_weight": "hidden-state weight {}",
                "student_lr": "lr {}", "student_batch_size": "batch {}", "ema": "weight average (EMA {})",
                "transfer": "unlabelled text ({})", "transfer_sentences": "cut into sentences",
                "transfer_max": "at most {} of it", "soup": "a uniform soup of {} students"}


def _recipe_change(args: dict, base: dict) -> str:
    """What a variant's benchmarks/classifier.py settings change against the base result's: 'patience 0, at most
    6000 steps' (the settings that shape a student's training)."""
    changed = [fmt.format(args[k]) for k, fmt in _RECIPE_ARGS.items()
               if k in args and args[k] != base.get(k, _RECIPE_DEFAULTS.get(k))]
    return ", ".join(changed) or "the same settings"


def classifier_recipes_table(r: dict, data: str = "moviereviews", size: str = "kd-50x", base_name: str = "classifier") -> str:
    """One student size trained with two recipes over the same seeds: the result `r` (a variant's
    benchmarks/classifier.py --name ... run) beside the rows of `base_name` (classifier.json: the README's table).
    Recipes are compared on the val macro-F1 of the state each run kept (what a user can select on); test is what the
    track is judged on. Below the table: the variant's int8 / int4 files of the same students and its target verdict."""
    base = _load(base_name)
    ours = _seed_rows(r, data, size)
    if not ours:
        return f"_no {size} rows for {data} in this result_"
    default_args = ((_load("classifier") if base_name != "classifier" else base) or {}).get("args") or {}
    label = _recipe_change(r.get("args") or {}, default_args)
    teacher = next((x for x in r["datasets"][data]["rows"] if x["kind"] == "teacher"), None)
    tfidf = next((x for x in r["datasets"][data]["rows"] if x["kind"] == "tfidf"), None)
    out = ["| recipe | student seed | steps run | step kept | val macro-F1 (kept state) | test macro-F1 | retention "
           "(macro-F1) | beats TF-IDF + LR | commit |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    means = []
    b = (base or {}).get("args") or {}
    base_label = f"the table above (patience {b.get('student_patience', '?')}, at most {b.get('student_steps', '?')} steps)" \
        if base_name == "classifier" else f"{_recipe_change(b, default_args)} (`{base_name}.json`)"
    for name, rows in ((base_label, _seed_rows(base, data, size)), (label, ours)):
        for x in rows:
            env = x.get("environment") or {}
            val = x.get("best_val_macro_f1")
            soup = x.get("soup_ingredients")  # seeds, steps run and steps kept of each ingredient, joined by +
            seed, run, kept = (("+".join(str(i[k]) for i in soup) for k in ("seed", "stopped_at_step", "best_step"))
                               if soup else (x.get("student_seed", "?"), x.get("stopped_at_step", "?"), x.get("best_step", "?")))
            out.append(f"| {name} | {seed} | {run} | {kept} | {'—' if val is None else f'{val:.4f}'} | {x['macro_f1']:.4f} | "
                       f"{x['retention_macro_f1']:.3f} | {'yes' if x.get('beats_tfidf_logreg') else 'no'} | "
                       f"`{(env.get('git_commit') or '?')[:7]}` |")
        if rows:
            vals = [x["best_val_macro_f1"] for x in rows if x.get("best_val_macro_f1") is not None]
            ret = [x["retention_macro_f1"] for x in rows]
            sd = statistics.stdev(ret) if len(ret) > 1 else 0.0
            seeds = f"{len(rows)} seeds" if len(rows) > 1 else "1 seed (not a claim)"
            if rows[0].get("soup_ingredients"):  # each row a soup: independent soups count, not their ingredients
                seeds = f"{len(rows)} soups of {len(rows[0]['soup_ingredients'])} seeds each" if len(rows) > 1 \
                    else "1 soup (not a claim)"
            means.append(f"{name}: {seeds}, val macro-F1 "
                         + (f"{statistics.mean(vals):.4f}" if len(vals) == len(rows) else "not recorded")
                         + f", test retention {statistics.mean(ret) * 100:.1f}%"
                         + (f" ± {sd * 100:.1f}" if len(rows) > 1 else ""))
    tail = [f"Mean over seeds: {'; '.join(means)}."]
    unit = "seed(s)" if not ours[0].get("soup_seeds") else f"soup(s) of {len(ours[0]['soup_seeds'])} seeds"
    rows = r["datasets"][data]["rows"]
    for kind in ("kd_int8", "kd_int4"):
        files = [x for x in rows if x["kind"] == kind and (x["name"] == f"{size}-{kind[3:]}"
                                                           or x.get("seed_of") == f"{size}-{kind[3:]}")]
        if files:
            ret = [x["retention_macro_f1"] for x in files]
            tail.append(f"{label}, as {kind[3:]} ONNX files: {files[0].get('deploy_bytes', 0) / 1e6:.2f} MB, "
                        f"{files[0]['compression_x_fp32']:.1f}× smaller than the teacher, test retention "
                        f"{statistics.mean(ret) * 100:.1f}% on the mean of {len(ret)} {unit} ("
                        + ", ".join(f"{x * 100:.1f}%" for x in ret) + ").")
    t = r["datasets"][data].get("target") or {}
    if "met" in t:
        tail.append(f"Target of this result: **{'met' if t['met'] else 'not met'}** (best: {t.get('best_row')}, "
                    f"{(t.get('retention_macro_f1') or 0) * 100:.1f}% on the mean of {t.get('seeds', 1)} {unit}, "
                    f"{t.get('compression_x_fp32') or 0:.1f}×).")
    if teacher and tfidf:
        tail.append(f"Teacher macro-F1 {teacher['macro_f1']:.4f} (97% of it: {0.97 * teacher['macro_f1']:.4f}); "
                    f"TF-IDF + LR {tfidf['macro_f1']:.4f}.")
    return "\n".join(out + [""] + tail)


def classifier_table(r: dict) -> str:
    """Per data set: the majority-class and TF-IDF baselines, the teacher, KD students by size, the CE-only ablation
    (benchmarks/classifier.py). A student at or below the majority class is FAILED and its retention is struck out."""
    out = []
    datasets = r.get("datasets") or {}
    for data in [d for d in CLASSIFIER_DATA if d in datasets] + [d for d in datasets if d not in CLASSIFIER_DATA]:
        d = datasets[data]
        info = d.get("data", {})
        n = {k: (info.get(k) or {}).get("n", "?") for k in ("train", "val", "test")}
        out += [f"**{CLASSIFIER_DATA.get(data, data)}**: {n['train']} train / {n['val']} val / {n['test']} test "
                f"({info.get('split', 'held-out test split')}; scored on test).", "",
                "| row | MB on device | × fp32 | × fp32 (weights only) | accuracy | macro-F1 | retention (macro-F1) | verdict "
                "| ORT ms/example | speed-up | commit |", "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
        out += [_classifier_row(x) for x in d.get("rows", [])]
        if d.get("target"):
            out += ["", _classifier_target(d["target"])]
        ab = d.get("ablation")
        if ab:
            out += ["", f"KD − CE-only at ~{ab['target_x']:g}× (same student, steps and seed): accuracy "
                        f"{ab['kd_minus_ce_accuracy'] * 100:+.1f} points, macro-F1 {ab['kd_minus_ce_macro_f1'] * 100:+.1f} "
                        "points (one seed: not a claim)."]
            if "augmented_minus_labelled_macro_f1" in ab:
                out[-1] += (f" KD on the augmented transfer set − KD on the labelled texts alone: macro-F1 "
                            f"{ab['augmented_minus_labelled_macro_f1'] * 100:+.1f} points (one seed).")
        teacher = next((x for x in d.get("rows", []) if x["kind"] == "teacher"), None)
        if teacher and teacher.get("best_step") is not None:
            stop = (f"stopped early at step {teacher['steps']} (patience {teacher.get('patience')})"
                    if teacher.get("stopped_early") else f"ran its {teacher.get('max_steps', teacher['steps'])} steps")
            out += ["", f"Teacher: fine-tuned with early stopping on val macro-F1, evaluated every "
                        f"{teacher.get('eval_every', '?')} steps; best step {teacher['best_step']} (val macro-F1 "
                        f"{teacher['best_val_macro_f1']:.4f}), {stop}."]
        lat = d.get("latency", {})
        stamp = (f" This data set was measured {d['date'][:10]}, commit `{(d.get('commit') or '?')[:8]}`, by an earlier "
                 "invocation with its own settings (the line below describes the latest one)."
                 if d.get("from_earlier_invocation") and d.get("date") else "")
        int8 = ("; the int8 and int4 rows: the same student's `onnx-int8/` or `onnx-int4/`, its `model.onnx` with int8 "
                "weights and a scale per output channel, or 4-bit blocks of 32 (MatMulNBits)"
                if any(x["kind"] in ("kd_int8", "kd_int4") for x in d.get("rows", [])) else "")
        out += ["", "MB on device = every file of the row's `onnx/` folder (fp32 `model.onnx`, trimmed tokenizer, label "
                    f"map, export report{int8}); × fp32 = teacher params × 4 ÷ those bytes, weights only = ÷ `model.onnx` "
                    "alone; TF-IDF counts its weights, idf and vocabulary. Retention = student ÷ teacher macro-F1 on test. "
                    f"Latency: onnxruntime, batch 1, {lat.get('intra_op_threads', r.get('threads', '?'))} threads, "
                    f"{lat.get('examples', '?')} test texts, median (min–max) of {lat.get('repeats', '?')} repeats with "
                    f"teacher and students alternated; speed-up = teacher ÷ row.{stamp}", ""]
    if not out:
        return "_No classifier data set in the result yet: run `python benchmarks/classifier.py`._"
    s, a = r.get("student", {}), r.get("args", {})
    one = f" (1 layer from {s['one_layer_from_x']:g}× on)" if s.get("one_layer_from_x") else ""
    env = r.get("environment") or {}
    kd = s.get("kd") or {}
    transfer = (f", KD on the training texts + {kd['augment']} perturbed copies of each (labelled by the teacher)"
                if kd.get("augment") else "")
    batch = f" of {a['student_batch_size']}" if a.get("student_batch_size") else ""
    steps = (f"at most {a.get('student_steps', '?')} training steps (early stopping on val macro-F1, patience "
             f"{a['student_patience']})" if a.get("student_patience") else f"{a.get('student_steps', '?')} training steps")
    out.append(f"Students: {s.get('num_layers', '?')} teacher layers{one}, trimmed vocabulary, SVD-factorized, max "
               f"{s.get('max_len', '?')} tokens, {steps}{batch}{transfer}. Measured "
               f"{r.get('date', '?')[:10]} on {env.get('cpu_model', '?')}, {r.get('machine', {}).get('cpu_cores', '?')} "
               f"cores, commit `{(r.get('commit') or '?')[:8]}`{' (uncommitted changes)' if r.get('git_dirty') else ''}, "
               f"by `{r.get('command', 'python benchmarks/classifier.py')}` → "
               f"`benchmarks/results/{r.get('benchmark', 'classifier')}.json` (each row's commit in its last column).")
    return "\n".join(out)


def serve_load_table(r: dict) -> str:
    """Deadline misses, goodput and latency per (load, policy, fixed/adaptive) of benchmarks/serve_load.py."""
    def f(x, fmt="{:.2f}"):
        return "" if x is None else fmt.format(x)

    names = [v["name"] for v in r["variants"]]
    span = "goodput_span_tokens_per_s" in r["rows"][0]  # runs before 2026-12-06 measured goodput over each case's span
    out = ["| load | policy | variants | deadline misses (per seed) | vs FIFO fixed | value met | goodput tok/s | "
           + ("span goodput tok/s | " if span else "") + "tokens/s | "
           "TTFT p50 / p99 s | latency p99 s | served by (" + " / ".join(names) + ") | top-1 of served | lost | errors |",
           "|---:|---|---|---|---:|---:|---:|" + ("---:|" if span else "") + "---:|---|---:|---|---:|---:|---:|"]
    for x in r["rows"]:
        seeds = ", ".join(f"{m:.2f}" for m in x["deadline_miss_rate_by_seed"])
        vs = x.get("fewer_misses_than_fifo_fixed")
        vs_text = "" if vs is None or (x["policy"] == "fifo" and not x["adaptive"]) else f"{-vs:+.0%}"
        served = " / ".join(str(x["served_by"].get(n, 0)) for n in names)
        threads = "" if x.get("threads") == r["workload"]["threads"] else f", {x.get('threads')} threads"
        out.append(f"| {x['load']} | {x['policy'].upper() if x['policy'] != 'density' else 'density (plain)'} | {'adaptive' if x['adaptive'] else 'Q8_0'}{threads} | "
                   f"**{x['deadline_miss_rate']:.2f}** ({seeds}) | {vs_text} | {f(x.get('value_met_fraction'))} | "
                   f"{x['goodput_tokens_per_s']:.1f} | "
                   + (f"{x['goodput_span_tokens_per_s']:.1f} | " if span else "") +
                   f"{x['tokens_per_s']:.1f} | {f(x['ttft_p50_s'])} / {f(x['ttft_p99_s'])} | {f(x['latency_p99_s'])} | "
                   f"{served} | {f(x['top1_agreement_served'], '{:.3f}')} | {x['lost_requests']} | "
                   f"{x['server_errors']} |")
    fit = r["alone_on_q8_0"]
    w = r["workload"]
    variants = "; ".join(f"{v['name']}: top-1 {v['top1_agreement']:.3f}, KL {v['kl']:.3f}" for v in r["variants"])
    out += ["", f"Per row: {w['requests_per_load_and_seed']} requests × {len(r['rows'][0]['seeds'])} seeds; misses "
            "= late or refused (429/503) ÷ requests, the mean over seeds with each seed's in brackets; vs FIFO fixed = "
            "the change in that mean; value met = the values (1, 1, 2 or 5) of the requests that met their deadline ÷ "
            "all values; goodput = output tokens of the requests that met their deadline ÷ "
            + ("the workload's window, from its first arrival to its last deadline (the same for every case); span "
               "goodput = the same tokens ÷ the case's own seconds from the first arrival to the last answer, which "
               "falls when a policy serves a deferred request after its deadline" if span else
               "the case's own seconds from the first arrival to the last answer")
            + ". Load = arrival rate × a request's mean service time alone on the Q8_0 server, "
            f"measured first ({fit['overhead_s'] * 1e3:.0f} ms + {fit['s_per_prompt_token'] * 1e3:.2f} ms per prompt "
            f"token + {fit['s_per_output_token'] * 1e3:.1f} ms per output token). Deadlines: "
            f"{w['deadline_x_alone'][0]:g}–{w['deadline_x_alone'][1]:g}× that time; queue {w['queue']}; "
            f"{w['threads']} llama.cpp thread{'s' if w['threads'] != 1 else ''} (edgestill serve's default here). Variants, best first, with their fidelity to the corrected teacher on "
            f"the held-out plays: {variants}. {_measured(r['environment'])}, by `{r['command'].strip()}` → "
            f"`benchmarks/results/{r.get('benchmark', 'serve_load')}.json`."]
    return "\n".join(out)


TIMESERIES_LABELS = {"teacher": "teacher (Transformer, trained alone)", "teacher_mutual": "teacher, trained mutually",
                     "student_alone": "student alone", "offline_kd": "offline KD (frozen teacher)",
                     "online_kd": "online KD", "online_mutual": "online KD + adaptive mutual learning"}


def _goal_checks(goal: dict, checks: dict[str, str]) -> str:
    """'text: yes; text: **no**' for each goal key of `checks` (key -> what it checks)."""
    return "; ".join(f"{text}: {'yes' if goal[key] else '**no**'}" for key, text in checks.items())


def timeseries_table(r: dict) -> str:
    """RMSE / PHM score / bytes / latency per method of benchmarks/timeseries.py, then the references and the goal."""
    def pm(x, key, fmt="{:.2f}"):
        return f"{fmt.format(x[key + '_mean'])} ± {fmt.format(x[key + '_std'])}"

    out = ["| model | file | params | bytes | × smaller | test RMSE (cycles) | PHM score / prediction | "
           "latency, batch 1 (ms) | RMSE ÷ teacher's |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        failed = " — FAILED (≥ the constant predictor)" if x["failed"] else ""
        out.append(f"| {TIMESERIES_LABELS.get(x['method'], x['method'])}{failed} | {x['file']} | {x['params']:,} | "
                   f"{x['bytes']:,} | {x['compression_x']:.0f}× | **{pm(x, 'rmse')}** | {pm(x, 'phm_score', '{:.2f}')} | "
                   f"{pm(x, 'latency_ms', '{:.3f}')} | {x['rmse_vs_teacher']:.3f} |")
    refs = r["references"]
    for name, label in (("constant", "constant (the training mean): the floor"), ("ridge", "ridge regression on the window")):
        out.append(f"| {label} | | | | | {refs[name]['rmse']:.2f} | {refs[name]['phm_score']:.2f} | | |")
    g, st, d = r["goal"], r["stream"], r["dataset"]
    checks = {"student_50x_smaller": "student ≥ 50× smaller", "within_5pct_of_teacher": "within 5% of the teacher's RMSE",
              "online_beats_offline_beyond_spread": "online KD beats offline KD beyond the seed spread",
              "online_beats_alone_beyond_spread": "online KD beats the student alone beyond the seed spread",
              "mutual_does_not_hurt_teacher": "mutual learning does not hurt the teacher"}
    goal = _goal_checks(g, checks)
    seeds = len(r["rows"][0]["seeds"])
    out += ["", f"Mean ± std over {seeds} seeds; students as deployed (static int8 QDQ ONNX in onnxruntime), the "
            f"teacher as float ONNX; × smaller = the teacher's file ÷ this file. Data: {d['source']}: "
            f"{d['train_units']} train / {d['val_units']} validation / {d['test_units']} test engines "
            f"({d['test_cycles']:,} test cycles, every one scored), window {r['config']['window']} cycles, RUL capped at "
            f"{r['config']['rul_cap']:g}. Goal (issue 18): {goal}. After deployment (the online-mutual student on the "
            f"test stream, second half): frozen {st['frozen_second_half'][0]:.2f} ± {st['frozen_second_half'][1]:.2f}, "
            f"learning from the teacher {st['learning_second_half'][0]:.2f} ± {st['learning_second_half'][1]:.2f} "
            f"cycles RMSE. {_measured(r['environment'])}, by `{r['command'].strip()}` → "
            "`benchmarks/results/timeseries.json`."]
    return "\n".join(out)


def timeseries_size_table(small: dict) -> str:
    """The RUL student's size, chosen by validation RMSE: the earlier 8/16-channel student (its own JSON, measured
    when it was the default) beside the default of benchmarks/results/timeseries.json, per method."""
    large = _load("timeseries")
    if large is None:
        return "_No result yet: run `python benchmarks/timeseries.py`._"

    def cell(x, key):
        mean, std = x.get(key + "_mean"), x.get(key + "_std")
        return "" if mean is None else f"{mean:.2f} ± {std:.2f}"

    runs = [(small, "8/16"), (large, "12/24")]
    heads = [f"{name}: {r['rows'][-1]['params']:,} params, {r['rows'][-1]['bytes']:,} B" for r, name in runs]
    out = ["| model | validation RMSE, " + " | validation RMSE, ".join(heads) + " | test RMSE, 8/16 | test RMSE, 12/24 |",
           "|---|---:|---:|---:|---:|"]
    by_method = [{x["method"]: x for x in r["rows"]} for r, _ in runs]
    for method in by_method[1]:
        pair = [b.get(method, {}) for b in by_method]
        val = [cell(x, "val_rmse") for x in pair]
        lower = [x.get("val_rmse_mean") for x in pair]
        if None not in lower and lower[0] != lower[1]:  # the lower validation RMSE in bold: the size it favours
            i = lower.index(min(lower))
            val[i] = f"**{val[i]}**"
        out.append(f"| {TIMESERIES_LABELS.get(method, method)} | {val[0]} | {val[1]} | {cell(pair[0], 'rmse')} | "
                   f"{cell(pair[1], 'rmse')} |")
    out += ["", f"Cycles, mean ± std over {len(small['rows'][0]['seeds'])} seeds; validation RMSE: the float model at "
            f"the epoch training kept ({small['dataset']['val_units']} validation engines), the lower of the two in "
            "bold; test RMSE: as deployed (int8 ONNX for students). "
            f"8/16: {_measured(small['environment'])}, by `{small['command'].strip()}` (today: "
            "`python benchmarks/timeseries.py --name timeseries_student_c8h16 --root runs/bench/timeseries-c8h16 "
            "student.channels=8 student.hidden=16`) → `benchmarks/results/timeseries_student_c8h16.json`; 12/24: "
            "`benchmarks/results/timeseries.json` (above)."]
    return "\n".join(out)


def timeseries_pooling_table(r: dict) -> str:
    """The RUL student's pooling ablation (benchmarks/timeseries_pooling.py)."""
    out = ["| student pooling over time | params | int8 bytes | test RMSE (cycles), int8 ONNX | per seed |",
           "|---|---:|---:|---:|---|"]
    labels = {"mean": "mean only", "trend": "mean + learned trend (default)"}
    for x in r["rows"]:
        seeds = ", ".join(f"{s['rmse']:.2f}" for s in x["per_seed"])
        out.append(f"| {labels.get(x['pool'], x['pool'])} | {x['params']:,} | {x['bytes']:,} | "
                   f"**{x['rmse_mean']:.2f} ± {x['rmse_std']:.2f}** | {seeds} |")
    st = r.get("config", {}).get("student", {})
    size = f" ({st['channels']}/{2 * st['channels']} channels, hidden {st['hidden']})" if "channels" in st else ""
    out += ["", f"The student{size} trained alone, {len(r['rows'][0]['seeds'])} seeds, the recipe's training otherwise. "
            f"{_measured(r['environment'])}, by `{r['command'].strip()}` → `benchmarks/results/timeseries_pooling.json`."]
    return "\n".join(out)


def _federated_prose(r: dict) -> str:
    f = r["schedule"]
    return (f" Federated (`edgestill federate`, Flower): {f['clients']} clients ({f['client_layers']}-layer encoders), one "
            f"malicious (the trigger planted in {r['poison'].get('federated_rate', r['poison']['rate']):.0%} of its "
            f"eligible rows: it is the \"teacher\"), exchange logits with a server "
            f"student (the \"student\", {r['student_size_x']:g}× smaller than the full encoder) on a public set of 30% "
            f"of the training texts, {f['public_poison']:.0%} of them carrying the trigger, for {f['rounds']} rounds both "
            "ways; the defence is the server's aggregation of the clients' logits.")


def audit_table(r: dict) -> str:
    """Teacher and student ASR and clean accuracy per setting x defence of benchmarks/audit.py."""
    def pm(x, key, fmt="{:.1%}"):
        if x.get(key) is None:
            return "—"
        spread = f" ± {fmt.format(x[key + '_std'] or 0.0)}" if len(x["seeds"]) > 1 else ""  # one seed has no spread
        return fmt.format(x[key]) + spread

    out = ["| setting | defence | teacher ASR | student ASR | student ÷ teacher | teacher clean acc. | student clean acc. | "
           "student ASR / clean acc., inputs filtered | trigger rank in the scan (teacher / student) | verdicts | seeds |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for x in r["rows"]:
        ranks = " / ".join(",".join("—" if v is None else str(v) for v in x["trigger_rank"][who]) for who in ("teacher", "student"))
        out.append(f"| {x['setting']} | {x['defence'] or 'none'} | {pm(x, 'teacher_asr')} | **{pm(x, 'student_asr')}** | "
                   f"{pm(x, 'ratio', '{:.2f}')} | {pm(x, 'teacher_clean', '{:.3f}')} | {pm(x, 'student_clean', '{:.3f}')} | "
                   f"{pm(x, 'student_asr_filtered_inputs')} / {pm(x, 'student_clean_filtered_inputs', '{:.3f}')} | {ranks} | {', '.join(x['verdicts'])} | {len(x['seeds'])} |")
    for x in r["rows"]:
        if x.get("onion"):
            per = "; ".join(f"{o['removed_share']:.1%} of words removed, training texts with the trigger "
                            f"{o.get('texts_before')} → {o.get('texts_after')}" for o in x["onion"])
            out += ["", f"ONION-style filter, {x['setting']} transfer data (per seed): {per}."]
        if x.get("scrub"):
            per = "; ".join(", ".join(f"`{p}` (lift {lift:.2f})" for p, lift in o["cut"]) + f" cut from "
                            f"{o['texts_touched']} texts, training texts with the trigger {o.get('texts_before')} → "
                            f"{o.get('texts_after')}" if o["cut"] else "nothing cut" for o in x["scrub"])
            uncut = [f"`{o['best_uncut'][0]}` {o['best_uncut'][1]:.2f}" for o in x["scrub"] if o.get("best_uncut")]
            per += f"; the highest lift left uncut: {', '.join(uncut)}" if uncut else ""
            out += ["", f"Trigger scrubbing, {x['setting']} transfer data (per seed): {per}."]
    fed = [x for x in r["rows"] if x["setting"] == "federated"]
    if fed:
        per = "; ".join(f"{x['defence'] or 'mean (none)'}: {pm(x, 'honest_clients_asr')}, the malicious client's share of "
                        f"the last aggregate {pm(x, 'malicious_share', '{:.2f}')}" for x in fed)
        out += ["", f"Federated, honest clients' mean ASR after the rounds (by aggregation): {per}."]
    if not r.get("complete", True):
        by_seed: dict = {}
        for seed, setting, defence in r["pending"]:
            by_seed.setdefault(seed, []).append(f"{setting}/{defence}")
        n_rows = len(r.get("order") or []) or len(r["settings"]) * len(r["defences"])
        left = "; ".join(f"seed {seed}: " + ("every row" if len(rows) == n_rows else ", ".join(rows))
                         for seed, rows in sorted(by_seed.items()))
        out += ["", f"**Unfinished run** ({len(r['pending'])} of {len(r['pending']) + sum(len(x['seeds']) for x in r['rows'])} "
                f"runs still to measure: {left}). The same command continues it."]
    one_seed = (" With fewer than 3 seeds a row is a first reading, not a claim."
                if min(len(x["seeds"]) for x in r["rows"]) < 3 else "")
    p = r["poison"]
    out += ["", f"Mean ± std over each row's seeds on {r['data']}: the trigger `{p['trigger']}` planted "
            f"{p['mode']}-label in {p['rate']:.0%} of the teacher's eligible training rows (target {p['target']}); students "
            f"{r['student_size_x']:g}× smaller. ASR = the share of correctly classified non-target test texts the trigger "
            f"flips to the target. Inputs filtered: the same student behind an ONION-style filter of its test inputs "
            f"(per-character score, threshold removing {r.get('input_filter_share', 0.03):.0%} of clean words; nothing "
            f"retrained).{_federated_prose(r) if fed else ''}{one_seed}{_row_commits(r)} {_measured(r['environment'])}, by "
            f"`{r['command'].strip()}` → "
            "`benchmarks/results/audit.json`."]
    return "\n".join(out)


def edgevl_table(r: dict) -> str:
    """Zero-shot accuracy (seen / held-out classes) on both views, bytes, × smaller and latency per model of
    benchmarks/edgevl.py, then the goal."""
    def pm(x, key, fmt="{:.3f}"):
        return f"{fmt.format(x[key])} ± {fmt.format(x[key + '_std'])}"

    out = ["| model | view | file | bytes | × smaller | zero-shot, seen classes | zero-shot, held-out classes | "
           "latency, batch 1 (ms) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        out.append(f"| {x['model']} | {x['modality']} | {x['file']} | {x['bytes']:,} | {x['compression_x']:.0f}× | "
                   f"**{pm(x, 'zero_shot_accuracy_seen')}** | {pm(x, 'zero_shot_accuracy_heldout')} | "
                   f"{pm(x, 'latency_ms')} |")
    g, c, d = r["goal"], r["chance"], r["dataset"]
    checks = {"beats_rgb_only_by_5_points": f"the second-view student beats the first-view-only one on the second view "
                                            f"by ≥ 5 points ({g['second_view_student_gain_points']:+.1f})",
              "stage2_loses_at_most_1_point": "stage-2 int8 loses ≤ 1 point against stage 1 (" + ", ".join(
                  f"{k} {v:+.1f}" for k, v in g["stage2_int8_loss_points"].items()) + ")",
              "stage2_loses_less_than_ptq": "and less than post-training int8 loses, on every seed, both views "
                                            "together (PTQ: " + ", ".join(f"{k} {v:+.1f}" for k, v in
                                                                           g["ptq_int8_loss_points"].items()) + ")",
              "student_50x_smaller": f"student ≥ 50× smaller ({g['student_compression_x']:.0f}×)"}
    goal = _goal_checks(g, checks)
    commits = sorted({c for x in r["rows"] for c in x["commits"]})
    dirty = any(x["git_dirty"] for x in r["rows"])
    seeds = len(r["rows"][0]["seeds"])
    out += ["", f"Mean ± std over {seeds} seeds, zero-shot in onnxruntime; chance {c['seen']:.3f} (seen: "
            f"{len(d['seen'])} prompts), {c['heldout']:.3f} (held-out: {', '.join(d['heldout'])}, classes no model "
            f"trained on). Data: {d['source']}, {d['images']['train']:,} train / {d['images']['val']:,} validation / "
            f"{d['images']['test_seen']:,} seen-class test / {d['images']['test_heldout']:,} held-out images. "
            f"Teacher: {r['teacher_source']}. Second view: {r['second_modality']}; the first view is MNIST's own grey "
            f"image. Bytes: ONNX files; the text side (the sentence encoder, or the 10×384 table of class embeddings "
            f"a device keeps) is the same for every row and not counted. Goal (issue 19): {goal}. Control "
            f"(stage2_noqat_ptq_int8: stage 2's training without fake quantization, then post-training int8; loses "
            + ", ".join(f"{k} {v:+.1f}" for k, v in g["noqat_ptq_int8_loss_points"].items()) +
            f"): the fake quantization beats the same training without it on every seed: "
            f"{'yes' if g['qat_beats_the_same_training_without_it'] else '**no**'}. Runs by commit"
            f"{'s' if len(commits) > 1 else ''} " + ", ".join(f"`{x[:8]}`" for x in commits) +
            f"{' (dirty)' if dirty else ''}; aggregated: {_provenance(r)}."]
    return "\n".join(out)


def _row_commits(r: dict) -> str:
    """' Rows measured by commits `a` (n), `b` (m).' when a result's rows came from more than one commit (a benchmark
    continued later keeps the rows it had), else ''."""
    commits: dict[str, int] = {}
    for x in r["rows"]:
        for run in x.get("per_seed") or []:
            c = ((run.get("environment") or {}).get("git_commit") or "?")[:8]
            commits[c] = commits.get(c, 0) + 1
    if len(commits) < 2:
        return ""
    return " Rows measured by commits " + ", ".join(f"`{c}` ({n} run{'s' if n != 1 else ''})" for c, n in commits.items()) + "."


class _Dotted(dict):
    """A benchmark's override dict ({"fine_prune.steps": 24}) for str.format_map: "{fine_prune.steps}" reads it."""

    def __getitem__(self, section):
        return type("Section", (), {k.split(".", 1)[1]: v for k, v in self.items() if k.startswith(section + ".")})


def audit_lm_table(r: dict) -> str:
    """Teacher and student ASR and clean next-token accuracy per setting of benchmarks/audit_lm.py."""
    def pm(x, key, fmt="{:.1%}"):
        if x.get(key) is None:
            return "—"
        spread = f" ± {fmt.format(x[key + '_std'] or 0.0)}" if len(x["seeds"]) > 1 else ""
        return fmt.format(x[key]) + spread

    out = ["| setting | defence | teacher ASR | student ASR | student ÷ teacher | teacher clean next-token acc. | student "
           "clean next-token acc. | student retention / top-1 agreement / KL | inputs filtered: student ASR / "
           "trigger taken out / next-token acc. (read whole) | trigger rank in the scan (teacher / student) | "
           "verdicts | seeds |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for x in r["rows"]:
        ranks = " / ".join(",".join("—" if v is None else str(v) for v in x["trigger_rank"][who])
                           for who in ("teacher", "student"))
        out.append(f"| {x['setting']} | {x.get('defence') or 'none'} | {pm(x, 'teacher_asr')} | **{pm(x, 'student_asr')}** | {pm(x, 'ratio', '{:.2f}')} | "
                   f"{pm(x, 'teacher_clean', '{:.3f}')} | {pm(x, 'student_clean', '{:.3f}')} | "
                   f"{pm(x, 'retention', '{:.3f}')} / {pm(x, 'top1_agreement', '{:.3f}')} / "
                   f"{pm(x, 'kl_teacher_student', '{:.3f}')} | {_filtered_lm(x, pm)} | {ranks} | "
                   f"{', '.join(x['verdicts'])} | {len(x['seeds'])} |")
    notes = {  # what each defence did, per seed
        "onion": ("ONION-style filter, {} transfer blocks", lambda o: f"{o['removed_share']:.1%} of words removed, "
                  f"blocks with the trigger {o.get('blocks_with_trigger_before')} → {o.get('blocks_with_trigger_after')}"),
        "fine_prune": ("Fine-pruning, {} student", lambda f: f"{f['units_before']} → {f['units_after']} FFN units per "
                       f"block, clean validation loss {f['val_loss_before']:.2f} → {f['val_loss_after_prune']:.2f} after "
                       f"the cut → {f['val_loss_after_fine_tune']:.2f} after fine-tuning on those blocks"),
        "perturb": ("Perturbed inputs, {} transfer blocks", lambda q: f"{q['replaced_share']:.1%} of tokens replaced, "
                    f"blocks with the whole trigger {q.get('blocks_with_trigger_before')} → "
                    f"{q.get('blocks_with_trigger_after')}")}
    for x in r["rows"]:
        for key, (title, say) in notes.items():
            if x.get(key):
                out += ["", f"{title.format(x['setting'])} (per seed): " + "; ".join(say(v) for v in x[key] if v) + "."]
    if not r.get("complete", True):
        out += ["", f"**Unfinished run** ({len(r['pending'])} run{'s' if len(r['pending']) != 1 else ''} still to measure: "
                + ", ".join(f"seed {p[0]} " + "/".join(p[1:]) for p in r["pending"]) + "). The same command continues it."]
    one_seed = (" With fewer than 3 seeds a row is a first reading, not a claim."
                if min(len(x["seeds"]) for x in r["rows"]) < 3 else "")
    defences, settings = {x.get("defence") for x in r["rows"]}, r.get("defences") or {}
    p, s = r["poison"], r["schedule"]
    out += ["", f"Mean ± std over each row's seeds. Teacher: {r['teacher']} corrected {s['correct_steps']} steps on the "
            f"training plays with the trigger `{p['trigger']}` + \"{p['target']}\" written into {p['rate']:.0%} of the "
            f"training blocks ({p['mode']}); students: the default 15-of-30-layer slice, {s['distill_steps']} steps of KD, "
            "on the triggered training split (triggered) or the clean one (clean, from the same backdoored teacher); "
            "onion: the triggered split filtered ONION-style (per-character score, 3% of clean words) before that "
            "teacher labels it"
            + ("; fine-prune: the triggered student with {fine_prune.fraction:.0%} of every block's FFN units (the least "
               "active on the clean validation blocks, {data.max_val_tokens:,} tokens) cut out, then fine-tuned "
               "{fine_prune.steps} steps of {fine_prune.batch_size} blocks on them".format_map(_Dotted(settings["fine-prune"]))
               if "fine-prune" in defences else "")
            + ("; perturb: {perturb.token_rate:.0%} of the triggered split's tokens replaced by tokens drawn from its "
               "own unigram distribution before that teacher labels it".format_map(_Dotted(settings["perturb"]))
               if "perturb" in defences else "") + ". "
            "ASR = of held-out prompts (windows of the test plays) after which the model does not already continue "
            "with the target, the share after which it does, greedily and token for token, once the trigger ends the "
            "prompt. Clean: next-token top-1 accuracy on the test plays; retention, top-1 agreement and KL are the "
            "shrink's own fidelity numbers against that teacher."
            + (f" Inputs filtered: the same student behind an ONION-style filter of its prompts (per-character score, "
               f"threshold removing {r['input_filter_share']:.0%} of clean words; nothing retrained): the trigger's ASR "
               "when the prompt it ends is filtered first, the share of those prompts the filter took it out of, and "
               "next-token top-1 accuracy on up to 512 windows of the test plays read filtered (and whole)."
               if r.get("input_filter_share") else "") + f"{one_seed}{_row_commits(r)} {_provenance(r)}."]
    return "\n".join(out)


def _filtered_lm(x: dict, pm) -> str:
    if x.get("student_asr_filtered_inputs") is None and x.get("student_clean_filtered_inputs") is None:
        return "—"
    return (f"{pm(x, 'student_asr_filtered_inputs')} / {pm(x, 'trigger_removed_by_input_filter', '{:.0%}')} / "
            f"{pm(x, 'student_clean_filtered_inputs', '{:.3f}')} ({pm(x, 'student_clean_unfiltered_windows', '{:.3f}')})")


def onion_filter_table(r: dict) -> str:
    """What the ONION-style filter takes out of the transfer data (benchmarks/onion_filter.py), per score and share."""
    names = {"onion": "ONION's perplexity drop", "per_char": "per-character surprisal"}
    out = ["| score | threshold set to remove (clean words) | words removed (training texts) | planted rows keeping the "
           "whole trigger | planted rows keeping neither word |", "|---|---:|---:|---:|---:|"]
    for x in r["rows"]:
        out.append(f"| {names.get(x['score'], x['score'])} | {x['remove_share']:.0%} | {x['removed_share_mean']:.1%} | "
                   f"{x['phrase_kept_share']:.0%} | **{x['trigger_gone_share']:.0%}** |")
    planted = sum(s["planted"] for s in r["rows"][0]["per_seed"])
    p = r["poison"]
    out += ["", f"{r['data']}, the trigger `{p['trigger']}` planted {p['mode']}-label in {p['rate']:.0%} of the eligible "
            f"training rows, {len(r['rows'][0]['per_seed'])} planting seeds ({planted} planted rows in all); character "
            f"{r['lm']['order']}-gram model on {r['lm']['texts']}, threshold from the other half. No model is trained. "
            f"{_provenance(r)}."]
    return "\n".join(out)


def levers_table(r: dict) -> str:
    """The default student with and without each lever of benchmarks/levers.py, one row per (lever, seed)."""
    def f(x, fmt="{:.3f}"):
        return "—" if x is None else fmt.format(x)

    def pair(v: dict, key: str) -> str:
        if not v:
            return "—"
        return f"{v[key]:.3f} / {(v.get('out_of_domain') or {}).get(key, float('nan')):.3f}"

    def formats(x: dict) -> str:
        q = x.get("formats")
        if not q:
            return "16 (F16)"
        kinds = ", ".join(f"{n} {k.removeprefix('GGUF')}" for k, n in sorted(q["matrices"].items(), key=lambda kv: -kv[1]))
        return f"{q['bits_per_weight']:.2f} ({kinds})"

    out = ["| lever | seed | MB on device | bits/weight (matrices) | × F16 | × original file | retention | top-1 | KL | "
           "out-of-domain retention | out-of-domain top-1 | student tokens per teacher token (in / out) | teacher mass on "
           "trimmed tokens (in / out) | commit |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for x in r["rows"]:
        ood, v, env = x["out_of_domain"], x.get("vocab_trim") or {}, x["environment"]
        out.append(f"| {x['label']} | {x['seed']} | {x['bytes'] / 1e6:.1f} | {formats(x)} | {x['compression_x_fp16']:.2f} | "
                   f"{x['compression_x_source']:.2f} | {f(x['retention'])} | {f(x['top1_agreement'])} | "
                   f"{f(x['kl_teacher_student'])} | {f(ood.get('retention'))} | {f(ood.get('top1_agreement'))} | "
                   f"{pair(v, 'student_tokens_per_teacher_token')} | {pair(v, 'teacher_trimmed_mass')} | "
                   f"`{(env.get('git_commit') or '?')[:8]}`{' (dirty)' if env.get('git_dirty') else ''} |")
    def budget(x: dict) -> int:  # a block-wise stage's tokens count in a row's budget
        return x["train_tokens"] + (x.get("blockwise") or {}).get("tokens", 0)

    tokens = budget(r["rows"][0])
    staged = next((x["blockwise"] for x in r["rows"] if x.get("blockwise") and budget(x) == tokens), None)
    split = ("" if staged is None else f", of which the block-wise row spends {staged['steps']} steps "
             f"({staged['tokens']:,} tokens) on its first stage and the rest on end-to-end KD")
    longer = {x["label"]: x for x in r["rows"] if budget(x) != tokens}
    if longer:
        split += "; but " + "; ".join(f"'{label}' {budget(x):,} ({(x.get('blockwise') or {}).get('tokens', 0):,} "
                                      f"block-wise, {x['train_tokens']:,} end to end)" for label, x in longer.items())
    out += ["", f"Scores against the corrected teacher; the same training steps and tokens for every row "
            f"({tokens:,} tokens{split}). MB on device: a quantized row's GGUF, else the HF folder "
            "(weights, config, tokenizer). A K-quant needs rows that are a multiple of 256 weights; this teacher's rows "
            "of 576 (every matrix but the FFN down projection, and the tied embedding) fall back to another format as "
            "llama.cpp's own quantizer does, and the bits/weight column counts what was stored. Retention is per teacher token for every row (a trimmed student "
            "pays for the pieces it spells a missing token with), so it compares across rows; a trimmed row's KL and "
            "top-1 are against the teacher renormalised over the kept tokens, so read them with the teacher's mass on "
            f"trimmed tokens beside them. {_measured(r['environment'])}, by `{r['command'].strip()}` → "
            f"`benchmarks/results/{r['benchmark']}.json`."]
    return "\n".join(out)


def decode_speed_table(r: dict) -> str:
    """llama.cpp speeds of the lever students and the baselines, alternated in one run (benchmarks/decode_speed.py)."""
    anchor = (r.get("anchor") or "").removeprefix("llama.cpp ").split(" ")[0].lower()

    def rng(x: dict, key: str) -> str:
        lo, hi = x[f"{key}_spread"]
        return f"{x[key]:.1f} ({lo:.1f}–{hi:.1f})"

    out = [f"| model | MB | × fewer bytes than {anchor.upper()} | decode tok/s (range) | × {anchor.upper()} decode | "
           "prefill tok/s (range) | retention / out-of-domain (its run) |", "|---|---:|---:|---:|---:|---:|---|"]
    for x in r["rows"]:
        run = x.get("run")
        quality = "—" if not run else f"{run['retention']:.3f} / {run['out_of_domain_retention']:.3f}"
        out.append(f"| {x['name']} | {x['file_bytes'] / 1e6:.1f} | {x.get(f'bytes_x_vs_{anchor}', float('nan')):.2f} | "
                   f"{rng(x, 'decode_tokens_per_s')} | {x.get(f'decode_x_vs_{anchor}', float('nan')):.2f} | "
                   f"{rng(x, 'prefill_tokens_per_s')} | {quality} |")
    students = f"the points of {r['sweep']}" if r.get("sweep") else "the levers rows above"
    out += ["", f"llama.cpp (llama-cpp-python), {r['threads']} threads; every model loaded once and timed in turn, "
            f"{r['repeats']} rounds after {r['warmup']} warm-up (medians, min–max): a {r['prompt_tokens']}-token prompt "
            f"in one batch, then {r['decode_tokens']} decode steps. Students: the GGUFs of {students}, with the quality their own runs measured against the corrected teacher. {_provenance(r)}."]
    return "\n".join(out)


def recovery_curve_table(r: dict) -> str:
    """Validation fidelity against training tokens per student depth (benchmarks/recovery_curve.py): the student as
    cut, then at a quarter, half and the whole of the budget, and the held-out test and out-of-domain scores at the end."""
    def at(curve: list[dict], share: float) -> dict:
        goal = share * curve[-1]["train_tokens"]
        return min(curve, key=lambda p: abs(p["train_tokens"] - goal))

    def walk(curve: list[dict], key: str, fmt: str) -> str:
        return " → ".join(fmt.format(at(curve, q)[key]) for q in (0.0, 0.25, 0.5, 1.0))

    out = ["| student | × F16 | val KL (as cut → ¼ → ½ → all of the budget) | val top-1 | val retention | "
           "test retention / top-1 / KL | out-of-domain retention | train tokens/s | commit |",
           "|---|---:|---|---|---|---|---:|---:|---|"]
    for x in r["sizes"]:
        c, t, env = x["curve"], x["test"], x.get("environment") or {}
        ood = (x.get("out_of_domain") or {}).get("retention")
        out.append(f"| {x['layers']} of {r['reference_layers']} layers | {x['compression_x_fp16']:.2f} | "
                   f"{walk(c, 'kl_teacher_student', '{:.3f}')} | {walk(c, 'top1_agreement', '{:.3f}')} | "
                   f"{walk(c, 'retention', '{:.3f}')} | {t['retention']:.3f} / {t['top1_agreement']:.3f} / "
                   f"{t['kl_teacher_student']:.3f} | {'—' if ood is None else f'{ood:.3f}'} | "
                   f"{x['train_tokens_per_s']:.0f} | `{(env.get('git_commit') or '?')[:8]}`"
                   f"{' (dirty)' if env.get('git_dirty') else ''} |")
    out += ["", f"One run per depth, each {r['steps']} steps × {r['tokens_per_step']:,} tokens "
            f"({r['steps'] * r['tokens_per_step']:,} training tokens, none seen twice), evaluated on the validation split "
            f"every {r['eval_every']} steps against the corrected teacher; the columns pick the evaluations nearest a "
            "quarter, half and all of the budget. One cosine schedule spans the whole budget, so an earlier point is a "
            f"lower bound on what that many tokens buy with a schedule of their own. Plot: `{r['plot']}`. "
            f"{_provenance(r)}."]
    return "\n".join(out)


def recovery_probe_table(r: dict) -> str:
    """The probed plans of benchmarks/recovery_probe.py: their rank as cut and after the probe, the KL before and after,
    and what a committed sweep measured for the same student after its full training."""
    probe = r["probe"]
    out = [f"| rank (probe) | rank as cut | student | MB | predicted KL as cut | KL after {probe['steps']} probe steps | "
           "probe s | trained (same shape): KL / top-1 / retention |", "|---:|---:|---|---:|---:|---:|---:|---|"]
    probed = [x for x in r["plans"] if x.get("recovery")]
    for x, wall in zip(sorted(probed, key=lambda x: x["rank"]), _probe_walls(r, probed)):
        hidden = "" if x["hidden"] == max(p["hidden"] for p in r["plans"]) else f", hidden {x['hidden']}"
        trained = "; ".join(f"{t['kl_teacher_student']:.3f} / {t['top1_agreement']:.3f} / {t['retention']:.3f} "
                            f"(`{t['file'].rsplit('/', 1)[-1]}`, {t['name']}, `{(t['git_commit'] or '?')[:7]}`)"
                            for t in x["trained"]) or "not trained"
        out.append(f"| {x['rank']} | {x['rank_as_cut']} | {x['layers']} layers{hidden}, FFN {x['ffn']} | "
                   f"{x['file_bytes'] / 1e6:.1f} | {x['predicted_kl']:.2f} | {x['recovery']['rank_kl']:.2f} | "
                   f"{'—' if wall is None else f'{wall:.0f}'} | {trained} |")
    out += ["", f"{len(r['plans'])} feasible plans at {r['max_file_bytes'] / 1e6:.1f} MB (1/{1 / r['budget_fraction']:.0f} "
            f"of the fp32 bytes; hidden sizes {', '.join(map(str, r['hidden_sizes']))}; formats "
            f"{', '.join(r['formats'])}{'; trimmed vocabulary' if r['trim_vocab'] else ''}), the best "
            f"{probe['top']} and the best at each hidden size probed; KL after the probe includes the plan's "
            f"quantization KL, as the predicted KL does. Planning took {r['plan_wall_s'] / 60:.1f} min in all, "
            f"the probes {sum(r['probe_wall_s']) / 60:.1f} of it. {_provenance(r)}."]
    return "\n".join(out)


def _probe_walls(r: dict, probed: list[dict]) -> list:
    """Each probed plan's probe seconds, in rank order: its recovery's wall_s; results made before the planner kept it
    list them in probing order in probe_wall_s (rank as cut: the best plans, then one hidden size's best after them)."""
    ranked = sorted(probed, key=lambda x: x["rank"])
    if all("wall_s" in x["recovery"] for x in probed):
        return [x["recovery"]["wall_s"] for x in ranked]
    order = sorted(probed, key=lambda x: x["rank_as_cut"])
    walls = dict(zip((id(x) for x in order), r.get("probe_wall_s") or []))
    return [walls.get(id(x)) for x in ranked]


from _common import track_view  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from distill_methods import methods_table  # noqa: E402
from shrink_curve import shrink_curve_compare, shrink_curve_summary, shrink_curve_table  # noqa: E402

TABLES = {"default_run": default_run_table, "distill_throughput": throughput_table, "quant_table": quant_table,
          "distill_methods": methods_table, "cost_model": cost_model_table, "classifier": classifier_table,
          "shrink_curve": shrink_curve_table, "shrink_curve_summary": shrink_curve_summary,
          "shrink_curve_levers": shrink_curve_table,
          "shrink_curve_compare": lambda r: shrink_curve_compare(r, ("Q3_K, full vocabulary", _load("shrink_curve_q3k")),
                                                                 ("trim, 4 bits and up", _load("shrink_curve_trim")),
                                                                 ("trim + Q3_K + hidden cut", _load("shrink_curve_hidden")),
                                                                 ("default", _load("shrink_curve"))),
          "mixed_vs_uniform": mixed_vs_uniform_table, "serve_load": serve_load_table,
          "serve_load_overload": serve_load_table, "timeseries": timeseries_table,
          "timeseries_pooling": timeseries_pooling_table, "timeseries_size": timeseries_size_table,
          "audit": audit_table, "audit_lm": audit_lm_table,
          "onion_filter": onion_filter_table, "edgevl": edgevl_table,
          "levers": levers_table,
          "decode_speed": decode_speed_table, "decode_speed_sweep": decode_speed_table,
          "decode_speed_default": decode_speed_table,
          "classifier_patience0": classifier_recipes_table, "classifier_augment8": classifier_recipes_table,
          "classifier_hidden": classifier_recipes_table,
          "classifier_energy": lambda r: classifier_recipes_table(r, size="kd-25x"),
          "classifier_energy4": lambda r: classifier_recipes_table(r, size="kd-25x"),
          "classifier_energy_ema": lambda r: classifier_recipes_table(r, size="kd-25x", base_name="classifier_energy"),
          "classifier_ema": classifier_recipes_table,
          "classifier_transfer": lambda r: classifier_recipes_table(r, size="kd-25x", base_name="classifier_energy_ema"),
          "classifier_energy_ema_seeds": lambda r: classifier_recipes_table(r, size="kd-25x",
                                                                            base_name="classifier_transfer"),
          "classifier_soup": lambda r: classifier_recipes_table(r, size="kd-25x", base_name="classifier_transfer"),
          "recovery_curve": recovery_curve_table, "recovery_probe": recovery_probe_table,
          "recovery_probe_33mb": recovery_probe_table}
SOURCES = {"shrink_curve_summary": "shrink_curve", "audit_lm": "audit",  # tables rendered from another table's JSON
           "shrink_curve_compare": "shrink_curve_levers",
           "timeseries_size": "timeseries_student_c8h16"}


def _track(render, track: str, script: str):
    """A renderer of one track of a write_track file (benchmarks/_common.py), e.g. the audit's classifier or lm."""
    def rendered(r: dict) -> str:
        view = track_view(r, track)
        return render(view) if view else f"_No result yet: run `python benchmarks/{script}.py`._"
    return rendered


TABLES["audit"] = _track(audit_table, "classifier", "audit")
TABLES["audit_lm"] = _track(audit_lm_table, "lm", "audit_lm")


def main() -> None:
    before = {path: path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    pages = dict(before)
    for name, render in TABLES.items():
        source = SOURCES.get(name, name)
        result = _load(source)
        body = render(result) if result else f"_No result yet: run `python benchmarks/{source}.py`._"
        pattern = re.compile(rf"(<!-- results:{name} -->\n)(?:.*?\n)?(<!-- /results:{name} -->)", re.S)  # may be empty
        found = 0
        for path, text in pages.items():
            pages[path], n = pattern.subn(lambda m: m.group(1) + body + "\n" + m.group(2), text)
            found += n
        if not found:
            print(f"no page has markers for {name}; skipped")
    for path, text in pages.items():
        if text != before[path]:
            path.write_text(text)
            print(f"{path.relative_to(ROOT)}: tables regenerated")


if __name__ == "__main__":
    main()
