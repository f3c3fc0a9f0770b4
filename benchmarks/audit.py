"""Does a planted backdoor survive distillation? The classifier track's audit benchmark (issue 17; LBKD,
docs/references.md [2]).

Per seed: a teacher (all-MiniLM-L6-v2) fine-tuned on the data with a planted trigger (`poison.*`, dirty-label by
default: 10% of the rows not of the target label get the trigger and the target label), then students distilled
from it in each setting x defence, and `edgestill audit` on each student:

    settings   clean      the transfer data is the clean training split
               triggered  the transfer data carries the trigger too (the same planting as the teacher's)
    defences   none       KD on the transfer texts as they are (kd.augment=0)
               perturb    KD on the texts plus 4 perturbed copies of each (masking, word substitution, n-gram
                          sampling: distill/augment.py), labelled by the teacher's logits only
               fine-prune KD as `none`, then fine-pruning: 30% of each layer's FFN units, the least active on the
                          clean validation texts, cut out, then 200 steps of fine-tuning on those texts
                          (models/encoder_prune.py; [fine-pruning] in docs/references.md)
               onion      KD as `none` on transfer texts filtered ONION-style (audit/onion.py; [onion] in
                          docs/references.md): a character LM's per-character score, threshold set to remove 3% of
                          the words of clean validation texts
               scrub      KD as `none` on transfer texts scrubbed of what the teacher's trigger scan flags
                          (audit/scrub.py): the transfer data's 60 most one-sided phrases inserted into 32 clean
                          validation texts per label; each that flips at least 50% more of them than random words do
                          is cut out of every transfer text
    federated  LBKD's setting (`edgestill federate`, on Flower): 5 clients, one of them malicious (the trigger planted
               in half of its own spam rows: --fed-rate), exchange logits with a server student on a public transfer set (30%
               of the training split, 10% of it carrying the trigger) for 3 rounds, both ways. "teacher" is the
               malicious client, "student" the server. The defence is how the server aggregates the clients'
               logits: mean (none), median, trimmed_mean (one client dropped at each end), agreement (MTAKD)

Per row, over the seeds (mean and std): the planted trigger's attack success rate (ASR) in teacher and student,
their clean test accuracy, the ratio student ASR / teacher ASR, and the trigger's rank in the audit's scan of the
teacher and of the student (1 = first). Every student is also measured behind an ONION-style filter of its test
inputs (`edgestill audit --onion 0.03`: a defence at inference that retrains nothing): its ASR and clean accuracy.
The decoder track is benchmarks/audit_lm.py; both write their track into benchmarks/results/audit.json.

    python benchmarks/audit.py                      # spamassassin, seeds 0,1,2 (hours on 2 cores)
    python benchmarks/audit.py --quick              # smoke run, minutes: tiny steps -> audit_quick.json (track classifier)

Rows are measured in the table's order, every seed of a row before the next row (a teacher per seed, trained once and
reused), so a run stopped part-way leaves the first rows with all their seeds rather than all the rows of one seed.
The JSON is rewritten after every finished row (`complete`, `pending`), and every finished run folder is reused, so
a killed benchmark loses nothing and the same command continues it. A row already in the JSON for the same recipe
(data, poison, size, schedule, defences) is kept as it is, with the commit and machine that measured it, so the
benchmark also continues on a machine whose run folders are gone; `--fresh` measures every row again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, mean_std, recorded_runs, track_view, write_track  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("clean", "triggered", "federated")
DEFENCES = {"none": {"kd.augment": 0}, "perturb": {"kd.augment": 4},
            "fine-prune": {"kd.augment": 0, "fine_prune.fraction": 0.3, "fine_prune.steps": 200},
            "onion": {"kd.augment": 0, "onion.remove_share": 0.03, "onion.score": "per_char"},
            "scrub": {"kd.augment": 0, "scrub.lift": 0.5}}
AGGREGATIONS = {"none": "mean", "median": "median", "trimmed-mean": "trimmed_mean", "agreement": "agreement"}
INPUT_FILTER_SHARE = 0.03  # every student is also measured behind an ONION-style filter of its inputs (at inference)
# the comparisons that matter first: inheritance without a defence, then each defence where the trigger is in the data
ORDER = [("clean", "none"), ("triggered", "none"), ("triggered", "onion"), ("triggered", "scrub"), ("federated", "none"),
         ("triggered", "fine-prune"), ("triggered", "perturb"), ("federated", "median"), ("federated", "agreement"),
         ("federated", "trimmed-mean"), ("clean", "fine-prune"), ("clean", "perturb"), ("clean", "onion")]
FULL = {"max_len": 128, "teacher_steps": 1500, "teacher_eval_every": 50, "teacher_patience": 4, "student_steps": 3000,
        "student_eval_every": 250, "student_patience": 3, "audit_texts": 48, "candidates": 60,
        "clients": 5, "client_layers": 2, "rounds": 3, "client_steps": 100, "client_eval_every": 50, "server_steps": 300,
        "server_eval_every": 100, "public_poison": 0.1}
QUICK = {"max_len": 32, "teacher_steps": 8, "teacher_eval_every": 4, "teacher_patience": 0, "student_steps": 8,
         "student_eval_every": 4, "student_patience": 0, "audit_texts": 8, "candidates": 10,
         "clients": 3, "client_layers": 1, "rounds": 2, "client_steps": 4, "client_eval_every": 2, "server_steps": 4,
         "server_eval_every": 2, "public_poison": 0.1}


def poison_values(args, seed: int) -> dict:
    return {"poison.trigger": args.trigger, "poison.target": args.target, "poison.rate": args.rate,
            "poison.mode": args.mode, "poison.seed": seed}


def teacher(args, s: dict, seed: int) -> Path:
    from edgestill.config import load_classifier_config
    from edgestill.jobs.classify import finetune

    out = Path(args.root) / f"seed{seed}" / "teacher"
    if (out / "DONE").is_file():
        return out
    cfg = load_classifier_config("finetune", values={
        "data.path": args.data, "data.seed": 0, "train.steps": s["teacher_steps"], "train.lr": 1e-4,
        "train.batch_size": 16, "train.max_len": s["max_len"], "train.eval_every": s["teacher_eval_every"],
        "train.patience": s["teacher_patience"], "train.seed": seed, "output_dir": str(out), **poison_values(args, seed)})
    finetune(cfg)
    return out


def student(args, s: dict, seed: int, teacher_dir: Path, setting: str, defence: str) -> Path:
    from edgestill.config import load_classifier_config
    from edgestill.jobs.classify import shrink_classifier

    out = Path(args.root) / f"seed{seed}" / f"{setting}-{defence}"
    if (out / "DONE").is_file():
        return out
    values = {"teacher": str(teacher_dir), "student.max_len": s["max_len"], "student.num_layers": 2,
              "student.compression_x": args.size, "train.steps": s["student_steps"], "train.lr": 1e-3,
              "train.batch_size": 32, "train.eval_every": s["student_eval_every"], "train.patience": s["student_patience"],
              "train.seed": seed, "kd.temperature": 2.0, "kd.alpha": 0.7, **DEFENCES[defence],
              "eval.teacher_latency": False, "eval.tfidf_baseline": False, "eval.curve_types": [],
              "eval.latency_examples": 4, "eval.latency_repeats": 1, "output_dir": str(out)}
    if setting == "triggered":
        values.update(poison_values(args, seed))
    shrink_classifier(load_classifier_config("shrink", values=values))
    return out


def federated(args, s: dict, seed: int, defence: str) -> Path:
    """LBKD's setting on Flower: the malicious client is the "teacher", the server the "student"."""
    from edgestill.config import load_federated_config
    from edgestill.jobs.federate import federate

    out = Path(args.root) / f"seed{seed}" / f"federated-{defence}"
    if (out / "DONE").is_file():
        return out
    values = {"data.path": args.data, "federated.clients": s["clients"], "federated.malicious": 1,
              "federated.rounds": s["rounds"], "federated.public_poison": s["public_poison"],
              "federated.aggregation": AGGREGATIONS[defence], "federated.client_layers": s["client_layers"],
              "federated.cpus": args.threads, "client.steps": s["client_steps"], "client.eval_every": s["client_eval_every"],
              "client.lr": 1e-4, "client.batch_size": 16, "client.max_len": s["max_len"], "client.seed": seed,
              "server.steps": s["server_steps"], "server.eval_every": s["server_eval_every"], "server.lr": 1e-3,
              "server.batch_size": 32, "server.seed": seed, "student.max_len": s["max_len"], "student.num_layers": 2,
              "student.compression_x": args.size, **{**poison_values(args, seed), "poison.rate": args.fed_rate},
              "output_dir": str(out)}
    federate(load_federated_config(values=values))
    return out


