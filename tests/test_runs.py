"""Run folders: partial -> final, never losing a finished run, resume vs. conflicting config."""

from __future__ import annotations

import pytest
import yaml

from edgestill.errors import EdgestillError
from edgestill.runs import DONE, RunDir

CFG = {"teacher": {"model": "m"}, "distill": {"steps": 5}, "eval": {"batch_size": 2}}


def _cfg(**distill):
    return {**CFG, "distill": {**CFG["distill"], **distill}}


def test_open_new_creates_partial_only(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, CFG)
    assert run.open() is False
    assert run.path == tmp_path / "run.partial"
    assert run.partial.is_dir()
    assert not out.exists()
    assert yaml.safe_load((run.partial / "config.yaml").read_text()) == CFG
    assert not (run.partial / "config.yaml.tmp").exists()


def test_finish_moves_partial_to_final_with_done(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, CFG)
    run.open()
    (run.path / "result.txt").write_text("42")
    assert run.finish() == out
    assert (out / DONE).is_file()
    assert (out / "result.txt").read_text() == "42"
    assert not run.partial.exists()
    assert not list(tmp_path.glob("run.old-*"))


def test_reopen_finished_without_overwrite_raises(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, CFG)
    run.open()
    run.finish()
    with pytest.raises(EdgestillError, match="already holds a finished run"):
        RunDir(out, CFG).open()
    assert (out / DONE).is_file()
    assert not (tmp_path / "run.partial").exists()


def _user_folder(out):
    """A folder of the user's that is not an edgestill run."""
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "x.csv").write_text("a,b\n1,2\n")


@pytest.mark.parametrize("overwrite", [False, True])
def test_overwrite_never_replaces_a_folder_that_is_not_a_run(tmp_path, overwrite):
    out = tmp_path / "run"
    _user_folder(out)
    with pytest.raises(EdgestillError, match="not an edgestill run.*never replaces other files, even with --overwrite"):
        RunDir(out, CFG, overwrite=overwrite).open()
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "sub" / "x.csv").is_file()
    assert not (tmp_path / "run.partial").exists()  # refused before any folder was made


def test_a_folder_with_a_stray_done_file_is_not_a_run(tmp_path):
    out = tmp_path / "run"
    _user_folder(out)
    (out / DONE).write_text("my own file")
    with pytest.raises(EdgestillError, match="not an edgestill run"):
        RunDir(out, CFG, overwrite=True).open()
    assert (out / "notes.txt").is_file()


def test_a_file_at_out_is_refused(tmp_path):
    (tmp_path / "run").write_text("data")
    with pytest.raises(EdgestillError, match="is a file"):
        RunDir(tmp_path / "run", CFG, overwrite=True).open()
    assert (tmp_path / "run").read_text() == "data"


