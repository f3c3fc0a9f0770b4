"""Distillation methods side by side, same teacher, data, student and token budget -> benchmarks/results/distill_methods.json.

    python benchmarks/distill_methods.py                   # every row, 100 steps each (hours on 2 CPU cores)
    python benchmarks/distill_methods.py --steps 200       # a bigger budget (every row gets the same one)
    python benchmarks/distill_methods.py --rows jsd,pid    # only some rows, in this order (others in the JSON are kept)
    python benchmarks/distill_methods.py --quick           # smoke run on tiny settings (minutes) -> distill_methods_quick.json
    python benchmarks/distill_methods.py --seeds 0,1,2 --rows ce_only,forward_kl,pid   # 3 seeds: differences can be claimed

Every row is one `edgestill shrink` run through the project's own functions (`jobs.shrink.distill` + `evaluate`
with `load_config(overrides=...)`), in runs/bench/methods/<row>. Teacher smollm2-135m, corpus shakespeare,
the default 15-layer sliced student, the default held-out split (test plays, never trained on); each row
trains `--steps` steps of batch_size x seq_len tokens. A finished row (its folder has DONE) is reused, and
a killed row resumes from its last checkpoint, so rerunning the command continues where it stopped.

Rows: CE only (alpha 0); forward KL (the default objective); reverse KL; skew KL; JSD; on-policy JSD;
+ hidden-state MSE; + attention relations; KAKD PID-controlled alpha vs fixed alpha in {0.1, 0.5, 0.9, 1.0};
MTAKD: SmolLM2 + a llama.cpp Q2_K copy + a noise-corrupted copy (all share the tokenizer), agreement
weighting vs plain averaging vs the per-token-id median vs each single teacher. The copies are made from the teacher as
given and teach as they are: only the real teacher is corrected on the train split (teacher.correct, the default), as
a correction would repair a degraded copy. The single-copy rows train from the same sliced student as every other row
(the forward-KL run's layers, sliced from the corrected real teacher) and, like every row, are evaluated against the
corrected real teacher.

The JSON is written after every row; rows of an earlier result with the same shared overrides and reference are kept (a row
measured again replaces its seed), rows measured against another reference are dropped and listed as not measured.

Seeds (`--seeds`, distill.seed) change the order of the training batches (and on-policy sampling); the sliced
student, the corrected teacher and the data are the same for every seed. Seed 0 lives in <root>/<row>, seed s in
<root>/<row>-seed<s>. The table shows the mean and the spread across seeds, and calls a row better or worse than
forward KL only when it is so on every one of >= 3 seeds (paired by seed).

The teacher cache (top-k logits of the train split) depends only on teacher(s), data and top_k, so it is
built once per teacher set, kept in <root>/_caches/<key>/cache/ and handed to each new row's run
(`distill(teacher_cache_from=...)`, which copies it and still checks its fingerprint).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEACHER = "smollm2-135m"
NOISE_STD = 0.5  # corrupted teacher: Gaussian noise of this x each decoder matrix's std

# Small settings for --quick (the defaults are those of the default recipe). eval.* only shortens the
# speed/generation part of the report, which this benchmark does not use.
QUICK = ["data.seq_len=64", "data.max_train_tokens=1024", "data.max_eval_tokens=512", "data.max_val_tokens=256",
         "distill.batch_size=2", "distill.checkpoint_every=2", "distill.eval_every=2", "distill.warmup_steps=1",
         "eval.batch_size=4", "eval.speed_prompt_tokens=16", "eval.speed_decode_tokens=4", "eval.prompts=[\"To be\"]"]


@dataclass
class Row:
    name: str
    label: str
    group: str  # rows of a group are compared with each other in the table
    overrides: list[str] = field(default_factory=list)
    teachers: str = "real"  # real | multi | q2k | noisy: what the run trains from


ROWS = [
    Row("ce_only", "CE only (alpha 0)", "loss", ["distill.alpha=0.0"]),
    Row("forward_kl", "forward KL (default)", "loss"),
    Row("reverse_kl", "reverse KL", "loss", ["distill.loss=reverse_kl"]),
    Row("skew_kl", "skew KL (a 0.1)", "loss", ["distill.loss=skew_kl"]),
    Row("jsd", "JSD (beta 0.5)", "loss", ["distill.loss=jsd"]),
    Row("on_policy_jsd", "on-policy JSD (lambda 0.5)", "loss", ["distill.loss=jsd", "distill.on_policy_fraction=0.5"]),
    Row("hidden_mse", "forward KL + normalised hidden MSE (0.1)", "features", ["distill.hidden_mse_weight=0.1"]),
    Row("attention_relations", "forward KL + attention relations (1.0)", "features",
        ["distill.attention_relation_weight=1.0"]),
    Row("pid", "PID-controlled alpha (KAKD, r* 0.3)", "kd_weight", ["distill.pid=true"]),
    Row("alpha_0.1", "fixed alpha 0.1", "kd_weight", ["distill.alpha=0.1"]),
    Row("alpha_0.5", "fixed alpha 0.5", "kd_weight", ["distill.alpha=0.5"]),
    Row("alpha_0.9", "fixed alpha 0.9", "kd_weight", ["distill.alpha=0.9"]),
    Row("alpha_1.0", "fixed alpha 1.0", "kd_weight", ["distill.alpha=1.0"]),
    Row("multi_agreement", "3 teachers, agreement weights (MTAKD)", "multi_teacher",
        ["distill.teacher_weighting=agreement"], teachers="multi"),
    Row("multi_average", "3 teachers, plain average", "multi_teacher", ["distill.teacher_weighting=average"],
        teachers="multi"),
    Row("multi_median", "3 teachers, per-token-id median (robust aggregation)", "multi_teacher",
        ["distill.teacher_weighting=median"], teachers="multi"),
    Row("single_real", "single teacher: SmolLM2", "multi_teacher"),
    Row("single_q2k", "single teacher: Q2_K copy", "multi_teacher", teachers="q2k"),
    Row("single_noisy", "single teacher: corrupted copy", "multi_teacher", teachers="noisy"),
]
# Rows whose config equals another row's: reported under both names, trained once.
SAME_AS = {"alpha_0.9": "forward_kl", "single_real": "forward_kl"}

log = logging.getLogger("edgestill")


# --- the extra teachers -----------------------------------------------------------------------------------

def make_teachers(folder: Path, teacher_spec: str, noise_std: float) -> dict[str, str]:
    """A llama.cpp Q2_K copy and a noise-corrupted copy of the teacher (made once, reused): name -> model spec."""
    import torch

    from edgestill.export.gguf import export_gguf
    from edgestill.models.load import load_causal_lm, resolve_model_path
    from edgestill.runtime.llamacpp import llamacpp_quantize

    folder.mkdir(parents=True, exist_ok=True)
    q2k, noisy = folder / "teacher-Q2_K.gguf", folder / "teacher-noisy"
    if q2k.is_file() and (noisy / "config.json").is_file():
        return {"q2k": str(q2k), "noisy": str(noisy)}
    teacher = load_causal_lm(teacher_spec)
    src = resolve_model_path(teacher_spec)
    if not q2k.is_file():
        f32 = folder / "teacher-f32.gguf"
        log.info("making the Q2_K teacher: f32 GGUF -> llama.cpp Q2_K")
        export_gguf(teacher.model, teacher.tokenizer, f32, "f32", teacher_gguf=src if src.suffix == ".gguf" else None)
        llamacpp_quantize(f32, q2k, "Q2_K")
        f32.unlink()
    if not (noisy / "config.json").is_file():
        log.info("making the corrupted teacher: noise %.2f x std on every decoder matrix", noise_std)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in teacher.model.named_parameters():
                if p.dim() == 2 and ".layers." in name:
                    p.add_(noise_std * p.std() * torch.randn(p.shape, generator=g))
        tmp = noisy.with_name(noisy.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        teacher.model.save_pretrained(tmp)
        teacher.tokenizer.save_pretrained(tmp)
        shutil.rmtree(noisy, ignore_errors=True)
        tmp.rename(noisy)
    return {"q2k": str(q2k), "noisy": str(noisy)}


def make_student_init(folder: Path, teacher_spec: str, layers: list[int]) -> str:
    """The untrained student the real-teacher rows start from (same layers), for rows trained by another teacher."""
    if (folder / "config.json").is_file():
        return str(folder)
    from edgestill.models.load import load_causal_lm
    from edgestill.models.slice import slice_decoder

    teacher = load_causal_lm(teacher_spec)
    student = slice_decoder(teacher.model, layers)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    teacher.tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return str(folder)


# --- one row ------------------------------------------------------------------------------------------------

def _keep_cache(run_path: Path, shared: Path) -> None:
    """Keep this row's teacher cache as <shared>/cache/ for the next rows of the same teacher set."""
    if (shared / "cache").is_dir() or not (run_path / "cache").is_dir():
        return
    tmp = shared.with_name(shared.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_path / "cache", tmp / "cache")
    shutil.rmtree(shared, ignore_errors=True)
    tmp.rename(shared)


