"""DistributedDataParallel on CPU (gloo) under torchrun: 2 ranks reproduce 1 process with the same
global batch, and the real CLI runs under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides  # tests/ is on sys.path

WORKER = Path(__file__).with_name("ddp_worker.py")
MODES = ("cached", "live")
TIMEOUT_S = 300


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(EDGESTILL_NO_PROGRESS="1", EDGESTILL_CACHE=str(tmp_path / "edgestill-cache"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *map(str, args)]


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode})\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def ddp_and_single(tiny_model_dir, tmp_path_factory):
    """The worker under torchrun (2 ranks) and as one plain process, run side by side."""
    root = tmp_path_factory.mktemp("ddp")
    env = _env(root)
    single = subprocess.Popen([sys.executable, str(WORKER), str(tiny_model_dir), str(root / "single"), *MODES],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
    try:
        ddp = subprocess.run(_torchrun(WORKER, tiny_model_dir, root / "ddp", *MODES), capture_output=True, text=True,
                             env=env, cwd=root, timeout=TIMEOUT_S)
        stdout, stderr = single.communicate(timeout=TIMEOUT_S)
    finally:
        if single.poll() is None:
            single.kill()
            single.wait()
    _check(ddp, "torchrun worker")
    _check(subprocess.CompletedProcess(single.args, single.returncode, stdout, stderr), "single-process worker")
    return root


def _history(folder: Path) -> tuple[int, list[dict]]:
    data = json.loads((folder / "history.json").read_text())
    return data["world"], data["history"]


@pytest.mark.parametrize("mode", MODES)
def test_ranks_hold_identical_parameters(ddp_and_single, mode):
    folder = ddp_and_single / "ddp" / mode
    r0, r1 = load_file(folder / "rank0.safetensors"), load_file(folder / "rank1.safetensors")
    assert r0.keys() == r1.keys() and r0
    for name in r0:
        assert torch.equal(r0[name], r1[name]), f"{name} differs between ranks"


@pytest.mark.parametrize("mode", MODES)
def test_ddp_matches_one_process(ddp_and_single, mode, tiny_model_dir):
    ddp_world, ddp_hist = _history(ddp_and_single / "ddp" / mode)
    single_world, single_hist = _history(ddp_and_single / "single" / mode)
    assert (ddp_world, single_world) == (2, 1)
    assert [h["step"] for h in ddp_hist] == [h["step"] for h in single_hist] == [1, 2, 3]
    for d, s in zip(ddp_hist, single_hist):
        for key in ("loss", "kd", "ce"):
            assert d[key] == pytest.approx(s[key], rel=1e-4), (d["step"], key, d[key], s[key])
        assert d["lr"] == s["lr"]
        assert d["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-3)
    assert ddp_hist[-1]["val_loss"] == pytest.approx(single_hist[-1]["val_loss"], rel=1e-4)
    # the loss went down: the three steps did train
    assert ddp_hist[-1]["loss"] < ddp_hist[0]["loss"]

    ddp = load_file(ddp_and_single / "ddp" / mode / "rank0.safetensors")
    single = load_file(ddp_and_single / "single" / mode / "rank0.safetensors")
    assert ddp.keys() == single.keys()
    for name in ddp:
        assert torch.allclose(ddp[name], single[name], rtol=0, atol=1e-5), \
            f"{name}: max diff {(ddp[name] - single[name]).abs().max().item():.2e}"
    # and the weights moved from the sliced teacher's (layer 0 is kept as student layer 0)
    teacher = load_file(Path(tiny_model_dir) / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(ddp[name], teacher[name], atol=1e-4)


def test_cli_distill_under_torchrun(tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(_torchrun("-m", "edgestill.cli", "distill",
                                    *tiny_overrides(tiny_model_dir, tiny_corpus, out), "distill.steps=4"),
                          capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=TIMEOUT_S)
    _check(proc, "torchrun edgestill distill")
    assert "Traceback" not in proc.stderr
    assert proc.stdout.count("run folder:") == 1, "only rank 0 reports the run folder"
    assert (out / "DONE").is_file()
    assert not out.with_name(out.name + ".partial").exists()
    assert (out / "student" / "config.json").is_file() and (out / "student" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in log)
    assert "val_loss" in log[-1]
    selection = json.loads((out / "selection.json").read_text())  # chosen once, by rank 0, and kept by every rank
    assert selection["select"] == "val_kl" and selection["last_step"] == 4

    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2
