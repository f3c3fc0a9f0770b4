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


def mean_std(xs) -> tuple[float | None, float | None]:
    """(mean, sample std) of the values that are not None; std 0 for one value, (None, None) for none."""
    xs = [x for x in xs if x is not None]
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (None, None)


def recorded_runs(path: Path, recipe: dict, key) -> dict:
    """key(row, run) -> each per-seed run the result JSON at `path` already holds, when it was written for the same
    `recipe` (every key of it equal): a benchmark continued on a machine whose run folders are gone keeps them, with
    the commit and machine that measured them. {} when there is no such file or the recipe differs."""
    if not path.is_file():
        return {}
    done = json.loads(path.read_text())
    if any(done.get(k) != v for k, v in recipe.items()):
        return {}
    return {key(row, run): run for row in done["rows"] for run in row["per_seed"]}