def _cache_key(cfg) -> str:
    key = json.dumps([cfg.teacher.model, cfg.teacher.extra, vars(cfg.data), cfg.distill.top_k], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def row_dir(out_root: Path, name: str, seed: int) -> Path:
    return out_root / (name if seed == 0 else f"{name}-seed{seed}")


def run_row(row: Row, overrides: list[str], eval_overrides: list[str], out_root: Path, seed: int = 0) -> dict:
    """Train and evaluate one row for one seed (or reuse its finished folder); the row's entry of the result."""
    import yaml

    from edgestill.config import load_config
    from edgestill.jobs.shrink import Distilled, distill, evaluate

    out = row_dir(out_root, row.name, seed)
    overrides = [*overrides, f"distill.seed={seed}"]
    if not (out / "DONE").is_file():
        cfg = load_config(overrides=[*overrides, f"output.dir={out}"])
        shared = out_root / "_caches" / _cache_key(cfg)
        t0 = time.time()
        run, ctx = distill(cfg, teacher_cache_from=shared)  # a copy of an earlier row's cache, when there is one
        distill_wall_s = time.time() - t0
        _keep_cache(run.path, shared)
        eval_cfg = load_config(overrides=[*overrides, *eval_overrides, f"output.dir={out}"])
        same_teacher = eval_cfg.teacher.model == cfg.teacher.model
        # a row trained from another teacher is measured against the real one, which evaluate() loads (and corrects)
        distilled = ctx if same_teacher else Distilled(None, None, None, ctx.history, ctx.layers, ctx.resumed)
        evaluate(eval_cfg, run.path, distilled, final_dir=run.final)
        (run.path / "bench_row.json").write_text(json.dumps({"distill_wall_s": distill_wall_s}))
        shutil.rmtree(run.path / "checkpoints", ignore_errors=True)
        run.finish()
    m = json.loads((out / "metrics.json").read_text())
    history = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if x.strip()]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    tokens_per_step = cfg["distill"]["batch_size"] * cfg["data"]["seq_len"]
    entry = {
        "label": row.label, "group": row.group, "overrides": overrides[len(BASE_OVERRIDES):-1], "seed": seed,
        "trained_from": [cfg["teacher"]["model"], *cfg["teacher"]["extra"]], "evaluated_against": m["teacher"]["name"],
        "reference": m.get("reference", "original"),
        "retention": m["retention"], "top1_agreement": m["top1_agreement"], "kl_teacher_student": m["kl_teacher_student"],
        # what broke outside the plays: the same scores on general English nothing here trained on
        "out_of_domain": {k: (m.get("out_of_domain") or {}).get(k) for k in ("retention", "top1_agreement",
                                                                              "kl_teacher_student", "source")},
        "student_perplexity": m["student"]["perplexity"], "teacher_perplexity": m["teacher"]["perplexity"],
        "steps": len(history), "train_tokens": len(history) * tokens_per_step,
        "train_s": sum(tokens_per_step / h["tokens_per_s"] for h in history),
        "distill_wall_s": json.loads((out / "bench_row.json").read_text())["distill_wall_s"],
        "final_val_loss": m["train"]["final_val_loss"], "run_dir": str(out),
        "environment": m.get("environment"),  # when, where and with which code this row was measured
    }
    if any("alpha" in h for h in history):
        alphas = [h["alpha"] for h in history if "alpha" in h]
        entry["alpha_first_last_mean"] = [alphas[0], alphas[-1], sum(alphas) / len(alphas)]
    if any("teacher_weights" in h for h in history):
        weights = [h["teacher_weights"] for h in history if "teacher_weights" in h]
        entry["teacher_weights_mean"] = [sum(w[k] for w in weights) / len(weights) for k in range(len(weights[0]))]
    return entry