def test_an_empty_out_folder_is_used(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    run = RunDir(out, CFG)
    run.open()
    (run.path / "result.txt").write_text("42")
    assert run.finish() == out
    assert (out / "result.txt").read_text() == "42" and (out / DONE).is_file()


def test_a_run_that_fails_before_any_work_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    run = RunDir(out, CFG)
    with pytest.raises(RuntimeError), run.cleanup_on_failure():
        run.open()
        raise RuntimeError("teacher not found")
    assert list(tmp_path.iterdir()) == []  # the partial folder and the parents it made are gone


def test_a_run_that_fails_after_work_keeps_its_partial_to_resume(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, CFG)
    with pytest.raises(RuntimeError), run.cleanup_on_failure():
        run.open()
        _add_checkpoint(run)
        raise RuntimeError("killed")
    assert (tmp_path / "run.partial" / "checkpoints" / "LATEST").is_file()
    assert RunDir(out, CFG).open() is True


def test_a_resumed_run_that_fails_is_never_discarded(tmp_path):
    out = tmp_path / "run"
    RunDir(out, CFG).open()  # a partial holding only its config (say, from an older edgestill)
    run = RunDir(out, CFG)
    with pytest.raises(RuntimeError), run.cleanup_on_failure():
        assert run.open() is True
        raise RuntimeError("boom")
    assert (tmp_path / "run.partial" / "config.yaml").is_file()


def test_overwrite_keeps_old_run_until_new_one_finishes(tmp_path):
    out = tmp_path / "run"
    first = RunDir(out, CFG)
    first.open()
    (first.path / "result.txt").write_text("old")
    first.finish()

    second = RunDir(out, _cfg(steps=9), overwrite=True)
    assert second.open() is False
    (second.path / "result.txt").write_text("new")
    # the new run is in progress (or was killed here): the old finished run is intact
    assert (out / DONE).is_file()
    assert (out / "result.txt").read_text() == "old"

    second.finish()
    assert (out / "result.txt").read_text() == "new"
    assert (out / DONE).is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["distill"]["steps"] == 9
    assert not second.partial.exists()
    assert not list(tmp_path.glob("run.old-*"))  # the replaced run was cleaned up


def test_partial_with_same_config_resumes(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, CFG)
    run.open()
    (run.path / "checkpoint").write_text("step 3")  # killed mid-run
    again = RunDir(out, CFG)
    assert again.open() is True
    assert (again.path / "checkpoint").read_text() == "step 3"  # nothing was wiped


def _add_checkpoint(run: RunDir) -> None:
    """Give a partial run some progress worth keeping (a checkpoint pointer)."""
    (run.path / "checkpoints").mkdir()
    (run.path / "checkpoints" / "LATEST").write_text("ckpt-000003")


def test_resume_ignores_resumable_sections(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, CFG)
    run.open()
    _add_checkpoint(run)
    changed_eval = {**CFG, "eval": {"batch_size": 64}}
    assert RunDir(out, changed_eval).open() is True
    # but not when `eval` is not declared resumable
    with pytest.raises(EdgestillError, match="different config"):
        RunDir(out, changed_eval, resumable_keys=()).open()


def test_partial_with_different_config_raises_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out, CFG)
    run.open()
    _add_checkpoint(run)

    with pytest.raises(EdgestillError, match="different config"):
        RunDir(out, _cfg(steps=6)).open()
    assert (run.path / "checkpoints" / "LATEST").is_file()  # refusing left the partial run alone

    fresh = RunDir(out, _cfg(steps=6), overwrite=True)
    assert fresh.open() is False
    assert not (fresh.path / "checkpoints").exists()  # started over
    assert yaml.safe_load((fresh.path / "config.yaml").read_text())["distill"]["steps"] == 6


def test_partial_without_progress_is_restarted_with_a_new_config(tmp_path):
    # A run that failed before any checkpoint or cache (say, a typo in the teacher path) holds
    # nothing worth keeping: the corrected command simply starts over.
    out = tmp_path / "run"
    RunDir(out, CFG).open()
    assert RunDir(out, _cfg(steps=6)).open() is False


def test_empty_partial_is_restarted(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "run.partial").mkdir()
    run = RunDir(out, CFG)
    assert run.open() is False
    assert (run.partial / "config.yaml").is_file()


def test_a_foreign_partial_folder_is_refused_and_kept(tmp_path):
    """`<out>.partial` holding someone's files (no marker, no config.yaml) is not ours to wipe."""
    partial = tmp_path / "run.partial"
    partial.mkdir()
    (partial / "junk").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(EdgestillError, match="not an unfinished edgestill run"):
            RunDir(tmp_path / "run", CFG, overwrite=overwrite).open()
    assert (partial / "junk").read_text() == "x"


def test_a_config_key_added_later_does_not_orphan_a_partial_run(tmp_path):
    """An interrupted run from an older edgestill (its config.yaml lacks a new key) still resumes."""
    old = {"distill": {"steps": 10}}
    new = {"distill": {"steps": 10, "loss": "forward_kl"}}
    run = RunDir(tmp_path / "r", old)
    run.open()
    (run.path / "cache").mkdir()
    (run.path / "cache" / "meta.json").write_text("{}")  # progress worth keeping
    assert RunDir(tmp_path / "r", new, defaults={"distill": {"loss": "forward_kl"}}).open() is True
    with pytest.raises(EdgestillError, match="different config"):  # a changed default is a different run
        RunDir(tmp_path / "r", {"distill": {"steps": 10, "loss": "jsd"}}, defaults={"distill": {"loss": "forward_kl"}}).open()


def test_any_stage_result_counts_as_progress_not_only_checkpoints(tmp_path):
    """A classifier run keeps a trained student/ and distill.json, never checkpoints/: still not wiped."""
    out = tmp_path / "run"
    run = RunDir(out, CFG)
    run.open()
    (run.path / "distill.json").write_text("{}")
    with pytest.raises(EdgestillError, match="different config"):
        RunDir(out, _cfg(steps=6)).open()
    assert (run.path / "distill.json").is_file()


def test_a_partial_holding_only_its_config_restarts_with_the_new_one(tmp_path):
    out = tmp_path / "run"
    RunDir(out, CFG).open()
    assert RunDir(out, _cfg(steps=6)).open() is False  # nothing to lose: started afresh
