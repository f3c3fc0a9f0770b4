"""Integration tests of the `edgestill` command line on the tiny random Llama.

End-to-end runs go through `edgestill.cli.main` in-process (faster); bad-input runs go through a
real subprocess, so that a leaked traceback or a multi-line error would be seen exactly as a
user sees it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import build_tiny_model, shrunk_run, tiny_overrides  # tests/ is on sys.path
from edgestill.cli import main

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

    proc = subprocess.run([*cmd[:-1], "config"], capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "num_layers" in proc.stdout
    assert yaml.safe_load(proc.stdout)["student"]["num_layers"] >= 1


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
    assert set(data) == {"teacher", "data", "student", "distill", "quant", "eval", "output", "poison", "onion", "fine_prune", "perturb"}


def test_config_unknown_key_in_process(capsys):
    assert main(["config", "distill.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgestill: error:") and "distill.steps" in err
    assert main(["shrink", "studnet.num_layers=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key 'studnet'" in err and "did you mean 'student'" in err


# --- end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shrink_run(tiny_model_dir, tiny_corpus, tmp_path_factory):
    return shrunk_run(tmp_path_factory, "shrink", tiny_model_dir, tiny_corpus)


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
    # against the teacher the user started from (here the tiny model's folder), every file a device loads counted
    folder = [p for p in Path(tiny_model_dir).iterdir() if p.is_file()]
    assert m["teacher"]["source_bytes"] == sum(p.stat().st_size for p in folder)
    assert m["student"]["bytes"] == sum(p.stat().st_size for p in (run / "student").iterdir())
    assert m["student"]["weight_bytes"] == (run / "student" / "model.safetensors").stat().st_size < m["student"]["bytes"]
    assert m["compression_x_source"] == pytest.approx(m["teacher"]["source_bytes"] / m["student"]["bytes"])
    assert m["teacher"]["num_layers"] == 4 and m["student"]["num_layers"] == 2
    assert len(m["student"]["layers_kept"]) == 2
    assert m["train"]["steps"] == 6
    assert "sliced_untrained" in m["baselines"]
    # the reference is the teacher corrected on the train split; the original's numbers stand beside it
    assert m["reference"] == "corrected" and m["teacher"]["correction"]["steps_run"] >= 1
    assert m["teacher"]["correction"]["val_loss_best"] <= m["teacher"]["correction"]["val_loss_before"]
    assert math.isfinite(m["original_teacher"]["perplexity"]) and m["original_teacher"]["perplexity"] > 1
    # what broke: general English no training touched, zero-shot last word, chat (none: no chat template)
    ood = m["out_of_domain"]
    assert ood["source"] == "general-english" and ood["eval_tokens"] > 0
    assert ood["retention"] == pytest.approx(ood["reference_perplexity"] / ood["student_perplexity"])
    assert 0 <= ood["top1_agreement"] <= 1 and ood["kl_teacher_student"] > 0
    assert m["zero_shot"]["n"] == 4 and {"original_teacher", "reference", "student"} <= set(m["zero_shot"])
    assert m["chat"] is None
    report = (run / "report.md").read_text()
    assert "## What broke" in report and "out-of-domain" in report and "not an instruct model" in report

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


def test_shrink_metrics_name_the_finished_student(shrink_run):
    """metrics.json points at the student where it lives once the run is finished, not at RUN.partial."""
    m = json.loads((shrink_run / "metrics.json").read_text())
    assert Path(m["student"]["path"]) == shrink_run / "student"
    assert Path(m["student"]["path"]).is_dir()


@pytest.fixture(scope="module")
def distill_then_eval(tiny_model_dir, tiny_corpus, tmp_path_factory):
    """`edgestill distill` then `edgestill eval RUN`, with what each step printed and left behind."""
    out = tmp_path_factory.mktemp("distill") / "run"
    facts = {"out": out}

    def call(argv):
        so, se = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            rc = main(argv)
        return rc, so.getvalue(), se.getvalue()

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGESTILL_CACHE", str(out.parent / "edgestill-cache"))
        # 4 steps of 4 x 32 tokens, asked for as a token budget (--train-budget -> distill.budget)
        facts["distill"] = call(["distill", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=99),
                                 "--train-budget", "512 tokens"])
        facts["files_after_distill"] = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
        facts["eval_bad_override"] = call(["eval", str(out), "distill.steps=3"])
        facts["eval_not_a_run"] = call(["eval", str(out.parent / "nope")])
        facts["eval"] = call(["eval", str(out), "eval.speed_repeats=1"])
    return facts


def test_distill_writes_a_finished_run_without_evaluation(distill_then_eval):
    out = distill_then_eval["out"]
    rc, stdout, stderr = distill_then_eval["distill"]
    assert rc == 0, stderr
    assert f"run folder: {out}" in stdout and f"edgestill eval {out}" in stdout
    files = distill_then_eval["files_after_distill"]
    for name in ("DONE", "config.yaml", "splits.json", "train_log.jsonl", "student/config.json", "student/model.safetensors"):
        assert name in files, name
    assert "metrics.json" not in files and "report.md" not in files, "distill alone does not evaluate"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2, 3, 4]
    assert "val_loss" in log[-1]


def test_eval_refuses_bad_arguments(distill_then_eval):
    rc, _, stderr = distill_then_eval["eval_bad_override"]
    assert rc == 2 and stderr.startswith("edgestill: error:") and "eval only takes eval.*" in stderr
    rc, _, stderr = distill_then_eval["eval_not_a_run"]
    assert rc == 2 and stderr.startswith("edgestill: error:") and "not a finished edgestill run" in stderr


def test_eval_of_a_distill_run(distill_then_eval):
    out = distill_then_eval["out"]
    rc, stdout, stderr = distill_then_eval["eval"]
    assert rc == 0, stderr
    assert "retention" in stdout and "top-1 agreement" in stdout
    for name in ("metrics.json", "report.md", "report.html", "training_loss.png", "token_loss.png", "generations.json"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["student"]["num_layers"] == 2 and m["teacher"]["num_layers"] == 4
    assert 0 < m["student"]["bytes"] < m["teacher"]["bytes"]
    assert math.isfinite(m["retention"]) and 0 <= m["top1_agreement"] <= 1
    assert Path(m["student"]["path"]) == out / "student"
    assert m["splits"] == json.loads((out / "splits.json").read_text())


def test_eval_of_a_distill_run_reports_training(distill_then_eval):
    m = json.loads((distill_then_eval["out"] / "metrics.json").read_text())
    assert m["train"]["steps"] == 4 and m["train"]["tokens"] == 512
    assert m["train"]["budget"]["budget"] == "512 tokens" and m["train"]["budget"]["steps"] == 4
    assert m["train"]["final_loss"] is not None and m["train"]["final_val_loss"] is not None
    sel = m["train"]["selection"]  # fidelity first: which evaluated state the student is, step 0 included
    assert sel["select"] == "val_kl" and sel["start"]["step"] == 0 and sel["last_step"] == 4
    assert sel["selected"]["kl_teacher_student"] <= min(sel["start"]["kl_teacher_student"], sel["last"]["kl_teacher_student"])
    assert "chosen on held-out KL to the teacher" in (distill_then_eval["out"] / "report.md").read_text()


# --- bad input: one line, exit 2, no traceback -----------------------------------------------------------

def _tiny_model_other_tokenizer(path: Path) -> Path:
    """A 2-layer tiny model whose tokenizer maps two tokens to each other's ids."""
    build_tiny_model(path, num_layers=2, seed=1)
    tj = json.loads((path / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (path / "tokenizer.json").write_text(json.dumps(tj))
    return path


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def bad_runs(tiny_model_dir, tiny_corpus, shrink_run, tmp_path_factory):
    """Every bad-input command, each in its own subprocess, run a few at a time (they are mostly imports)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    inputs = {"missing": root / "no_such_model"}
    # a folder that looks like a model but whose weights are garbage (tokenizer files intact)
    inputs["corrupt"] = root / "corrupt_weights"
    shutil.copytree(tiny_model_dir, inputs["corrupt"])
    (inputs["corrupt"] / "model.safetensors").write_bytes(os.urandom(4096))
    # only config.json and garbage weights (no tokenizer files)
    inputs["bare"] = root / "corrupt_bare"
    inputs["bare"].mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", inputs["bare"] / "config.json")
    (inputs["bare"] / "model.safetensors").write_bytes(os.urandom(4096))
    inputs["gguf"] = root / "x.gguf"
    inputs["gguf"].write_bytes(b"\x00" + os.urandom(8191))  # can never start with the GGUF magic
    inputs["empty"] = root / "empty_corpus"
    inputs["empty"].mkdir()
    inputs["small"] = root / "small_corpus"
    inputs["small"].mkdir()
    (inputs["small"] / "only.txt").write_text("the king is dead.\nlong live the king.\n")
    inputs["garbage"] = root / "garbage_corpus"  # random bytes named .txt
    inputs["garbage"].mkdir()
    (inputs["garbage"] / "a.txt").write_bytes(os.urandom(20000))
    inputs["bad_config"] = root / "bad_config_json"  # config.json broken, tokenizer.json intact
    shutil.copytree(tiny_model_dir, inputs["bad_config"])
    (inputs["bad_config"] / "config.json").write_text('{"model_type": "llama",')
    inputs["other_tokenizer"] = _tiny_model_other_tokenizer(root / "other_tokenizer_model")
    inputs["finished"] = root / "finished_run"
    shutil.copytree(shrink_run, inputs["finished"])  # copy2 keeps mtimes
    inputs["finished_before"] = _snapshot(inputs["finished"])

    def tiny(name, teacher=tiny_model_dir, corpus=tiny_corpus, steps=6):
        return tiny_overrides(teacher, corpus, root / "out" / name, steps)

    commands = {
        "missing": ["distill", *tiny("missing", teacher=inputs["missing"])],
        "corrupt": ["distill", *tiny("corrupt", teacher=inputs["corrupt"])],
        "bare": ["distill", *tiny("bare", teacher=inputs["bare"])],
        "gguf": ["shrink", *tiny("gguf", teacher=inputs["gguf"])],
        "empty": ["distill", *tiny("empty", corpus=inputs["empty"])],
        "small": ["distill", *tiny("small", corpus=inputs["small"])],
        "garbage": ["shrink", *tiny("garbage", corpus=inputs["garbage"])],
        "bad_config": ["shrink", *tiny("bad_config", teacher=inputs["bad_config"])],
        "budget": ["shrink", *tiny("budget"), "--device", "rpi5", "--max-memory", "1MB"],
        "unknown_key": ["shrink", *tiny("unknown_key"), "distill.step=3"],
        "as_large": ["distill", *tiny("as_large"), "student.num_layers=4"],
        "other_tokenizer": ["distill", *tiny("other_tokenizer"), f"student.model={inputs['other_tokenizer']}"],
        "finished": ["distill", *tiny_overrides(tiny_model_dir, tiny_corpus, inputs["finished"], steps=2)],
    }
    cwd = root / "cwd"
    cwd.mkdir()
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run_cli, argv, root, cwd) for name, argv in commands.items()}
        procs = {name: f.result() for name, f in futures.items()}
    return {"procs": procs, "inputs": inputs, "root": root, "cwd": cwd}


def test_missing_teacher(bad_runs):
    missing = bad_runs["inputs"]["missing"]
    assert_user_error(bad_runs["procs"]["missing"], "not found", str(missing))
    assert not (bad_runs["root"] / "out" / "missing").exists()


def test_corrupt_teacher_weights(bad_runs):
    assert_user_error(bad_runs["procs"]["corrupt"], str(bad_runs["inputs"]["corrupt"]), "corrupt")


def test_corrupt_teacher_without_tokenizer(bad_runs):
    assert_user_error(bad_runs["procs"]["bare"], str(bad_runs["inputs"]["bare"]))


def test_random_bytes_gguf(bad_runs):
    assert_user_error(bad_runs["procs"]["gguf"], str(bad_runs["inputs"]["gguf"]), "not a GGUF file")
    assert not list((bad_runs["root"] / "edgestill-cache").rglob("*.safetensors")), "nothing is cached from a bad GGUF"


def test_empty_corpus_folder(bad_runs):
    assert_user_error(bad_runs["procs"]["empty"], str(bad_runs["inputs"]["empty"]), "no .txt or .md")


def test_too_small_corpus(bad_runs):
    assert_user_error(bad_runs["procs"]["small"], "corpus too small")


def test_random_bytes_as_text(bad_runs):
    assert_user_error(bad_runs["procs"]["garbage"], str(bad_runs["inputs"]["garbage"] / "a.txt"), "does not look like text")


def test_invalid_config_json_is_named(bad_runs):
    assert_user_error(bad_runs["procs"]["bad_config"], str(bad_runs["inputs"]["bad_config"] / "config.json"),
                      "not valid JSON")


def test_an_impossible_budget_fails_before_measuring(bad_runs):
    assert_user_error(bad_runs["procs"]["budget"], "no student can meet the budget", "raise --max-memory to at least")
    assert "sensitivity" not in bad_runs["procs"]["budget"].stderr


def test_refused_runs_leave_no_partial_folders(bad_runs):
    """Every bad run above failed before doing any work: no `<out>.partial` (or parent folder) is left behind."""
    out = bad_runs["root"] / "out"
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert leftovers == [], leftovers


def test_unknown_config_key_suggests(bad_runs):
    msg = assert_user_error(bad_runs["procs"]["unknown_key"], "unknown config key 'distill.step'",
                            "did you mean 'distill.steps'")
    assert "edgestill config" in msg


def test_student_as_large_as_teacher(bad_runs):
    assert_user_error(bad_runs["procs"]["as_large"], "student.num_layers=4", "as large as the teacher")


def test_student_with_a_different_tokenizer(bad_runs, tiny_model_dir):
    from transformers import AutoTokenizer

    other = bad_runs["inputs"]["other_tokenizer"]
    assert AutoTokenizer.from_pretrained(other).get_vocab() != AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    assert_user_error(bad_runs["procs"]["other_tokenizer"], "tokenizers differ")


def test_bad_runs_leave_nothing_in_the_working_directory(bad_runs):
    assert not any(bad_runs["cwd"].iterdir())


def test_finished_run_is_kept_without_overwrite(bad_runs, tiny_model_dir, tiny_corpus, capsys):
    out = bad_runs["inputs"]["finished"]
    before = bad_runs["inputs"]["finished_before"]
    assert_user_error(bad_runs["procs"]["finished"], "already holds a finished run", "--overwrite")
    assert _snapshot(out) == before, "a refused run must leave the finished run untouched"
    assert (out / "metrics.json").stat().st_mtime_ns == before[Path("metrics.json")][1]

    # with --overwrite the same command replaces it
    assert main(["distill", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=2), "--overwrite"]) == 0
    capsys.readouterr()
    assert (out / "DONE").is_file() and (out / "student" / "model.safetensors").is_file()
    assert not out.with_name(out.name + ".partial").exists()
    assert not list(out.parent.glob(out.name + ".old-*")), "the replaced run is removed"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2], "the folder now holds the new run"
    assert not (out / "metrics.json").exists(), "the old run's files are replaced, not mixed in"


def test_a_sweep_names_a_format_it_cannot_plan_before_any_work(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--formats", "q4_0,q9_9", "--out", str(out),
                 *tiny_overrides(tiny_model_dir, tiny_corpus, tmp_path / "unused", steps=2)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "formats ['q9_9'] are not GGUF formats" in err and "q3_k" in err
    assert not out.exists()


def test_rerun_after_a_typo_in_the_teacher_path(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    """A run that failed before doing any work does not block the corrected command."""
    out = tmp_path / "run"
    assert main(["distill", *tiny_overrides(tmp_path / "typo", tiny_corpus, out, steps=2)]) == 2
    assert "not found" in capsys.readouterr().err
    rc = main(["distill", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=2)])
    assert rc == 0, capsys.readouterr().err
    assert (out / "DONE").is_file() and not out.with_name(out.name + ".partial").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["teacher"]["model"] == str(tiny_model_dir)