BASE_OVERRIDES: list[str] = []  # set in main: the overrides every row shares (listed once in the JSON)


SCORES = ("retention", "top1_agreement", "kl_teacher_student")


def earlier_entries(path: Path, base_overrides: list[str], reference: str) -> dict[str, list[dict]]:
    """The per-seed entries of an earlier result at `path` that this run can stand beside: the same overrides shared
    by every row (steps, evaluation, the user's) and measured against the same reference (a table never mixes rows
    against the teacher as given with rows against the corrected one). Row name -> entries; {} when there is none."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get("base_overrides") != base_overrides:
        return {}
    out = {}
    for name, r in old.get("rows", {}).items():
        if r.get("reference", "original") != reference:
            continue
        shared = {k: v for k, v in r.items() if k not in ("per_seed", "n_seeds") and not k.endswith("_range")}
        out[name] = [{**shared, **p} for p in r.get("per_seed", [])]
    return out


def merge_entries(earlier: dict[str, list[dict]], measured: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Earlier entries with this run's: a (row, seed) measured now replaces the earlier one; seeds sorted."""
    merged = {}
    for name in {**earlier, **measured}:
        by_seed = {e["seed"]: e for e in earlier.get(name, [])}
        by_seed.update({e["seed"]: e for e in measured.get(name, [])})
        merged[name] = [by_seed[s] for s in sorted(by_seed)]
    return merged


