"""Run folders that never lose a good result.

A run works in `<out>.partial/`. It is renamed to `<out>/` only when it has finished, so a
crash or kill leaves any earlier finished run untouched, and rerunning the same command resumes
the partial one. A finished run is replaced only with `--overwrite`, and only once the new run
has itself finished.

edgestill replaces or deletes only folders it made: a finished run (DONE + config.yaml) or a partial
one (the `.edgestill-run` marker, or config.yaml for runs older than the marker). Any other non-empty
folder at `--out` or `<out>.partial` is refused, whatever the flags. A run that fails before doing any
work removes its partial folder again (`cleanup_on_failure`), so a refused run leaves no litter.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from edgestill.errors import EdgestillError

DONE = "DONE"
MARKER = ".edgestill-run"  # written first into every run folder edgestill creates
_BOOKKEEPING = {"config.yaml", "config.yaml.tmp", MARKER}


def is_finished_run(folder: Path) -> bool:
    """A folder `RunDir.finish` made: it holds DONE and the run's config.yaml (or, newer, the marker)."""
    return (folder / DONE).is_file() and ((folder / "config.yaml").is_file() or (folder / MARKER).is_file())


def is_partial_run(folder: Path) -> bool:
    """A folder `RunDir.open` made: it holds the marker or the run's config.yaml (runs older than the marker)."""
    return (folder / MARKER).is_file() or (folder / "config.yaml").is_file()


def _is_empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not any(folder.iterdir())


