"""`edgestill federate`: federated bidirectional distillation on Flower, with planted backdoors to audit (LBKD's
setting, [2] in docs/references.md; docs/audit.md).

    edgestill federate --data spamassassin --out runs/fed federated.aggregation=median \\
        poison.trigger="cf mn" poison.target=ham poison.rate=0.1

1. The training split is divided: `federated.public_share` of it becomes the public transfer set (its labels
   dropped), the rest is dealt to `federated.clients` clients (stratified). Clients 0 .. malicious-1 plant `poison`
   in their own rows; with `federated.public_poison` > 0 that share of the public texts carries the trigger too (an
   attacker placed them there). Validation and test stay clean and are shared by all parties for model selection
   and scoring.
2. Rounds on Flower's simulation engine (federated/flower.py): each client trains on its rows and, from round 2, learns
   from the server's logits on the public texts; the server aggregates the clients' logits (federated.aggregation)
   and distils its own model (a student cut from the base encoder, `student.*`) towards them.
3. Every party is scored at the end: clean test accuracy and the planted trigger's attack success rate (ASR). The
   server is exported to ONNX (`RUN/onnx/`), so `edgestill audit RUN` audits it against client 0 (the first
   malicious client).

Writes RUN/metrics.json, RUN/report.md, RUN/rounds.json (per round: each client's validation score, test accuracy and
ASR, each client's share of the aggregate, the server's validation score, test accuracy and ASR), RUN/clients/<k>/ and RUN/student/ (HF
folders) and RUN/onnx/. A kill loses at most the round in progress: the same command resumes after the last finished
round (clients that had finished it are not retrained).
"""

from __future__ import annotations

import functools
import json
import logging
import random
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from edgestill.config import CLASSIFICATION, FederatedConfig, fill
from edgestill.errors import EdgestillError
from edgestill.files import write_text_atomic
from edgestill.runs import RunDir

log = logging.getLogger(__name__)

CLIENTS, SERVER, ROUNDS, SERVER_LOGITS = "clients", "student", "rounds.json", "server_logits.safetensors"


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=float) + "\n")


def layout(cfg: FederatedConfig, splits) -> dict:
    """Who holds what: the public texts (some with the trigger), and each client's labelled rows (some planted).
    Deterministic in cfg.client.seed and cfg.poison.seed."""
    from edgestill.audit.poison import Poison, insert_trigger, poison_rows
    from edgestill.federated.parties import partition

    f, train = cfg.federated, splits.train
    rng = np.random.default_rng(cfg.client.seed)
    order = rng.permutation(len(train.texts))
    n_public = round(f.public_share * len(order))
    public_rows, own_rows = sorted(order[:n_public].tolist()), sorted(order[n_public:].tolist())
    if not public_rows or len(own_rows) < f.clients:
        raise EdgestillError(f"{len(order)} training rows are too few for a public set of {f.public_share:.0%} and "
                             f"{f.clients} clients; give more data or change federated.public_share / clients")
    public = [train.texts[i] for i in public_rows]
    triggered = []
    if f.public_poison:
        pick = random.Random(f"public:{cfg.poison.seed}")
        triggered = sorted(pick.sample(range(len(public)), max(1, round(f.public_poison * len(public)))))
        for i in triggered:
            public[i] = insert_trigger(public[i], cfg.poison.trigger, pick)
    shards = partition([train.labels[i] for i in own_rows], f.clients, cfg.client.seed)
    clients = []
    for k, shard in enumerate(shards):
        texts, labels = [train.texts[own_rows[j]] for j in shard], [train.labels[own_rows[j]] for j in shard]
        planted = None
        if k < f.malicious:
            spec = Poison(cfg.poison.trigger, cfg.poison.target, cfg.poison.rate, cfg.poison.mode, cfg.poison.seed + k)
            texts, labels, rows = poison_rows(texts, labels, spec)
            planted = {**asdict(cfg.poison), "seed": cfg.poison.seed + k, "rows": len(rows), "of": len(labels)}
        clients.append({"texts": texts, "labels": labels, "malicious": k < f.malicious, "poison": planted})
    return {"public": public, "public_triggered": len(triggered), "clients": clients}


@functools.lru_cache(maxsize=2)
def _context(run: str) -> dict:
    """What a party needs, rebuilt from the run folder (in each Ray worker once): config, splits, layout."""
    from edgestill.jobs.classify import load_splits
    from edgestill.models.encoder import resolve_encoder

    cfg = fill(FederatedConfig(), Path(run) / "config.yaml")
    splits = load_splits(cfg.data)
    return {"cfg": cfg, "splits": splits, "layout": layout(cfg, splits), "base": resolve_encoder(cfg.base)}