def ordered(rows: dict) -> dict:
    """Rows in ROWS order (the table's), whatever order they were measured in."""
    rank = {r.name: i for i, r in enumerate(ROWS)}
    return dict(sorted(rows.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def aggregate(entries: list[dict]) -> dict:
    """One row of the result from its per-seed entries: the scores' mean (and min/max across seeds), the seeds kept."""
    row = {k: v for k, v in entries[0].items() if k not in (*SCORES, "seed", "environment", "run_dir", "out_of_domain")}
    for key in (*SCORES, "train_s"):
        values = [e[key] for e in entries]
        row[key] = sum(values) / len(values)
        row[f"{key}_range"] = [min(values), max(values)]
    ood = [e.get("out_of_domain") or {} for e in entries]
    if all(o.get("retention") is not None for o in ood):  # the mean over seeds, when every seed measured it
        row["out_of_domain"] = {"source": ood[0].get("source"),
                                **{k: sum(o[k] for o in ood) / len(ood) for k in SCORES}}
    row["n_seeds"] = len(entries)
    row["per_seed"] = [{k: e.get(k) for k in ("seed", *SCORES, "out_of_domain", "train_s", "run_dir", "environment")}
                       for e in entries]
    return row


def versus(per_seed: dict[str, list[dict]], base: str) -> dict:
    """Each row against `base`, paired by seed: the mean difference of each score and on how many seeds the row was
    better. A difference is `claimed` only when the row is better (or worse) on every one of >= 3 shared seeds."""
    if base not in per_seed:
        return {}
    base_by_seed = {e["seed"]: e for e in per_seed[base]}
    out = {}
    for name, entries in per_seed.items():
        pairs = [(e, base_by_seed[e["seed"]]) for e in entries if e["seed"] in base_by_seed]
        if name == base or not pairs or entries[0].get("same_run_as") == base:
            continue
        row = {"seeds": len(pairs)}
        for key in SCORES:
            sign = -1 if key == "kl_teacher_student" else 1  # lower KL is better
            diffs = [sign * (e[key] - b[key]) for e, b in pairs]
            better = sum(d > 0 for d in diffs)
            row[key] = {"mean_gain": sum(diffs) / len(diffs), "better_on": better,
                        "claimed": ("better" if better == len(pairs) else "worse" if better == 0 and all(diffs) else None)
                        if len(pairs) >= 3 else None}
        out[name] = row
    return out


# --- the README table ---------------------------------------------------------------------------------------

def _score(r: dict, key: str) -> str:
    """The mean, and across seeds its range: '0.512 (0.50–0.52)'."""
    lo, hi = r.get(f"{key}_range") or (r[key], r[key])
    return f"{r[key]:.3f}" + (f" ({lo:.3f}–{hi:.3f})" if r.get("n_seeds", 1) > 1 else "")


def _ood_source(rows: dict) -> str:
    sources = {(r.get("out_of_domain") or {}).get("source") for r in rows.values()} - {None}
    return ", ".join(sorted(sources)) or "general English (not measured in these rows)"


def methods_table(result: dict) -> str:
    """Markdown table of a distill_methods result, one row per config: a row that is the same run as another (same
    config) names it instead of repeating its numbers. Scores are means across seeds (range in brackets); a row is
    called better or worse than forward KL only when it is so on every one of >= 3 seeds."""
    rows = result["rows"]
    seeds = result.get("seeds", [0])
    groups = {"loss": "divergence", "features": "feature transfer", "kd_weight": "KD weight",
              "multi_teacher": "teachers"}
    lines = ["| | method | retention | top-1 agreement | KL(teacher ‖ student) | out-of-domain retention / top-1 "
             "| vs forward KL (KL, by seed) | train s | commit |",
             "|---|---|---:|---:|---:|---:|---|---:|---|"]
    vs = result.get("versus_forward_kl", {})
    for group, title in groups.items():
        members = {n: r for n, r in rows.items() if r["group"] == group}
        if not members:
            continue
        if group == "features" and "forward_kl" in rows:
            members = {"forward_kl": {**rows["forward_kl"], "same_run_as": "forward_kl"}, **members}  # the base
        for i, (name, r) in enumerate(members.items()):
            same = r.get("same_run_as")
            if same and same in rows:
                lines.append(f"| {title if i == 0 else ''} | {r['label']} | the {rows[same]['label']} run above (same "
                             "config) | | | | | | |")
                continue
            envs = [p.get("environment") or result.get("environment") or {} for p in r.get("per_seed", [r])]
            commits = ", ".join(sorted({(e.get("git_commit") or "?")[:7] for e in envs}))
            v = (vs.get(name) or {}).get("kl_teacher_student")
            verdict = ""
            if v:
                verdict = (f"{v['claimed']}: " if v["claimed"] else "no claim: ") + f"lower on {v['better_on']}/{vs[name]['seeds']}"
            ood = r.get("out_of_domain") or {}
            ood_text = f"{ood['retention']:.3f} / {ood['top1_agreement']:.3f}" if ood.get("retention") is not None else "—"
            lines.append(f"| {title if i == 0 else ''} | {r['label']} | {_score(r, 'retention')} | {_score(r, 'top1_agreement')} "
                         f"| {_score(r, 'kl_teacher_student')} | {ood_text} | {verdict} | {r['train_s']:.0f} | {commits} |")
    notes = []
    w = rows.get("multi_agreement", {}).get("teacher_weights_mean")
    if w:
        names = ", ".join(f"{n} {x:.2f}" for n, x in zip(("SmolLM2", "Q2_K copy", "corrupted copy"), w))
        notes.append(f"Mean agreement weight per teacher (1/K = 0.33): {names}.")
    refs = {r.get("reference", "original") for r in rows.values()}
    if len(seeds) >= 3:
        notes.append(f"{len(seeds)} seeds per row (distill.seed {', '.join(map(str, seeds))}: the order of the training "
                     "batches; same student, teacher and data). A row is called better or worse than forward KL only when "
                     "its KL is lower (higher) on every seed, paired by seed.")
    else:
        notes.append(f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} per row: differences between rows are not claims "
                     "(a claim needs ≥ 3 seeds).")
    envs = [p.get("environment") or result.get("environment") or {} for r in rows.values() for p in r.get("per_seed", [r])]
    dates = sorted(e["date"][:10] for e in envs if e.get("date"))
    cpus = ", ".join(sorted({e.get("cpu_model") or "?" for e in envs}))
    loads = [e["load_average_before"][0] for e in envs if isinstance(e.get("load_average_before"), list)]
    notes.append(f"Each row: {result['steps']} steps × {result['tokens_per_step']} tokens of {result['corpus']}, "
                 f"{result['student_layers']}-layer sliced student of {result['teacher']}; retention = reference ppl ÷ "
                 f"student ppl on {result['held_out']}, never trained on; out of domain: the same on "
                 f"{_ood_source(rows)}, which nothing here trains on; every row is measured against "
                 f"{'the corrected teacher' if refs == {'corrected'} else 'the teacher as given' if refs == {'original'} else 'its own reference (' + ', '.join(sorted(refs)) + ')'}. "
                 f"Measured {dates[0] if dates else '?'}{f' to {dates[-1]}' if dates and dates[-1] != dates[0] else ''} "
                 f"on {cpus}, 2 threads" + (f", 1-min load at each row's start {min(loads):.1f}–{max(loads):.1f}" if loads else "")
                 + f"; each row names its commit; by `{result.get('command', 'benchmarks/distill_methods.py')}` → "
                 f"`benchmarks/results/{result.get('benchmark', 'distill_methods')}.json`.")
    missing = [r.label for r in ROWS if r.name in result.get("not_measured", [])]
    if missing:
        notes.append(f"Not yet measured against this reference: {'; '.join(missing)}.")
    return "\n".join(lines + [""] + notes)


# --- main --------------------------------------------------------------------------------------------------

def main() -> None:
    global BASE_OVERRIDES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="distillation steps per row (default 100; --quick: 3)")
    ap.add_argument("--quick", action="store_true", help="tiny settings, a smoke run of every row")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--seeds", default="0", help="comma-separated distill.seed values, each row run once per seed "
                                                  "(default 0; a difference is claimed only across >= 3)")
    ap.add_argument("--out", default=None, help="folder of the row runs (default runs/bench/methods[-quick])")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every row")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from _common import EVAL_LIGHT, RESULTS, write_result

    from edgestill.config import load_config

    steps = args.steps or (3 if args.quick else 100)
    out_root = Path(args.out or ("runs/bench/methods-quick" if args.quick else "runs/bench/methods"))
    BASE_OVERRIDES = [*(QUICK if args.quick else []), *EVAL_LIGHT, f"distill.steps={steps}", *args.overrides]
    base = load_config(overrides=BASE_OVERRIDES)
    asked = [n for n in args.rows.split(",") if n]
    # rows run in the order asked (the table keeps ROWS' order), so the ones that matter most can go first
    wanted = [r for n in asked for r in ROWS if r.name == n] if asked else list(ROWS)
    unknown = set(filter(None, args.rows.split(","))) - {r.name for r in ROWS}
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; choose from {', '.join(r.name for r in ROWS)}")

    real = base.teacher.model
    copies = {}
    if any(r.teachers != "real" for r in wanted):
        copies = make_teachers(out_root / "_teachers", real, NOISE_STD)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"--seeds takes comma-separated integers, e.g. 0,1,2 (got {args.seeds!r})")
    ref_kind = "corrected" if base.teacher.correction() is not None else "original"
    result_name = "distill_methods_quick" if args.quick else "distill_methods"
    earlier = earlier_entries(RESULTS / f"{result_name}.json", BASE_OVERRIDES, ref_kind)  # kept unless measured again below
    per_seed: dict[str, list[dict]] = {}
    path = None
    for seed, row in [(seed, row) for seed in seeds for row in wanted]:  # seed-major: every row of seed 0 comes first
        name = SAME_AS.get(row.name, row.name)
        source = next(r for r in ROWS if r.name == name)
        teacher_overrides = []
        if source.teachers == "multi":
            teacher_overrides = [f"teacher.extra=[{copies['q2k']}, {copies['noisy']}]"]
        elif source.teachers in ("q2k", "noisy"):
            forward_kl = run_row(ROWS[1], BASE_OVERRIDES, [], out_root)  # seed 0: its slice is every row's start
            ref_metrics = json.loads((Path(forward_kl["run_dir"]) / "metrics.json").read_text())
            layers = ref_metrics["student"]["layers_kept"]
            # sliced from what forward KL sliced from: the corrected teacher (teacher.correct), else the teacher as given
            sliced_from = (ref_metrics["teacher"].get("correction") or {}).get("path") or real
            init = make_student_init(out_root / "_teachers" / f"student-init-{ref_kind}", sliced_from, layers)
            # the degraded copy teaches as it is (a correction would repair it); the student is still measured
            # against the real teacher, corrected as in every other row
            teacher_overrides = [f"teacher.model={copies[source.teachers]}", f"student.model={init}", "teacher.correct=false"]
        log.info("=== row %s (%s), seed %d", row.name, source.label, seed)
        entry = run_row(source, [*BASE_OVERRIDES, *teacher_overrides, *source.overrides],
                        [f"teacher.model={real}", f"teacher.correct={str(base.teacher.correct).lower()}"]
                        if source.teachers in ("q2k", "noisy") else [],
                        out_root, seed)
        per_seed.setdefault(row.name, []).append(
            {**entry, "label": row.label, "group": row.group, "same_run_as": name if name != row.name else None})
        # Written after every row, so a run stopped part-way (or a machine lost) keeps what it measured.
        merged = merge_entries(earlier, per_seed)
        path = write_result(result_name, {
            "what": "distillation methods on one teacher, corpus, student shape and token budget; held-out retention",
            "command": " ".join(["python", "benchmarks/distill_methods.py", *sys.argv[1:]]),
            "teacher": real, "corpus": base.data.path, "student_layers": base.student.num_layers,
            "held_out": "the test split (by play)", "steps": steps,
            "seeds": sorted({e["seed"] for entries in merged.values() for e in entries}),
            "tokens_per_step": base.distill.batch_size * base.data.seq_len, "base_overrides": BASE_OVERRIDES,
            "extra_teachers": {"q2k": "llama.cpp Q2_K of an f32 GGUF export of the teacher",
                               "noisy": f"the teacher with Gaussian noise of {NOISE_STD} x std added to every decoder matrix"},
            "rows": {n: aggregate(entries) for n, entries in ordered(merged).items()},
            "versus_forward_kl": versus(merged, "forward_kl"),
            "not_measured": [r.name for r in ROWS if r.name not in merged],
        })
    if path is not None:
        print(methods_table(json.loads(path.read_text())))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