class RunDir:
    def __init__(self, out: str | Path, config: dict, overwrite: bool = False, resumable_keys: tuple[str, ...] = ("eval",),
                 defaults: dict | None = None):
        self.final = Path(out)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.config = config
        self.overwrite = overwrite
        self.resumable_keys = resumable_keys  # sections that may change between a kill and a resume
        # A key that a newer edgestill added is missing from an older partial run's config.yaml:
        # it counts as holding its default, so upgrading does not orphan an interrupted run.
        self.defaults = defaults or {}
        self._created: list[Path] = []  # folders open() made (the partial and any missing parents)

    @property
    def path(self) -> Path:
        return self.partial

    def _comparable(self, cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if k not in self.resumable_keys}

    def _check_final(self) -> None:
        """Refuse an --out that is not ours to replace. `--overwrite` only ever replaces a finished edgestill run."""
        final = self.final
        if not final.exists():
            return
        if not final.is_dir():
            raise EdgestillError(f"output path '{final}' is a file, not a run folder; choose another --out")
        if is_finished_run(final):
            if not self.overwrite:
                raise EdgestillError(
                    f"output folder '{final}' already holds a finished run; pass --overwrite to replace it "
                    "(it is kept until the new run finishes) or choose another --out")
            return
        if not _is_empty_dir(final):
            raise EdgestillError(
                f"output folder '{final}' is not empty and is not an edgestill run; edgestill never replaces other "
                "files, even with --overwrite: choose another --out (a new or empty folder)")

    def open(self) -> bool:
        """Prepare the partial folder; True when an interrupted run is being resumed."""
        self._check_final()
        saved = self.partial / "config.yaml"
        if self.partial.exists():
            if not self.partial.is_dir() or not (is_partial_run(self.partial) or _only_bookkeeping(self.partial)):
                raise EdgestillError(
                    f"'{self.partial}' exists and is not an unfinished edgestill run; edgestill works in that folder "
                    "until a run finishes, so move it away or choose another --out")
        if saved.is_file():
            previous = _with_defaults(yaml.safe_load(saved.read_text()) or {}, self.defaults)
            if self._comparable(previous) == self._comparable(self.config):
                (self.partial / MARKER).touch()
                return True
            if not self.overwrite and self._has_progress():
                raise EdgestillError(
                    f"'{self.partial}' holds an unfinished run with a different config; rerun with the same "
                    "config to resume it, or pass --overwrite to start over"
                )
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self._created = [p for p in (self.partial, *self.partial.parents) if not p.exists()]
        self.partial.mkdir(parents=True)
        (self.partial / MARKER).write_text("an edgestill run folder (edgestill writes and replaces only folders with this file)\n")
        tmp = saved.with_name("config.yaml.tmp")
        tmp.write_text(yaml.safe_dump(self.config, sort_keys=False))
        os.replace(tmp, saved)
        return False

    def _has_progress(self) -> bool:
        """Whether the partial run holds work worth keeping: anything beyond its bookkeeping (a checkpoint,
        a teacher cache, a trained model or stage result of any job that works in a RunDir)."""
        return self.partial.is_dir() and not _only_bookkeeping(self.partial)

    def discard_if_empty(self) -> None:
        """Remove the partial folder (and the parents open() created) if it holds no work.

        A run refused or failed before doing any work (a missing teacher, a corpus too small) leaves the
        file system as it found it; a run with a checkpoint or cache stays, to be resumed.
        """
        if not self._created or self._has_progress():
            return
        shutil.rmtree(self.partial, ignore_errors=True)
        for folder in self._created[1:]:  # parents, innermost first
            if _is_empty_dir(folder):
                folder.rmdir()
        self._created = []

    @contextmanager
    def cleanup_on_failure(self):
        """`with run.cleanup_on_failure(): ...`: on any exception, discard the partial folder if it holds no work."""
        try:
            yield self
        except BaseException:
            self.discard_if_empty()
            raise

    def finish(self) -> Path:
        """Mark the partial run done and move it into place (replacing an older finished run or an empty folder)."""
        (self.partial / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
        old = None
        if self.final.exists():
            self._check_final()  # only ever a finished run (with --overwrite) or an empty folder
            old = self.final.with_name(self.final.name + f".old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.partial, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._created = []
        return self.final


def not_partial(run_dir: Path, command: str) -> Path:
    """`run_dir` unless it is an unfinished run, for which the error says how to finish it."""
    run_dir = Path(run_dir)
    if run_dir.name.endswith(".partial"):
        final = run_dir.with_name(run_dir.name[: -len(".partial")])
        raise EdgestillError(f"'{run_dir}' is an unfinished run (edgestill works in OUT.partial until a run finishes); "
                             f"rerun the command that started it, with --out {final}, to resume and finish it, then "
                             f"`edgestill {command} {final}`")
    partial = run_dir.with_name(run_dir.name + ".partial")
    if not run_dir.exists() and partial.is_dir():
        raise EdgestillError(f"'{run_dir}' has not finished yet (its work is in {partial}); rerun the command that "
                             f"started it, with --out {run_dir}, to resume and finish it")
    return run_dir


def finished_run(run_dir: Path, command: str, needs: tuple[str, ...] = ("student/config.json", "config.yaml")) -> Path:
    """`run_dir` if it is a finished run holding `needs`, else one line saying what is wrong or how to finish it."""
    run_dir = not_partial(run_dir, command)
    if not all((run_dir / name).is_file() for name in needs):
        raise EdgestillError(f"'{run_dir}' is not a finished edgestill run (no {' or '.join(needs)}); give the "
                             "folder that `edgestill shrink` or `edgestill distill` printed as its run folder")
    return run_dir


def _only_bookkeeping(folder: Path) -> bool:
    """No file in `folder` beyond the run's own bookkeeping (empty sub-folders, say a cache never filled, hold no work)."""
    return not any(p.is_file() and not (p.parent == folder and p.name in _BOOKKEEPING) for p in folder.rglob("*"))


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` with the keys it lacks taken from `defaults`, section by section."""
    merged = dict(saved)
    for key, value in defaults.items():
        if key not in merged:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = _with_defaults(merged[key], value)
    return merged


class WorkFolder:
    """A folder edgestill fills in place and resumes in place (a sweep): claimed only if empty or already ours.

    `open()` refuses a non-empty folder without `marker` (whatever the flags), creates the folder and its
    parents as needed and writes the marker. `cleanup_on_failure()` removes what open() created when the
    job fails before writing anything besides the marker.
    """

    def __init__(self, path: str | Path, marker: str, kind: str, legacy_files: tuple[str, ...] = ()):
        self.path, self.marker, self.kind, self.legacy_files = Path(path), marker, kind, legacy_files
        self._created: list[Path] = []

    def is_ours(self) -> bool:
        return any((self.path / name).is_file() for name in (self.marker, *self.legacy_files))

    def open(self) -> Path:
        if self.path.exists() and not self.path.is_dir():
            raise EdgestillError(f"output path '{self.path}' is a file, not a folder; choose another --out")
        if self.path.is_dir() and not self.is_ours() and not _is_empty_dir(self.path):
            raise EdgestillError(f"output folder '{self.path}' is not empty and is not an edgestill {self.kind} folder; "
                                 "edgestill never writes into other folders: choose another --out (a new or empty folder)")
        self._created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / self.marker).touch()
        return self.path

    @contextmanager
    def cleanup_on_failure(self):
        try:
            yield self.path
        except BaseException:
            if self._created and all(p.name == self.marker for p in self.path.iterdir()):
                shutil.rmtree(self.path, ignore_errors=True)
                for folder in self._created[1:]:
                    if _is_empty_dir(folder):
                        folder.rmdir()
            raise