def audited(args, s: dict, run: Path, start: dict | None = None) -> dict:
    from edgestill.evaluate.environment import environment
    from edgestill.jobs.audit import AuditConfig, audit

    cfg = AuditConfig(n_texts=s["audit_texts"], candidates=s["candidates"], threads=args.threads,
                      onion_share=INPUT_FILTER_SHARE)
    done = json.loads((run / "audit.json").read_text()) if (run / "audit.json").is_file() else None
    same = done is not None and {k: v for k, v in done["config"].items() if k != "threads"} == {
        k: v for k, v in vars(cfg).items() if k != "threads"}
    result = done if same else audit(run, cfg)[1]  # a finished row's audit is reused when a killed benchmark resumes
    metrics = json.loads((run / "metrics.json").read_text())
    onion, scrub = metrics.get("onion"), metrics.get("scrub")
    planted = next(t for t in result["triggers"] if t["phrase"] == " ".join(args.trigger.lower().split()))
    fed = metrics.get("summary") if metrics.get("stage") == "federated" else None
    return {"teacher_asr": planted["teacher_asr"], "student_asr": planted["student_asr"],
            "teacher_clean": result["clean_accuracy"]["teacher"], "student_clean": result["clean_accuracy"]["student"],
            "trigger_rank": planted["rank"], "verdict": planted["verdict"], "asr_n": planted["n"],
            "onion": None if onion is None else {"removed_share": onion["removed_share"], **(onion["trigger"] or {})},
            "scrub": None if scrub is None else {"cut": [[f["phrase"], f["lift"]] for f in scrub["flagged"]],
                                                 "best_uncut": None if scrub["best_uncut"] is None else [
                                                     scrub["best_uncut"]["phrase"], scrub["best_uncut"]["lift"]],
                                                 "texts_touched": scrub["texts_touched"], **(scrub["trigger"] or {})},
            "student_asr_filtered_inputs": result["onion_inputs"]["student_asr"].get(planted["phrase"]),
            "student_clean_filtered_inputs": result["onion_inputs"]["clean_accuracy"],
            "federated": None if fed is None else {
                "honest_clients_asr": fed["honest_clients_asr"], "honest_clients_accuracy": fed["honest_clients_accuracy"],
                "malicious_share_last_round": metrics["rounds"][-1]["client_share"][0],
                "server_asr_per_round": [r["server"]["asr"] for r in metrics["rounds"]]},
            "environment": environment(args.threads, start=start)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="spamassassin")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trigger", default="cf mn", help="the planted phrase (default 'cf mn')")
    ap.add_argument("--target", default="ham", help="the label it forces (default ham: spam passes as ham)")
    ap.add_argument("--rate", type=float, default=0.1,
                    help="of the eligible training rows (default 0.1: at 0.01, 13 rows, the early-stopped teacher did "
                         "not learn the trigger, ASR 0.3%%)")
    ap.add_argument("--fed-rate", type=float, default=0.5,
                    help="federated: of the malicious client's eligible rows (default 0.5: at 0.1, 18 rows, its 2-layer "
                         "model ended with ASR 1.8%%, the trigger not learned)")
    ap.add_argument("--mode", default="dirty", choices=("dirty", "clean"))
    ap.add_argument("--size", type=float, default=25.0, help="student size, x smaller than the teacher (default 25)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", default=None, help="run folders (default runs/bench/audit[-quick])")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny steps -> audit_quick.json")
    ap.add_argument("--fresh", action="store_true", help="measure every row again, even those already in the JSON")
    args = ap.parse_args()
    import logging

    import torch

    from edgestill.evaluate.environment import measurement_start

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    args.root = args.root or str(ROOT / "runs" / "bench" / ("audit-quick" if args.quick else "audit"))
    seeds = [int(x) for x in args.seeds.split(",")]
    per_seed: dict[tuple[str, str], list[dict]] = {}
    pending = [(seed, setting, defence) for setting, defence in ORDER for seed in seeds]  # a row's seeds together
    t0 = time.perf_counter()
    kept = {} if args.fresh else kept_runs(args, s)
    for seed, setting, defence in list(pending):  # all kept rows first: a JSON written mid-run never loses any
        if (seed, setting, defence) in kept:  # measured before, by the commit its row names
            per_seed.setdefault((setting, defence), []).append(kept[(seed, setting, defence)])
            pending.remove((seed, setting, defence))
            print(f"seed {seed} {setting:9s} {defence:10s}: kept from the JSON", flush=True)
    for seed, setting, defence in list(pending):
        start = measurement_start()  # the row's date and load average before its training, not at its audit
        if setting == "federated":
            run = federated(args, s, seed, defence)
        else:
            run = student(args, s, seed, teacher(args, s, seed), setting, defence)
        row = audited(args, s, run, start)
        per_seed.setdefault((setting, defence), []).append({"seed": seed, **row})
        pending.remove((seed, setting, defence))
        print(f"seed {seed} {setting:9s} {defence:10s}: teacher ASR {row['teacher_asr']}, student ASR "
              f"{row['student_asr']}, clean {row['teacher_clean']:.3f} / {row['student_clean']:.3f}, rank "
              f"{row['trigger_rank']}: {row['verdict']}", flush=True)
        write(args, s, per_seed, pending, t0)  # after every row: a long run's finished rows are never lost


