"""Integration tests of the `edgestill` command line on the tiny random Llama.

End-to-end runs go through `edgestill.cli.main` in-process (faster); bad-input runs go through a
real subprocess, so that a leaked traceback or a multi-line error would be seen exactly as a
user sees it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_model, tiny_overrides
from edgestill.cli import main

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 300


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(EDGESTILL_NO_PROGRESS="1", EDGESTILL_CACHE=str(tmp_path / "edgestill-cache"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    return env


def run_cli(args, tmp_path: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m edgestill.cli ARGS` in a subprocess, from a scratch cwd (so no stray runs/ in the repo)."""
    return subprocess.run([sys.executable, "-m", "edgestill.cli", *map(str, args)], capture_output=True, text=True,
                          env=_env(tmp_path), cwd=cwd or tmp_path, timeout=SUBPROCESS_TIMEOUT)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, no traceback, and the error is one `edgestill: error:` line, the last one printed."""
    err = proc.stderr
    assert proc.returncode != 0, f"expected failure, got exit 0\nstdout:\n{proc.stdout}\nstderr:\n{err}"
    assert proc.returncode == 2, f"user errors exit 2, got {proc.returncode}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("edgestill: error:")]
    assert len(errors) == 1, f"expected exactly one 'edgestill: error:' line:\n{err}"
    assert lines[-1] == errors[0], f"the error message spans several lines (or is not the last line):\n{err}"
    message = errors[0]
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in the error line: {message}"
    return message


# --- help and config --------------------------------------------------------------------------------

def test_help_console_script(tmp_path):
    script = Path(sys.executable).parent / "edgestill"
    cmd = [str(script), "--help"] if script.is_file() else [sys.executable, "-m", "edgestill.cli", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("shrink", "distill", "eval", "config"):
        assert word in proc.stdout
    assert "Traceback" not in proc.stderr


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "shrink" in capsys.readouterr().out


def test_config_prints_yaml(capsys):
    assert main(["config", "student.num_layers=3", "--out", "somewhere"]) == 0
    out = capsys.readouterr().out
    assert "num_layers" in out
    data = yaml.safe_load(out)
    assert data["student"]["num_layers"] == 3
    assert data["output"]["dir"] == "somewhere"
    assert set(data) == {"teacher", "data", "student", "distill", "eval", "output"}


def test_config_unknown_key_in_process(capsys):
    assert main(["config", "distill.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgestill: error:") and "distill.steps" in err


# --- end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shrink_run(tiny_model_dir, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("shrink") / "run"
    rc = main(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, out)])
    assert rc == 0
    return out


def test_shrink_writes_a_complete_run(shrink_run, tiny_model_dir):
    run = shrink_run
    assert run.is_dir()
    assert not run.with_name(run.name + ".partial").exists(), "the partial folder must be renamed when done"
    for name in ("student/config.json", "student/model.safetensors", "config.yaml", "metrics.json", "report.md",
                 "report.html", "training_loss.png", "token_loss.png", "generations.json", "DONE", "train_log.jsonl"):
        assert (run / name).is_file(), f"missing {name}"
        assert (run / name).stat().st_size > 0, f"empty {name}"
    assert not (run / "checkpoints").exists(), "shrink removes its checkpoints once finished"

    m = json.loads((run / "metrics.json").read_text())
    for key in ("retention", "top1_agreement", "compression_x_fp32", "compression_x_fp16", "speedup_x"):
        assert isinstance(m[key], float) and math.isfinite(m[key]) and m[key] > 0, (key, m[key])
    assert 0.0 <= m["top1_agreement"] <= 1.0
    for who in ("teacher", "student"):
        assert math.isfinite(m[who]["perplexity"]) and m[who]["perplexity"] > 1.0
    assert m["retention"] == pytest.approx(m["teacher"]["perplexity"] / m["student"]["perplexity"])
    assert 0 < m["student"]["bytes"] < m["teacher"]["bytes"]
    assert m["student"]["params"] < m["teacher"]["params"]
    assert m["teacher"]["num_layers"] == 4 and m["student"]["num_layers"] == 2
    assert len(m["student"]["layers_kept"]) == 2
    assert m["train"]["steps"] == 6
    assert "sliced_untrained" in m["baselines"]

    gens = json.loads((run / "generations.json").read_text())
    assert [g["prompt"] for g in gens] == ["the king"]
    assert all(isinstance(g["teacher"], str) and isinstance(g["student"], str) for g in gens)

    assert (run / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "token_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (run / "report.html").read_text()
    assert "retention" in (run / "report.md").read_text()

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["student"]["num_layers"] == 2 and cfg["teacher"]["model"] == str(tiny_model_dir)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == list(range(1, 7))


def test_shrink_student_loads_with_transformers(shrink_run, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(shrink_run / "student")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert student.config.num_hidden_layers == 2 < teacher.config.num_hidden_layers == 4
    assert len(student.model.layers) == 2
    tok = AutoTokenizer.from_pretrained(shrink_run / "student")
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    ids = torch.tensor([tok("the king is dead", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = student(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], teacher.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.xfail(strict=True, reason="src bug: metrics.json student.path names RUN.partial/student, which is "
                                       "renamed away when the run finishes (shrink.py evaluate_run)")
def test_shrink_metrics_student_path_exists(shrink_run):
    m = json.loads((shrink_run / "metrics.json").read_text())
    assert Path(m["student"]["path"]).is_dir()


def test_distill_then_eval(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=4)]) == 0
    assert f"run folder: {out}" in capsys.readouterr().out
    assert (out / "DONE").is_file()
    assert (out / "student" / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert (out / "splits.json").is_file()
    assert not (out / "metrics.json").exists(), "distill alone does not evaluate"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2, 3, 4]

    # eval refuses overrides outside eval.* and folders that are not runs
    assert main(["eval", str(out), "distill.steps=3"]) == 2
    assert "eval only takes eval.*" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "not a finished edgestill run" in capsys.readouterr().err

    assert main(["eval", str(out), "eval.speed_repeats=1"]) == 0
    printed = capsys.readouterr().out
    assert "retention" in printed
    for name in ("metrics.json", "report.md", "report.html", "training_loss.png", "token_loss.png", "generations.json"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["student"]["num_layers"] == 2 and m["teacher"]["num_layers"] == 4
    assert m["student"]["bytes"] < m["teacher"]["bytes"]
    assert m["train"]["steps"] == 4
    assert Path(m["student"]["path"]) == out / "student"


# --- bad input: one line, exit 2, no traceback -----------------------------------------------------------

@pytest.fixture(scope="module")
def bad_inputs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    # a folder that looks like a model but whose weights are garbage (tokenizer files intact)
    corrupt = root / "corrupt_weights"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(os.urandom(4096))
    # only config.json and garbage weights (no tokenizer files)
    bare = root / "corrupt_bare"
    bare.mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", bare / "config.json")
    (bare / "model.safetensors").write_bytes(os.urandom(4096))
    gguf = root / "x.gguf"
    gguf.write_bytes(b"\x00" + os.urandom(8191))  # can never start with the GGUF magic
    empty = root / "empty_corpus"
    empty.mkdir()
    small = root / "small_corpus"
    small.mkdir()
    (small / "only.txt").write_text("the king is dead.\nlong live the king.\n")
    return {"corrupt": corrupt, "bare": bare, "gguf": gguf, "empty": empty, "small": small, "root": root}


def test_missing_teacher(tiny_corpus, tmp_path):
    missing = tmp_path / "no_such_model"
    proc = run_cli(["distill", *tiny_overrides(missing, tiny_corpus, tmp_path / "out")], tmp_path)
    assert_user_error(proc, "not found", str(missing))
    assert not (tmp_path / "out").exists()


def test_corrupt_teacher_weights(bad_inputs, tiny_corpus, tmp_path):
    proc = run_cli(["distill", *tiny_overrides(bad_inputs["corrupt"], tiny_corpus, tmp_path / "out")], tmp_path)
    assert_user_error(proc, str(bad_inputs["corrupt"]), "corrupt")


@pytest.mark.xfail(strict=True, reason="src bug: models/load.py puts the tokenizer exception text (which has "
                                       "newlines) into the error, so the message spans several lines")
def test_corrupt_teacher_without_tokenizer(bad_inputs, tiny_corpus, tmp_path):
    proc = run_cli(["distill", *tiny_overrides(bad_inputs["bare"], tiny_corpus, tmp_path / "out")], tmp_path)
    assert_user_error(proc, str(bad_inputs["bare"]))


def test_random_bytes_gguf(bad_inputs, tiny_corpus, tmp_path):
    proc = run_cli(["shrink", *tiny_overrides(bad_inputs["gguf"], tiny_corpus, tmp_path / "out")], tmp_path)
    assert_user_error(proc, str(bad_inputs["gguf"]), "not a GGUF file")
    assert not list((tmp_path / "edgestill-cache").rglob("*.safetensors")), "nothing is cached from a bad GGUF"


def test_empty_corpus_folder(bad_inputs, tiny_model_dir, tmp_path):
    proc = run_cli(["distill", *tiny_overrides(tiny_model_dir, bad_inputs["empty"], tmp_path / "out")], tmp_path)
    assert_user_error(proc, str(bad_inputs["empty"]), "no .txt or .md")


def test_too_small_corpus(bad_inputs, tiny_model_dir, tmp_path):
    proc = run_cli(["distill", *tiny_overrides(tiny_model_dir, bad_inputs["small"], tmp_path / "out")], tmp_path)
    assert_user_error(proc, "corpus too small")


def test_unknown_config_key_suggests(tiny_model_dir, tiny_corpus, tmp_path):
    proc = run_cli(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, tmp_path / "out"), "distill.step=3"], tmp_path)
    msg = assert_user_error(proc, "unknown config key 'distill.step'", "did you mean 'distill.steps'")
    assert "edgestill config" in msg
    proc = run_cli(["shrink", "studnet.num_layers=3"], tmp_path)
    assert_user_error(proc, "unknown config key 'studnet'", "did you mean 'student'")


def test_student_as_large_as_teacher(tiny_model_dir, tiny_corpus, tmp_path):
    proc = run_cli(["distill", *tiny_overrides(tiny_model_dir, tiny_corpus, tmp_path / "out"), "student.num_layers=4"],
                   tmp_path)
    assert_user_error(proc, "student.num_layers=4", "as large as the teacher")


def _tiny_model_other_tokenizer(path: Path) -> Path:
    """A 2-layer tiny model whose tokenizer maps two tokens to each other's ids."""
    build_tiny_model(path, num_layers=2, seed=1)
    tj = json.loads((path / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (path / "tokenizer.json").write_text(json.dumps(tj))
    return path


def test_student_with_a_different_tokenizer(tiny_model_dir, tiny_corpus, tmp_path):
    from transformers import AutoTokenizer

    other = _tiny_model_other_tokenizer(tmp_path / "other_model")
    assert AutoTokenizer.from_pretrained(other).get_vocab() != AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    proc = run_cli(["distill", *tiny_overrides(tiny_model_dir, tiny_corpus, tmp_path / "out"),
                    f"student.model={other}"], tmp_path)
    assert_user_error(proc, "tokenizers differ")


def test_finished_run_is_not_overwritten(shrink_run, tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(shrink_run, out)  # copy2 keeps mtimes
    before = {p.relative_to(out): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    args = ["distill", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=2)]

    proc = run_cli(args, tmp_path)
    assert_user_error(proc, "already holds a finished run", "--overwrite")
    after = {p.relative_to(out): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before, "a refused run must leave the finished run untouched"
    assert (out / "metrics.json").stat().st_mtime_ns == before[Path("metrics.json")][1]

    proc = run_cli([*args, "--overwrite"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "DONE").is_file() and (out / "student" / "model.safetensors").is_file()
    assert not out.with_name(out.name + ".partial").exists()
    assert not list(tmp_path.glob("run.old-*")), "the replaced run is removed"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2], "the folder now holds the new run"
    assert not (out / "metrics.json").exists(), "the old run's files are replaced, not mixed in"


@pytest.mark.xfail(strict=True, reason="src bug: distill_run creates OUT.partial/config.yaml before the teacher and "
                                       "data are checked, so fixing a typo is refused as 'a different config'")
def test_rerun_after_a_typo_in_the_teacher_path(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *tiny_overrides(tmp_path / "typo", tiny_corpus, out, steps=2)]) == 2
    capsys.readouterr()
    rc = main(["distill", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=2)])
    assert rc == 0, capsys.readouterr().err
