"""Helpers shared by the benchmark scripts: results are JSON files under benchmarks/results/."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# Overrides that shorten the parts of a run's report a benchmark does not read (speed repeats, sample generations).
EVAL_LIGHT = ["eval.speed_repeats=1", "eval.generate_tokens=8"]


# Captured when a benchmark script imports this module, i.e. when it starts: the load average before it ran.
try:
    from edgestill.evaluate.environment import measurement_start

    START = measurement_start()
except ImportError:  # edgestill not installed: write_result will say so
    START = None


def write_result(name: str, data: dict) -> Path:
    from edgestill.evaluate.environment import environment

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, **data, "environment": data.get("environment") or environment(start=START)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def write_track(name: str, track: str, data: dict) -> Path:
    """One track's result (its settings and rows) written into RESULTS/<name>.json beside the other tracks there, so
    that one file holds every track of a benchmark (the audit's `classifier` and `lm`). The file: `tracks` maps each
    track to its settings and environment; `rows` holds every track's rows, each with its `track`; `environment` at
    the top is that of the latest write (each track's own stays in `tracks`). Locked against another writer, written
    atomically."""
    import fcntl

    from edgestill.evaluate.environment import environment

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    with open(path.with_suffix(".json.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.is_file() else {}
        tracks = {t: track_view(old, t) for t in old.get("tracks", {}) if t != track}
        env = data.get("environment") or environment(start=START)
        tracks[track] = {**data, "environment": env}
        payload = {"benchmark": name, "tracks": {t: {k: v for k, v in view.items() if k != "rows"}
                                                 for t, view in sorted(tracks.items())},
                   "rows": [{"track": t, **row} for t, view in sorted(tracks.items()) for row in view["rows"]],
                   "environment": env}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
    print(f"wrote {path} (track {track})")
    return path


def track_view(result: dict, track: str) -> dict | None:
    """One track of a write_track file as a result of its own: its settings, environment and rows (None when the file
    has no such track). A file of one track written before write_track (its `track` at the top) reads as that track."""
    if "tracks" not in result:
        return result if result.get("track") == track else None
    if track not in result["tracks"]:
        return None
    rows = [{k: v for k, v in row.items() if k != "track"} for row in result["rows"] if row.get("track") == track]
    return {"benchmark": result.get("benchmark"), **result["tracks"][track], "rows": rows}


def mean_std(xs) -> tuple[float | None, float | None]:
    """(mean, sample std) of the values that are not None; std 0 for one value, (None, None) for none."""
    xs = [x for x in xs if x is not None]
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (None, None)


def recorded_runs(path: Path, recipe: dict, key, track: str | None = None) -> dict:
    """key(row, run) -> each per-seed run the result JSON at `path` already holds (of `track`, in a write_track file),
    when it was written for the same `recipe` (every key of it equal): a benchmark continued on a machine whose run
    folders are gone keeps them, with the commit and machine that measured them. {} when there is no such file or
    track, or the recipe differs."""
    if not path.is_file():
        return {}
    done = json.loads(path.read_text())
    if track is not None:
        done = track_view(done, track)
    if done is None or any(done.get(k) != v for k, v in recipe.items()):
        return {}
    return {key(row, run): run for row in done["rows"] for run in row["per_seed"]}