def result_name(args) -> str:
    return "audit_quick" if args.quick else "audit"


def recipe(args, s: dict) -> dict:
    """What makes two runs of this benchmark measure the same thing. The defences' settings are compared row by row
    (kept_runs): a defence added later keeps the rows of the others."""
    return {"data": args.data, "poison": {"trigger": args.trigger, "target": args.target, "rate": args.rate,
                                          "mode": args.mode, "federated_rate": args.fed_rate},
            "student_size_x": args.size, "schedule": s, "federated_aggregations": AGGREGATIONS,
            "input_filter_share": INPUT_FILTER_SHARE}


def kept_runs(args, s: dict) -> dict:
    """(seed, setting, defence) -> each run the JSON already holds for this recipe, where the defence's settings then
    were the same as now (a federated row's defence is its aggregation, in the recipe)."""
    path = RESULTS / f"{result_name(args)}.json"
    kept = recorded_runs(path, recipe(args, s), lambda row, run: (run["seed"], row["setting"], row["defence"] or "none"),
                         track="classifier")
    if not kept:
        return {}
    recorded = track_view(json.loads(path.read_text()), "classifier").get("defences") or {}
    return {k: run for k, run in kept.items() if k[1] == "federated" or recorded.get(k[2]) == DEFENCES.get(k[2])}


