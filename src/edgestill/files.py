"""Writing files so that nothing is lost, and file-system failures as one line.

Every output edgestill writes appears whole or not at all: it is written under a temporary name next to
its destination and renamed over it (`os.replace` is atomic within a file system). When the write fails,
the temporary file or folder is removed and whatever was at the destination before is untouched.

When the operating system refuses a write (a read-only disk, no permission, no space left, a missing
folder), `os_error_line` turns the error into one line that names the path, the cause and the fix; the
CLI prints it instead of a traceback. Libraries that wrap their own I/O (safetensors, for one) report a
full disk as their own exception type: `writing()` recognises those too, by the OS error they carry.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from edgestill.errors import EdgestillError

# errno -> (what happened, what to do). `{path}` is the path that failed, `{where}` the folder to look at.
_CAUSES = {
    errno.EROFS: ("is on a read-only file system", "choose an output path on a writable disk"),
    errno.EACCES: ("is not writable (permission denied)", "choose an output path you can write to, or fix its permissions"),
    errno.EPERM: ("is not writable (operation not permitted)", "choose an output path you can write to, or fix its permissions"),
    errno.ENOSPC: ("is on a full disk (no space left on device)", "free space on that disk (df -h {where}) or choose an "
                   "output path on another disk; rerun the same command to resume"),
    errno.EDQUOT: ("is over its disk quota", "free space within your quota or choose an output path on another disk; "
                   "rerun the same command to resume"),
    errno.ENOENT: ("does not exist", "create the folder or check the path"),
    errno.ENOTDIR: ("has a file where a folder is needed", "choose another path"),
    errno.EISDIR: ("is a folder where a file is needed", "name a file, not a folder"),
    errno.ENAMETOOLONG: ("has a name that is too long", "choose a shorter path"),
}
HANDLED_ERRNOS = frozenset(_CAUSES)
# How libraries written in Rust/C++ (safetensors, tokenizers) spell an OS error inside their own exceptions.
# e.g. safetensors: 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'.
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)|Os \{ code: (\d+)|No space left on device|Read-only file system|"
                               r"Permission denied|Disk quota exceeded")
_TEXT_ERRNO = {"No space left on device": errno.ENOSPC, "Read-only file system": errno.EROFS,
               "Permission denied": errno.EACCES, "Disk quota exceeded": errno.EDQUOT}


def human_bytes(n: int | float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def free_bytes(path: str | Path) -> int:
    """Free bytes on the disk that holds `path` (or would hold it: its nearest existing folder)."""
    return shutil.disk_usage(_existing_ancestor(Path(path))).free


def os_error_line(code: int, path: str | Path, action: str = "", needed_bytes: int | None = None) -> str:
    """One line: the path, what went wrong, how many bytes were needed (when known), and the fix."""
    path = Path(path)
    where = _existing_ancestor(path.parent if path.suffix else path)
    cause, fix = _CAUSES.get(code, (os.strerror(code).lower(), "check the path"))
    if code == errno.ENOENT and not path.parent.exists():
        cause, fix = f"cannot be written: its folder '{path.parent}' does not exist", "create that folder or choose another path"
    size = ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(where)
        size = f" ({human_bytes(free)} free" + (f", {human_bytes(needed_bytes)} needed" if needed_bytes else "") + ")"
    doing = f" while {action}" if action else ""
    return f"'{path}' {cause}{doing}{size}; {fix.format(where=where)}"


def errno_of(exc: BaseException) -> int | None:
    """The OS error number behind `exc`: an OSError's own, or one a library's exception names in its text."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    match = _OS_ERROR_IN_TEXT.search(str(exc))
    if match is None:
        return None
    number = match.group(1) or match.group(2)
    return int(number) if number else _TEXT_ERRNO[match.group(0)]


def user_error(exc: BaseException, path: str | Path | None = None, action: str = "",
               needed_bytes: int | None = None) -> EdgestillError | None:
    """An EdgestillError for an OS failure the user can fix (see HANDLED_ERRNOS), else None (a bug)."""
    code = errno_of(exc)
    if code not in HANDLED_ERRNOS:
        return None
    path = path or getattr(exc, "filename", None) or "the output"
    return EdgestillError(os_error_line(code, path, action, needed_bytes))


@contextmanager
def writing(path: str | Path, action: str = "", needed_bytes: int | None = None):
    """Turn an OS failure inside the block into one EdgestillError line about `path` (others pass through)."""
    try:
        yield
    except EdgestillError:
        raise
    except Exception as e:
        err = user_error(e, path, action, needed_bytes)
        if err is None and needed_bytes is not None and free_bytes(path) < needed_bytes:
            # Some writers hide ENOSPC behind their own error (torch.save: "unexpected pos ..."); a failed write
            # to a disk that now has less room than the write needs ran out of space.
            err = EdgestillError(os_error_line(errno.ENOSPC, path, action, needed_bytes))
        if err is None:
            raise
        raise err from e


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, action: str = "", needed_bytes: int | None = None, is_dir: bool = False):
    """Yield a temporary path next to `path`; on success it is renamed over `path`, on failure removed.

    For a folder (is_dir=True) the temporary folder is created empty; an existing folder at `path` is
    replaced only after the new one is complete. OS failures become one EdgestillError line.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, action, needed_bytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        if is_dir:
            tmp.mkdir()
        try:
            yield tmp
            if is_dir and path.is_dir():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise


def write_text_atomic(path: str | Path, text: str, action: str = "") -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path, action or f"writing {Path(path).name}") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, obj, action: str = "") -> Path:
    """`obj` as indented JSON (anything JSON cannot hold written as its str), atomically."""
    import json

    return write_text_atomic(path, json.dumps(obj, indent=1, default=str) + "\n", action)


def ensure_free_space(path: str | Path, needed_bytes: int, action: str) -> None:
    """Refuse, before writing anything, when the disk holding `path` has less than `needed_bytes` free."""
    free = free_bytes(path)
    if free < needed_bytes:
        raise EdgestillError(os_error_line(errno.ENOSPC, path, action, needed_bytes))


def reserve(path: str | Path, nbytes: int, action: str) -> None:
    """Allocate `nbytes` of disk for the existing file `path` now (posix_fallocate).

    A file that is later written through a memory map must own its blocks: writing into a sparse file's
    hole on a full disk kills the process with SIGBUS, with no message. Reserving up front turns that
    into an ENOSPC here, reported as one line.
    """
    with writing(path, action, nbytes), open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: best effort
                raise
