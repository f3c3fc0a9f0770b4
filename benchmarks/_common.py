"""Helpers shared by the benchmark scripts: results are JSON files under benchmarks/results/."""

from __future__ import annotations

import json
import os
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
