"""Faults a user meets, end to end on the tiny model: a folder that is not a run, a read-only or full disk.

Each must end in one `edgestill: error:` line and exit 2, lose nothing, and leave no litter. The disk faults
are real: a small tmpfs is mounted (read-only, or too small for the next write) where the test can mount
one (root on Linux); elsewhere those tests are skipped, and tests/test_files.py still covers the error
translation with injected errors.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from conftest import tiny_overrides  # tests/ is on sys.path
from edgestill.cli import main


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("edgestill: error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in: {lines[0]}"
    return lines[0]


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int, read_only: bool = False):
    """A tmpfs of `size_kb` at `path` for the duration (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kb}k" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()[:80]}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGESTILL_CACHE", str(out.parent / "cache"))
        assert main(["distill", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=2)]) == 0
    return out


# --- --overwrite and folders that are not runs ---------------------------------------------------------------

@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_overwrite_never_deletes_a_users_folder(tiny_model_dir, tiny_corpus, tmp_path, capsys, flags):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "x.csv").write_text("a,b\n")
    assert main(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=2), *flags]) == 2
    _one_error_line(capsys, str(out), "not an edgestill run", "never replaces other files")
    assert (out / "notes.txt").read_text() == "keep me" and (out / "sub" / "x.csv").is_file()
    assert _files(tmp_path) == ["mine", "mine/notes.txt", "mine/sub", "mine/sub/x.csv"]  # no .partial either


def test_sweep_refuses_a_users_folder_and_overwrite(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    base = tiny_overrides(tiny_model_dir, tiny_corpus, tmp_path / "ignored", steps=2)
    assert main(["sweep", "--out", str(out), *base]) == 2
    _one_error_line(capsys, str(out), "not an edgestill sweep folder")
    assert main(["sweep", "--out", str(tmp_path / "new"), "--overwrite", *base]) == 2
    _one_error_line(capsys, "no --overwrite", "new --out")
    assert _files(tmp_path) == ["mine", "mine/notes.txt"]


def test_a_failed_sweep_leaves_no_folder(tmp_path, tiny_corpus, capsys):
    out = tmp_path / "a" / "sweep"
    assert main(["sweep", "--out", str(out), f"teacher.model={tmp_path / 'typo'}", f"data.path={tiny_corpus}"]) == 2
    _one_error_line(capsys, "not found")
    assert _files(tmp_path) == []


def test_eval_and_export_of_an_unfinished_run_say_how_to_finish_it(finished_run, tmp_path, capsys):
    partial = tmp_path / "run.partial"
    partial.mkdir()
    for command in (["eval", str(partial)], ["export", str(partial)]):
        assert main(command) == 2
        _one_error_line(capsys, "unfinished run", f"--out {tmp_path / 'run'}")
    assert main(["eval", str(tmp_path / "run")]) == 2  # the final name, while only the partial exists
    _one_error_line(capsys, "has not finished", f"--out {tmp_path / 'run'}")


# --- a read-only disk ------------------------------------------------------------------------------------------

def test_shrink_into_a_read_only_folder(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", 64, read_only=True) as ro:
        out = ro / "run"
        assert main(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=2)]) == 2
        _one_error_line(capsys, "read-only file system", str(ro))
        assert _files(ro) == []


def test_export_into_a_read_only_folder(finished_run, tmp_path, capsys):
    before = _files(finished_run)
    with tmpfs(tmp_path / "ro", 64, read_only=True) as ro:
        assert main(["export", str(finished_run), "--out", str(ro / "x.gguf")]) == 2
        _one_error_line(capsys, "read-only file system", str(ro / "x.gguf"))
    assert _files(finished_run) == before


# --- a full disk -----------------------------------------------------------------------------------------------

def test_full_disk_before_the_teacher_cache(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    """The cache (~95 KB here) does not fit: refused before it is memory-mapped (a full disk there was a SIGBUS)."""
    with tmpfs(tmp_path / "disk", 48) as disk:
        out = disk / "run"
        assert main(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=2)]) == 2
        _one_error_line(capsys, "full disk", "teacher's top-k cache", "needed", "df -h")
        assert _files(disk) == [], "nothing worth resuming was made, so nothing is left"


def test_full_disk_at_a_checkpoint_then_resume(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    """The first checkpoint (~1 MB) does not fit: one line, no half-written checkpoint; more room, and it resumes."""
    with tmpfs(tmp_path / "disk", 400) as disk:
        out = disk / "run"
        argv = ["distill", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=4)]
        assert main(argv) == 2
        _one_error_line(capsys, "full disk", "checkpoint", "rerun the same command to resume")
        partial = disk / "run.partial"
        assert (partial / "cache" / "teacher_topk" / "meta.json").is_file(), "the teacher cache is kept"
        assert not [p for p in partial.rglob("*") if ".tmp-" in p.name], "no half-written checkpoint is left"
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        assert main(argv) == 0
        capsys.readouterr()
        assert (out / "DONE").is_file() and (out / "student" / "model.safetensors").is_file()


def test_full_disk_at_the_student_save(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", 1650) as disk:  # the cache, the last and the best checkpoint fit, the student not
        out = disk / "run"
        argv = ["distill", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=2)]
        assert main(argv) == 2
        _one_error_line(capsys, "full disk", "saving the student", "needed")
        assert not (disk / "run.partial" / "student").exists()
        assert not [p for p in (disk / "run.partial").rglob("*") if ".tmp-" in p.name]


def test_the_cache_reserves_its_disk_blocks_so_a_full_disk_is_no_sigbus(tmp_path, monkeypatch):
    """Even when the free-space check is fooled (another process fills the disk), the arrays' blocks are reserved
    before they are memory-mapped: the error is ENOSPC as one line, not a SIGBUS at some later write."""
    import numpy as np

    from edgestill.distill import teacher_cache
    from edgestill.errors import EdgestillError

    monkeypatch.setattr(teacher_cache, "ensure_free_space", lambda *a, **k: None)
    with tmpfs(tmp_path / "disk", 64) as disk:
        shapes = {"topk_logprobs.npy": ((64, 31, 32), np.float16), "topk_ids.npy": ((64, 31, 32), np.int32)}
        with pytest.raises(EdgestillError, match="full disk"):
            teacher_cache._create_arrays(disk, shapes)
        assert _files(disk) == [], "no sparse array is left behind"