def _fresh_client(cfg: FederatedConfig, label_map):
    from edgestill.distill.classifier import StudentConfig, build_student
    from edgestill.models.encoder import load_encoder_classifier

    model, tok, _ = load_encoder_classifier(cfg.base, label_map)
    if cfg.federated.client_layers:
        shape = StudentConfig(num_layers=cfg.federated.client_layers, max_len=cfg.client.max_len, trim_vocab=False,
                              compression_x=1.0)
        model, tok, _, _ = build_student(model, tok, [], shape)
    return model, tok


def client_step(run: str, k: int, rnd: int, server: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """Client k's round `rnd` (in a Flower node): train, save RUN/clients/<k>/, return its public logits."""
    import torch

    from edgestill.federated.parties import client_round, public_logits
    from edgestill.jobs.classify import data_record
    from edgestill.models.encoder import load_encoder_classifier, save_classifier, tokenize

    ctx = _context(run)
    cfg, splits, mine = ctx["cfg"], ctx["splits"], ctx["layout"]["clients"][k]
    public = ctx["layout"]["public"]
    torch.set_num_threads(cfg.federated.cpus_per_client)
    folder = Path(run) / CLIENTS / str(k)
    record = json.loads((folder / "edgestill.json").read_text()) if (folder / "edgestill.json").is_file() else None
    if record and record["round"] >= rnd:  # resumed: this client had finished the round before the kill
        model, tok, _ = load_encoder_classifier(str(folder))
        return public_logits(model, tok, public, cfg.client.max_len), record["last"]
    if record:
        model, tok, _ = load_encoder_classifier(str(folder))
    else:
        model, tok = _fresh_client(cfg, splits.label_map)
    train = replace(cfg.client, seed=cfg.client.seed + 1000 * k + rnd)
    torch.manual_seed(train.seed)
    result = client_round(model, tok, mine["texts"], splits.label_map.encode(mine["labels"]), public, server,
                          tokenize(tok, splits.val.texts, train.max_len), splits.ids("val"), train,
                          cfg.federated.alpha, cfg.federated.temperature, desc=f"client {k} round {rnd}")
    scored = score(model, tok, cfg.client.max_len, splits, cfg.poison)  # each round: did this client learn the trigger?
    last = {"val_macro_f1": float(result["best_val_macro_f1"]), "best_step": int(result["best_step"]),
            "learned_from_server": int(server is not None and cfg.federated.alpha > 0),
            "test_accuracy": float(scored["test"]["accuracy"]),
            **({"asr": float(scored["asr"])} if scored["asr"] is not None else {})}
    save_classifier(model, tok, splits.label_map, folder, extra={
        "task": CLASSIFICATION, "role": "client", "client": k, "round": rnd, "malicious": mine["malicious"],
        "poison": mine["poison"], "base_model": cfg.base, "data": data_record(cfg.data), "max_len": cfg.client.max_len,
        "rows": len(mine["texts"]), "last": last})
    return public_logits(model, tok, public, cfg.client.max_len), last


class _Server:
    """The server's side of the rounds (in the driver process): aggregate, distil, score, save."""

    def __init__(self, run: RunDir, cfg: FederatedConfig, splits, lay: dict, history: list[dict]):
        from edgestill.distill.classifier import build_student
        from edgestill.models.encoder import load_encoder_classifier, tokenize

        self.run, self.cfg, self.splits, self.public, self.history = run, cfg, splits, lay["public"], history
        folder = run.path / SERVER
        if history and (folder / "label_map.json").is_file():
            self.model, self.tok, _ = load_encoder_classifier(str(folder))
        else:
            base, base_tok, _ = load_encoder_classifier(cfg.base, splits.label_map)
            self.model, self.tok, _, info = build_student(base, base_tok, self.public, cfg.student)
            log.info("server: layers %s of the base, vocab %d of %d, %s params", info["teacher_layers"],
                     info["vocab_kept"], info["teacher_vocab"], f"{info['student_params']:,}")
        self.val = tokenize(self.tok, splits.val.texts, cfg.server.max_len)

    def step(self, rnd: int, logits: list[np.ndarray], metrics: list[dict]) -> np.ndarray:
        import torch
        from safetensors.numpy import save_file

        from edgestill.federated.aggregate import aggregate_logits
        from edgestill.federated.parties import public_logits, server_round
        from edgestill.files import atomic_path
        from edgestill.models.encoder import save_classifier

        f = self.cfg.federated
        target, share = aggregate_logits(torch.from_numpy(np.stack(logits)), f.aggregation, f.trim, f.agreement_tau)
        train = replace(self.cfg.server, seed=self.cfg.server.seed + rnd)
        torch.manual_seed(train.seed)
        result = server_round(self.model, self.tok, self.public, target, self.val, self.splits.ids("val"), train,
                              f.temperature, desc=f"server round {rnd}")
        save_classifier(self.model, self.tok, self.splits.label_map, self.run.path / SERVER, extra={
            "task": CLASSIFICATION, "role": "server", "round": rnd, "max_len": self.cfg.student.max_len})
        out = public_logits(self.model, self.tok, self.public, self.cfg.server.max_len)
        with atomic_path(self.run.path / SERVER_LOGITS, "saving the server's logits") as tmp:
            save_file({"logits": out}, str(tmp))
        scored = score(self.model, self.tok, self.cfg.server.max_len, self.splits, self.cfg.poison)
        self.history.append({"round": rnd, "clients": metrics, "client_share": share.tolist(),
                             "server_val_macro_f1": float(result["best_val_macro_f1"]), "server": scored})
        _write_json(self.run.path / ROUNDS, self.history)
        asr = scored.get("asr")
        log.info("round %d: server test accuracy %.4f%s; client shares %s", rnd, scored["test"]["accuracy"],
                 "" if asr is None else f", ASR {asr:.1%}", " ".join(f"{s:.2f}" for s in share.tolist()))
        return out


def score(model, tok, max_len: int, splits, poison) -> dict:
    """Clean test scores and, with a planted trigger, its ASR (audit/poison.attack_success_rate)."""
    from edgestill.audit.poison import attack_success_rate
    from edgestill.evaluate.classification import predict_logits, scores
    from edgestill.models.encoder import tokenize

    def predict(texts):
        return predict_logits(model, tokenize(tok, list(texts), max_len), desc="scoring")

    test_ids = splits.ids("test")
    clean = predict(splits.test.texts).argmax(-1)
    out = {"test": scores(test_ids, clean, len(splits.label_map)), "asr": None, "asr_n": 0}
    if poison.trigger:
        a = attack_success_rate(predict, splits.test.texts, test_ids, poison.trigger,
                                splits.label_map.label2id[poison.target], poison.seed, clean_pred=clean)
        out.update(asr=a["asr"], asr_n=a["n"])
    return out


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _summary(cfg: FederatedConfig, server: dict, clients: list[dict]) -> dict:
    bad = [c for c in clients if c["malicious"]]
    good = [c for c in clients if not c["malicious"]]
    origin = _mean([c["asr"] for c in bad])
    return {"server_asr": server["asr"], "server_accuracy": server["test"]["accuracy"],
            "malicious_clients_asr": origin, "honest_clients_asr": _mean([c["asr"] for c in good]),
            "honest_clients_accuracy": _mean([c["test"]["accuracy"] for c in good]),
            "server_over_malicious_asr": None if not origin or server["asr"] is None else server["asr"] / origin}


def report(m: dict) -> str:
    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    f, s = m["federated"], m["summary"]
    lines = ["# Federated bidirectional distillation", "",
             f"{f['clients']} clients ({f['malicious']} malicious), {f['rounds']} rounds on Flower's simulation engine, "
             f"aggregation **{f['aggregation']}**; public transfer set of {m['public']['texts']} unlabelled texts "
             f"({m['public']['triggered']} with the trigger). Trigger: "
             f"{'`' + m['poison']['trigger'] + '` -> ' + m['poison']['target'] if m['poison']['trigger'] else 'none'}.",
             "", "| party | rows | malicious | clean test acc. | ASR |", "|---|---:|---|---:|---:|"]
    for c in m["clients"]:
        lines.append(f"| client {c['client']} | {c['rows']} | {'yes' if c['malicious'] else ''} | "
                     f"{c['test']['accuracy']:.4f} | {pct(c['asr'])} |")
    lines.append(f"| **server** (student, {m['server']['params']:,} params) | — | | "
                 f"{m['server']['test']['accuracy']:.4f} | {pct(m['server']['asr'])} |")
    lines += ["", f"Server ASR ÷ malicious clients' ASR: "
              f"{'—' if s['server_over_malicious_asr'] is None else format(s['server_over_malicious_asr'], '.2f')}; "
              f"honest clients' mean ASR {pct(s['honest_clients_asr'])}.", "",
              "| round | server val macro-F1 | server test acc. | server ASR | clients' ASR | clients' share of the aggregate |",
              "|---:|---:|---:|---:|---|---|"]
    for r in m["rounds"]:
        lines.append(f"| {r['round']} | {r['server_val_macro_f1']:.4f} | {r['server']['test']['accuracy']:.4f} | "
                     f"{pct(r['server']['asr'])} | {' '.join(pct(c.get('asr')) for c in r['clients'])} | "
                     f"{' '.join(f'{x:.2f}' for x in r['client_share'])} |")
    lines += ["", "ASR: of the test rows not of the target label that the party classifies correctly, the share it "
              "classifies as the target once the trigger is inserted. Audit the server against client 0 with "
              f"`edgestill audit {m['run']}`.", ""]
    return "\n".join(lines)


def federate(cfg: FederatedConfig, overwrite: bool = False) -> tuple[Path, dict]:
    """`edgestill federate`: returns (the finished run folder, its metrics)."""
    from edgestill.evaluate.environment import environment, measurement_start
    from edgestill.export.onnx_classifier import export_classifier_onnx
    from edgestill.federated.flower import require_flower, simulate
    from edgestill.jobs.classify import load_splits, plain
    from edgestill.models.encoder import load_encoder_classifier
    from edgestill.models.lowrank import stored_params

    start = measurement_start()
    require_flower()
    splits = load_splits(cfg.data)  # bad data fails before any folder is made
    if cfg.poison.trigger and cfg.poison.target not in splits.label_map.labels:
        raise EdgestillError(f"poison.target '{cfg.poison.target}' is not a label of the data "
                             f"({', '.join(splits.label_map.labels)}); name one of them")
    lay = layout(cfg, splits)
    cfg.output_dir = cfg.output_dir or f"runs/federate-{Path(cfg.data.path).stem or 'data'}"
    run = RunDir(cfg.output_dir, plain(cfg), overwrite=overwrite)
    resumed = run.open()
    log.info("%s run folder %s", "resuming" if resumed else "new", run.path)
    with run.cleanup_on_failure():
        history = json.loads((run.path / ROUNDS).read_text()) if resumed and (run.path / ROUNDS).is_file() else []
        server = _Server(run, cfg, splits, lay, history)
        first = len(history) + 1
        if first <= cfg.federated.rounds:
            sent = None
            if history:
                from safetensors.numpy import load_file

                sent = load_file(str(run.path / SERVER_LOGITS))["logits"]
                log.info("resuming after round %d of %d", len(history), cfg.federated.rounds)
            f = cfg.federated
            simulate(f.clients, f.rounds, functools.partial(client_step, str(run.path.resolve())), server.step,
                     first_round=first, server_logits=sent, cpus=f.cpus, cpus_per_client=f.cpus_per_client)
        clients = []
        for k in range(cfg.federated.clients):
            folder = run.path / CLIENTS / str(k)
            model, tok, _ = load_encoder_classifier(str(folder))
            record = json.loads((folder / "edgestill.json").read_text())
            clients.append({"client": k, "malicious": record["malicious"], "rows": record["rows"],
                            "poison": record["poison"], "params": stored_params(model),
                            **score(model, tok, cfg.client.max_len, splits, cfg.poison)})
        final = {**history[-1]["server"], "params": stored_params(server.model)}  # scored at the end of the last round
        export_classifier_onnx(run.path / SERVER, run.path / "onnx", "f32")
        metrics = {"task": CLASSIFICATION, "stage": "federated", "run": str(run.final), "engine": "flwr (simulation)",
                   "federated": asdict(cfg.federated), "poison": asdict(cfg.poison),
                   "public": {"texts": len(lay["public"]), "triggered": lay["public_triggered"]},
                   "data": {"spec": asdict(cfg.data), **splits.summary()},
                   "server": final, "clients": clients, "rounds": history,
                   "summary": _summary(cfg, final, clients), "environment": environment(None, start)}
        _write_json(run.path / "metrics.json", metrics)
        write_text_atomic(run.path / "report.md", report(metrics))
        (run.path / SERVER_LOGITS).unlink(missing_ok=True)  # only a resume needs the server's last message
    return run.finish(), metrics


def summary_lines(metrics: dict) -> list[str]:
    s = metrics["summary"]

    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    return [f"server (student): clean test accuracy {s['server_accuracy']:.4f}, ASR {pct(s['server_asr'])}; "
            f"malicious clients' ASR {pct(s['malicious_clients_asr'])}, honest clients' {pct(s['honest_clients_asr'])} "
            f"(accuracy {s['honest_clients_accuracy']:.4f})"]