def write(args, s: dict, per_seed: dict, pending: list, t0: float) -> None:
    rows = []
    for (setting, defence), runs in sorted(per_seed.items(), key=lambda kv: ORDER.index(kv[0])):  # the table's order
        runs = sorted(runs, key=lambda r: r["seed"])  # a row measured again for one seed joins the others in order
        row = {"setting": setting, "defence": None if defence == "none" else defence, "seeds": [r["seed"] for r in runs]}
        for key in ("teacher_asr", "student_asr", "teacher_clean", "student_clean", "student_asr_filtered_inputs",
                    "student_clean_filtered_inputs"):
            row[key], row[f"{key}_std"] = mean_std([r[key] for r in runs])
        ratios = [r["student_asr"] / r["teacher_asr"] for r in runs if r["teacher_asr"] and r["student_asr"] is not None]
        row["ratio"], row["ratio_std"] = mean_std(ratios)
        row["trigger_rank"] = {who: [r["trigger_rank"][who] for r in runs] for who in ("teacher", "student")}
        row["verdicts"] = [r["verdict"] for r in runs]
        row["onion"] = [r["onion"] for r in runs] if any(r.get("onion") for r in runs) else None
        row["scrub"] = [r["scrub"] for r in runs] if any(r.get("scrub") for r in runs) else None
        if setting == "federated":
            row["honest_clients_asr"], row["honest_clients_asr_std"] = mean_std(
                [r["federated"]["honest_clients_asr"] for r in runs])
            row["malicious_share"], row["malicious_share_std"] = mean_std(
                [r["federated"]["malicious_share_last_round"] for r in runs])
        row["per_seed"] = runs
        rows.append(row)
    write_track(result_name(args), "classifier", {
        "command": "python benchmarks/audit.py " + " ".join(sys.argv[1:]),
        "what": __doc__.split("\n\n")[0],
        **recipe(args, s), "defences": DEFENCES, "settings": list(SETTINGS), "order": [list(o) for o in ORDER],
        "rows": rows, "complete": not pending, "pending": [list(p) for p in pending],
        "wall_s": time.perf_counter() - t0,
    })


if __name__ == "__main__":
    main()
