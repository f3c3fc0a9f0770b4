"""Recovery curves: how fidelity to the corrected teacher grows with training tokens, for several student depths.

    python benchmarks/recovery_curve.py                          # 22, 15 and 10 of 30 layers, 300 steps each (~1.5-2 h on 2 cores)
    python benchmarks/recovery_curve.py --layers 15 --steps 600  # one size, a longer budget
    python benchmarks/recovery_curve.py --quick                  # smoke run on tiny settings (minutes)
-> benchmarks/results/recovery_curve.json, docs/img/recovery_curve.png

Each size is one ordinary `edgestill shrink` run (runs/bench/recovery/<L>L) of a float student sliced from the
corrected teacher, trained for `--steps` steps on fresh text: data.max_train_tokens is raised to the tokens the
run trains on, so no token is seen twice. The run evaluates every `--eval-every` steps (and at step 0, the student
as cut) on the validation split: KL(reference ‖ student), top-1 agreement and the student's CE, from which
validation retention = exp(reference CE − student CE). Those evaluations are the curve. The held-out test split
and the out-of-domain text are scored once, at the end, by the run's own evaluation.

The points of a curve come from one run whose cosine schedule spans the whole budget: a run stopped at step s with
its own schedule would anneal sooner and do a little better there, so the curve is a lower bound on what s steps
buy. Sizes share one teacher top-k cache (built once, by the first). A killed run resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import EVAL_LIGHT, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["data.seq_len=64", "data.max_eval_tokens=512", "data.max_val_tokens=256", "distill.batch_size=2",
         "distill.checkpoint_every=2", "distill.warmup_steps=1", "eval.batch_size=4", "eval.speed_prompt_tokens=16",
         "eval.speed_decode_tokens=4", "eval.prompts=[\"To be\"]", "eval.out_of_domain_tokens=512",
         "eval.zero_shot_passages=8", "eval.chat_tokens=8", "teacher.correct_steps=4", "teacher.correct_eval_every=2"]


def curve_points(run: Path, reference_val_ce: float) -> list[dict]:
    """(training tokens, validation KL / top-1 / retention) at step 0 and at every evaluation of `run`."""
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    tokens_per_step = cfg["distill"]["batch_size"] * cfg["data"]["seq_len"]
    selection = json.loads((run / "selection.json").read_text())
    evaluated = [selection["start"]] + [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()
                                        if line.strip() and "kl_teacher_student" in json.loads(line)]
    return [{"step": e["step"], "train_tokens": e["step"] * tokens_per_step, "kl_teacher_student": e["kl_teacher_student"],
             "top1_agreement": e["top1_agreement"], "val_loss": e["val_loss"],
             "retention": math.exp(reference_val_ce - e["val_loss"])} for e in evaluated]


def training_speed(run: Path) -> float:
    """The median training tokens/s the run logged (steps after a resume included)."""
    import statistics

    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median(h["tokens_per_s"] for h in log)


def plot(path: Path, sizes: list[dict], reference_layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgestill.evaluate.report import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for s in sizes:
        tokens = [p["train_tokens"] / 1e3 for p in s["curve"]]
        label = f"{s['layers']} of {reference_layers} layers"
        for ax, key in zip(axes, ("kl_teacher_student", "top1_agreement", "retention")):
            ax.plot(tokens, [p[key] for p in s["curve"]], "o-", ms=3, label=label)
    for ax, title in zip(axes, ("KL(reference ‖ student), lower is better", "top-1 agreement", "validation retention")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training tokens (thousands)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[1].axhline(0.9, color="gray", ls=":", lw=1)
    axes[2].axhline(0.95, color="gray", ls=":", lw=1)
    axes[0].legend(fontsize=8)
    fig.suptitle("Recovery: fidelity to the corrected teacher against training tokens (validation split)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default=None, help="student depths, comma-separated (default 22,15,10; --quick: 4,2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per size (default 300; --quick: 6)")
    ap.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 25; --quick: 2)")
    ap.add_argument("--quick", action="store_true", help="tiny random teacher and settings: a smoke run")
    ap.add_argument("--out", default=None, help="folder of the runs (default runs/bench/recovery[-quick])")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every size")
    args = ap.parse_args()

    from edgestill.config import load_config
    from edgestill.data.corpus import corpus_blocks
    from edgestill.distill.trainer import validation_loss
    from edgestill.errors import EdgestillError
    from edgestill.jobs.shrink import reference_teacher, shrink
    from edgestill.models.load import load_causal_lm

    try:
        layers = [int(x) for x in (args.layers or ("4,2" if args.quick else "22,15,10")).split(",") if x.strip()]
    except ValueError:
        sys.exit(f"--layers takes comma-separated integers, e.g. 22,15,10 (got {args.layers!r})")
    steps = args.steps or (6 if args.quick else 300)
    eval_every = args.eval_every or (2 if args.quick else 25)
    out_root = ROOT / (args.out or ("runs/bench/recovery-quick" if args.quick else "runs/bench/recovery"))
    base = [*(QUICK if args.quick else []), *EVAL_LIGHT, f"distill.steps={steps}", f"distill.eval_every={eval_every}",
            *args.overrides]
    probe = load_config(overrides=base)
    train_tokens = steps * probe.distill.batch_size * probe.data.seq_len
    base.append(f"data.max_train_tokens={max(train_tokens, probe.data.max_train_tokens)}")  # one pass: no token twice

    sizes, first = [], None
    for n in layers:
        cfg = load_config(overrides=[*base, f"student.num_layers={n}", f"output.dir={out_root / f'{n}L'}"])
        run = Path(cfg.output.dir)
        if not (run / "DONE").is_file():
            print(f"=== {n} layers: {steps} steps x {probe.distill.batch_size * probe.data.seq_len} tokens", flush=True)
            try:
                run, _ = shrink(cfg, teacher_cache_from=first)  # a killed run resumes from OUT.partial
            except EdgestillError as e:
                sys.exit(f"{n} layers: {e}")
        first = first or run
        metrics = json.loads((run / "metrics.json").read_text())
        sizes.append({"layers": n, "run_dir": str(run.relative_to(ROOT)), "metrics": metrics})

    cfg = load_config(overrides=base)
    original = load_causal_lm(cfg.teacher.model)
    data = corpus_blocks(cfg.data, original.tokenizer)
    reference = reference_teacher(cfg, original, data)
    reference_val_ce = validation_loss(reference.model, data.val)
    reference_layers = reference.model.config.num_hidden_layers
    rows = []
    for s in sizes:
        m = s.pop("metrics")
        ood = m.get("out_of_domain") or {}
        rows.append({**s, "curve": curve_points(ROOT / s["run_dir"], reference_val_ce),
                     "train_tokens": train_tokens, "student_params": m["student"]["params"],
                     "reference": "corrected" if (m["teacher"].get("correction")) else "original",
                     "compression_x_fp16": m["compression_x_fp16"],
                     "test": {k: m[k] for k in ("retention", "top1_agreement", "kl_teacher_student")},
                     "out_of_domain": {k: ood.get(k) for k in ("retention", "top1_agreement", "kl_teacher_student")},
                     "selection": m["train"].get("selection"),
                     "train_tokens_per_s": training_speed(ROOT / s["run_dir"]), "environment": m.get("environment")})
    name = "recovery_curve_quick" if args.quick else "recovery_curve"
    png = ROOT / "docs" / "img" / f"{name}.png"
    plot(png, rows, reference_layers)
    write_result(name, {
        "what": "validation fidelity to the reference against training tokens, one run per student depth",
        "command": " ".join(["python", "benchmarks/recovery_curve.py", *sys.argv[1:]]),
        "teacher": cfg.teacher.model, "corpus": cfg.data.path, "steps": steps, "eval_every": eval_every,
        "tokens_per_step": probe.distill.batch_size * probe.data.seq_len, "reference_val_ce": reference_val_ce,
        "reference_layers": reference_layers, "plot": str(png.relative_to(ROOT)), "sizes": rows,
    })


if __name__ == "__main__":
    main()
