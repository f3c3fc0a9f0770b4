"""What every result records (docs/references.md#measurement-conventions): command, git commit and whether the
tree was dirty, date, CPU model and the vector instructions PyTorch's kernels use, threads, and the load average
before and after the measurement (timings taken on a busy machine are wrong, and the record says so).

The instruction set matters beyond speed: two machines that report the same model name ("AMD EPYC") may run
PyTorch's AVX512 kernels on one and its AVX2 kernels on the other, whose float sums round differently, and a small
model's training can end elsewhere after a few hundred steps of such differences.

    start = measurement_start()      # before the timed part
    ...
    record = environment(threads, start)
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def cpu_capability() -> str | None:
    """The vector instruction set PyTorch dispatches its CPU kernels to ("AVX512", "AVX2", "DEFAULT", ...)."""
    try:
        import torch

        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # an older torch without the query
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def llamacpp_extra_buffer_types() -> bool | None:
    """For a process that ran llama.cpp: whether it loaded models with llama.cpp's extra buffer types (AMX, repacked
    layouts; off on AMX builds, see runtime.llamacpp.uses_extra_buffer_types). None where llama.cpp was not used."""
    if "llama_cpp" not in sys.modules:
        return None
    from edgestill.runtime.llamacpp import uses_extra_buffer_types

    return uses_extra_buffer_types()


def measurement_start() -> dict:
    """The time and load average at the start of a measurement, for `environment(start=...)`."""
    return {"date_start": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_average_before": load_average()}


def git_dirty(repo: Path) -> bool | None:
    """Uncommitted changes to tracked files of the repository holding `repo`, except benchmark results: a benchmark
    writes its own plot or JSON before it records this, and those are its output, not the code that measured."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                              ":(top,exclude)benchmarks/results"], capture_output=True, text=True, timeout=5, cwd=repo)
    except Exception:
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def environment(threads: int | None = None, start: dict | None = None) -> dict:
    import torch

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                  cwd=Path(__file__).parent).stdout.strip() or None
        except Exception:
            return None

    commit = git("rev-parse", "HEAD")
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": commit,
        "git_dirty": None if commit is None else git_dirty(Path(__file__).parent),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "date_start": (start or {}).get("date_start"),
        "cpu_model": cpu_model(),
        "cpu_capability": cpu_capability(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "load_average_before": (start or {}).get("load_average_before"),
        "load_average_after": load_average(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_cores": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "llamacpp_extra_buffer_types": llamacpp_extra_buffer_types(),
    }
