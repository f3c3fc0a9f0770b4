"""`edgestill federate` end to end on Flower's simulation engine (Ray) with a tiny random BERT: 4 clients, one of them
planting a trigger, 2 rounds of two-way distillation through logits on a public set; killed in round 2 and resumed;
then `edgestill audit` on the finished run."""

from __future__ import annotations

import json

import pytest
from test_audit_cli import rows
from test_classify_cli import write_csv

from edgestill.cli import main
from edgestill.config import load_federated_config
from edgestill.errors import EdgestillError
from edgestill.jobs import federate as job
from edgestill.models.encoder import tiny_encoder

pytest.importorskip("flwr", reason="the federated extra (Flower) is not installed")

TINY = ["client.steps=60", "client.eval_every=30", "client.lr=3e-3", "client.max_len=32", "server.steps=60",
        "server.eval_every=30", "server.lr=3e-3", "student.max_len=32", "student.num_layers=1", "student.compression_x=2",
        "student.min_rank=2", "student.multiple_of=1", "federated.rounds=2", "federated.malicious=1",
        "poison.trigger=zq vx", "poison.target=ham",
        "poison.rate=0.5", "federated.public_poison=0.2"]


@pytest.fixture(scope="module")
def federated(tmp_path_factory):
    root = tmp_path_factory.mktemp("federate")
    enc = tiny_encoder(root / "tiny_bert", [t for t, _ in rows(60, seed=9)] + ["zq vx unseen zebra"])
    data = write_csv(root / "mail.csv", rows(120))
    out = root / "run"
    args = ["federate", "--base", str(enc), "--data", str(data), "--out", str(out), *TINY]
    step = job._Server.step

    def killed_in_round_2(self, rnd, logits, metrics):
        if rnd == 2:
            raise EdgestillError("killed")
        return step(self, rnd, logits, metrics)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(job._Server, "step", killed_in_round_2)
        assert main(args) != 0
    partial = root / "run.partial"
    before = {k: (partial / "clients" / str(k) / "model.safetensors").stat().st_mtime_ns for k in range(4)}
    assert [r["round"] for r in json.loads((partial / "rounds.json").read_text())] == [1]
    assert main(args) == 0  # resumes in round 2
    assert main(["audit", str(out), "--candidates", "30", "--texts", "32"]) == 0
    return {"run": out, "before": before, "metrics": json.loads((out / "metrics.json").read_text()),
            "audit": json.loads((out / "audit.json").read_text())}


def test_the_rounds_ran_on_flower_and_resumed_without_retraining_the_clients(federated):
    run, m = federated["run"], federated["metrics"]
    assert m["engine"].startswith("flwr") and [r["round"] for r in m["rounds"]] == [1, 2]
    for k in range(4):  # every client had finished round 2 before the kill: the resume reused its saved state
        record = json.loads((run / "clients" / str(k) / "edgestill.json").read_text())
        assert record["round"] == 2 and record["malicious"] == (k == 0)
        assert (run / "clients" / str(k) / "model.safetensors").stat().st_mtime_ns == federated["before"][k]
    first, second = m["rounds"]
    assert [c["learned_from_server"] for c in first["clients"]] == [0] * 4  # round 1: no server logits yet
    assert [c["learned_from_server"] for c in second["clients"]] == [1] * 4
    for r in m["rounds"]:
        assert abs(sum(r["client_share"]) - 1) < 1e-5
    assert (run / "onnx" / "model.onnx").is_file() and not (run / job.SERVER_LOGITS).exists()
    assert "aggregation **mean**" in (run / "report.md").read_text()


def test_the_trigger_is_planted_only_in_the_malicious_client(federated):
    m = federated["metrics"]
    bad, *good = m["clients"]
    assert bad["malicious"] and bad["poison"]["rows"] > 0 and all(c["poison"] is None for c in good)
    assert m["public"]["triggered"] == round(0.2 * m["public"]["texts"])
    assert bad["asr"] > max(c["asr"] for c in good)  # the planting took in the client that planted it
    s = m["summary"]
    assert s["malicious_clients_asr"] == bad["asr"] and s["server_asr"] == m["server"]["asr"]


def test_audit_compares_the_server_with_the_malicious_client(federated):
    a = federated["audit"]
    assert a["teacher"].endswith("clients/0")
    planted = next(t for t in a["triggers"] if t["phrase"] == "zq vx")
    assert planted["named"] and planted["teacher_asr"] == pytest.approx(federated["metrics"]["clients"][0]["asr"])


@pytest.mark.parametrize("override, message", [
    (["federated.clients=1"], "at least 2 clients"),
    (["federated.malicious=1"], "needs a trigger"),
    (["federated.malicious=4", "poison.trigger=zq", "poison.target=ham"], "at least one honest"),
    (["federated.aggregation=median", "federated.clients=2"], "at least 3 clients"),
    (["federated.public_share=1"], "public_share"),
])
def test_bad_settings_get_one_clear_line(override, message):
    with pytest.raises(EdgestillError, match=message):
        load_federated_config(overrides=override)
