"""edgestill.files: atomic writes that leave no half-written file, and OS failures as one line (injected here;
tests/test_faults.py meets them on real read-only and full tmpfs mounts)."""

from __future__ import annotations

import errno
import os

import pytest

from edgestill.errors import EdgestillError
from edgestill.files import atomic_path, ensure_free_space, errno_of, user_error, write_text_atomic, writing


@pytest.mark.parametrize("code, words", [
    (errno.EROFS, ["read-only file system", "writable disk"]),
    (errno.EACCES, ["permission denied", "fix its permissions"]),
    (errno.ENOSPC, ["full disk", "free", "df -h", "rerun the same command to resume"]),
    (errno.EDQUOT, ["disk quota"]),
])
def test_os_errors_become_one_line_naming_path_cause_and_fix(tmp_path, code, words):
    target = tmp_path / "run" / "student.gguf"
    err = user_error(OSError(code, os.strerror(code), str(target)), action="exporting")
    assert isinstance(err, EdgestillError)
    message = str(err)
    assert "\n" not in message and str(target) in message and "while exporting" in message
    for word in words:
        assert word in message


def test_a_missing_parent_folder_is_named(tmp_path):
    target = tmp_path / "no" / "such" / "x.json"
    message = str(user_error(OSError(errno.ENOENT, "No such file", str(target))))
    assert f"its folder '{target.parent}' does not exist" in message


def test_errors_of_other_kinds_stay_bugs():
    assert user_error(ValueError("shape mismatch")) is None
    assert user_error(OSError(errno.EIO, "I/O error")) is None


def test_a_libraries_wrapped_os_error_is_recognised():
    """safetensors reports a full disk as its own exception, with the OS error in the text."""
    assert errno_of(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")) == errno.ENOSPC
    assert errno_of(RuntimeError('IoError(Os { code: 30, kind: ReadOnlyFilesystem, message: "Read-only" })')) == errno.EROFS


def test_writing_names_the_destination_and_bytes_needed(tmp_path):
    with pytest.raises(EdgestillError, match=r"x\.bin' is on a full disk .* while saving .*needed"):
        with writing(tmp_path / "x.bin", "saving", needed_bytes=10**18):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_writing_infers_a_full_disk_behind_an_opaque_error(tmp_path):
    """torch.save on a full disk raises 'unexpected pos'; a disk with less room than the write needs explains it."""
    with pytest.raises(EdgestillError, match="full disk"):
        with writing(tmp_path / "optimizer.pt", "writing a checkpoint", needed_bytes=10**18):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room to spare it stays a bug
        with writing(tmp_path / "optimizer.pt", "writing a checkpoint", needed_bytes=1):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def test_atomic_file_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_atomic_folder_replaces_only_when_complete(tmp_path):
    target = tmp_path / "student"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, is_dir=True) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("disk full")
    assert (target / "model.safetensors").read_text() == "old"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert (target / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_write_text_atomic(tmp_path):
    assert write_text_atomic(tmp_path / "a" / "b.txt", "héllo").read_text(encoding="utf-8") == "héllo"


def test_ensure_free_space_refuses_before_writing(tmp_path):
    ensure_free_space(tmp_path, 1, "caching")
    with pytest.raises(EdgestillError, match="full disk .* while caching .*needed"):
        ensure_free_space(tmp_path, 10**18, "caching")


def test_an_error_after_a_progress_bar_starts_on_its_own_line():
    """A bar left open by an exception would carry the one-line error on the end of its line."""
    import io

    from tqdm import tqdm

    from edgestill.progress import close_progress_bars

    out = io.StringIO()
    bar = tqdm(total=10, file=out)
    bar.update(3)
    close_progress_bars()
    assert out.getvalue().endswith("\n") and bar.disable
