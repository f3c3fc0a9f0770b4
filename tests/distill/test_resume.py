"""Kill `edgestill distill` mid-run with SIGKILL, rerun the same command, and check that the
resumed run ends exactly where an uninterrupted run of the same command ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides  # tests/ is on sys.path

# If a run finishes before it could be killed, try again with more steps (a slower machine kills
# sooner; a faster one needs more steps to leave a window).
STEP_PLANS = (40, 120, 400)
KILL_AT_STEP = 10  # kill once a checkpoint at or after this step exists
CHECKPOINT_EVERY = 5
POLL_TIMEOUT_S = 300


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(EDGESTILL_NO_PROGRESS="1", EDGESTILL_CACHE=str(tmp_path / "edgestill-cache"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _command(model_dir, corpus_dir, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "edgestill.cli", "distill",
            *tiny_overrides(model_dir, corpus_dir, out, steps=steps),
            f"distill.checkpoint_every={CHECKPOINT_EVERY}", "distill.eval_every=10"]


def _latest_step(partial: Path) -> int | None:
    latest = partial / "checkpoints" / "LATEST"
    try:
        name = latest.read_text().strip()
    except OSError:
        return None
    if not name.startswith("ckpt-"):
        return None
    return int(name.split("-", 1)[1])


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]


def _start_and_kill(cmd: list[str], out: Path, steps: int, env: dict, cwd: Path) -> int | None:
    """Start the run and SIGKILL it once a checkpoint at step >= KILL_AT_STEP exists.

    Returns the checkpoint step it was killed after, or None when the run finished first.
    """
    partial = out.with_name(out.name + ".partial")
    with open(cwd / f"killed-{steps}.stderr", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd)
        deadline = time.monotonic() + POLL_TIMEOUT_S
        try:
            while proc.poll() is None:
                step = _latest_step(partial)
                if step is not None and KILL_AT_STEP <= step < steps:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=60)
                    return step
                if time.monotonic() > deadline:
                    pytest.fail(f"no checkpoint at step >= {KILL_AT_STEP} within {POLL_TIMEOUT_S}s")
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    return None


def test_killed_distill_resumes_to_the_same_result(tiny_model_dir, tiny_corpus, tmp_path):
    env = _env(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    killed_at = None
    for steps in STEP_PLANS:
        out = tmp_path / f"resumed-{steps}"
        cmd = _command(tiny_model_dir, tiny_corpus, out, steps)
        killed_at = _start_and_kill(cmd, out, steps, env, cwd)
        if killed_at is not None:
            break
        assert (out / "DONE").is_file(), (cwd / f"killed-{steps}.stderr").read_text()
    assert killed_at is not None, f"every run finished before it could be killed (steps tried: {STEP_PLANS})"

    # the killed run is unfinished: no final folder, a partial one with a checkpoint before the end
    partial = out.with_name(out.name + ".partial")
    assert not out.exists()
    assert partial.is_dir() and not (partial / "DONE").exists()
    assert not (partial / "student").exists()
    assert killed_at % CHECKPOINT_EVERY == 0 and killed_at < steps
    assert len(_log(partial)) >= killed_at

    # rerun the same command: it resumes and finishes
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=POLL_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run folder" in resumed.stderr
    assert (out / "DONE").is_file() and not partial.exists()

    # the same command, never interrupted, in another folder
    reference_out = tmp_path / "uninterrupted"
    reference = subprocess.run(_command(tiny_model_dir, tiny_corpus, reference_out, steps), capture_output=True,
                               text=True, env=env, cwd=cwd, timeout=POLL_TIMEOUT_S)
    assert reference.returncode == 0, reference.stderr
    assert "new run folder" in reference.stderr

    log, ref_log = _log(out), _log(reference_out)
    assert [h["step"] for h in log] == list(range(1, steps + 1)), "one log entry per step, no gaps or repeats"
    assert [h["step"] for h in ref_log] == list(range(1, steps + 1))
    for h, r in zip(log, ref_log):
        for key in ("loss", "kd", "ce"):
            assert h[key] == pytest.approx(r[key], abs=1e-4), (h["step"], key, h[key], r[key])
        assert h["lr"] == pytest.approx(r["lr"], rel=1e-12)
        assert ("val_loss" in h) == ("val_loss" in r)
        if "val_loss" in h:
            assert h["val_loss"] == pytest.approx(r["val_loss"], abs=1e-4)

    weights = load_file(out / "student" / "model.safetensors")
    ref_weights = load_file(reference_out / "student" / "model.safetensors")
    assert weights.keys() == ref_weights.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32
        assert torch.allclose(tensor, ref_weights[name], rtol=0, atol=1e-5), name
    # training moved the weights away from the teacher's (layer 0 is always kept): the comparison is not vacuous
    teacher = load_file(Path(tiny_model_dir) / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(weights[name], teacher[name], atol=1e-4)
