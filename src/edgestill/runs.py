"""Run folders that never lose a good result.

A run works in `<out>.partial/`. It is renamed to `<out>/` only when it has finished, so a
crash or kill leaves any earlier finished run untouched, and rerunning the same command resumes
the partial one. A finished run is replaced only with `--overwrite`, and only once the new run
has itself finished.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import yaml

from edgestill.errors import EdgestillError

DONE = "DONE"


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

    @property
    def path(self) -> Path:
        return self.partial

    def _comparable(self, cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if k not in self.resumable_keys}

    def open(self) -> bool:
        """Prepare the partial folder; True when an interrupted run is being resumed."""
        if (self.final / DONE).is_file() and not self.overwrite:
            raise EdgestillError(
                f"output folder '{self.final}' already holds a finished run; pass --overwrite to replace it "
                "(it is kept until the new run finishes) or choose another --out"
            )
        if self.final.exists() and not (self.final / DONE).is_file() and not self.overwrite:
            raise EdgestillError(f"output folder '{self.final}' exists and is not an edgestill run; choose another --out or pass --overwrite")
        saved = self.partial / "config.yaml"
        if saved.is_file():
            previous = _with_defaults(yaml.safe_load(saved.read_text()) or {}, self.defaults)
            if self._comparable(previous) == self._comparable(self.config):
                return True
            if not self.overwrite and self._has_progress():
                raise EdgestillError(
                    f"'{self.partial}' holds an unfinished run with a different config; rerun with the same "
                    "config to resume it, or pass --overwrite to start over"
                )
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        tmp = saved.with_name("config.yaml.tmp")
        tmp.write_text(yaml.safe_dump(self.config, sort_keys=False))
        os.replace(tmp, saved)
        return False

    def _has_progress(self) -> bool:
        """Whether the partial run holds work worth keeping: anything beyond its config.yaml (a checkpoint,
        a teacher cache, a trained model or stage result of any job that works in a RunDir)."""
        return any(p.name not in ("config.yaml", "config.yaml.tmp") for p in self.partial.iterdir())

    def finish(self) -> Path:
        """Mark the partial run done and move it into place (replacing an older finished run)."""
        (self.partial / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
        old = None
        if self.final.exists():
            old = self.final.with_name(self.final.name + f".old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.partial, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` with the keys it lacks taken from `defaults`, section by section."""
    merged = dict(saved)
    for key, value in defaults.items():
        if key not in merged:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = _with_defaults(merged[key], value)
    return merged
