"""Every result records where and how it was measured: commit, dirty tree, CPU model, threads, load before/after."""

from __future__ import annotations

import subprocess

from edgestill.evaluate.environment import environment, git_dirty, measurement_start


def test_a_record_carries_full_provenance():
    start = measurement_start()
    env = environment(2, start)
    for key in ("git_commit", "git_dirty", "date", "date_start", "cpu_model", "threads", "load_average_before",
                "load_average_after"):
        assert key in env, key
    assert env["threads"] == 2 and env["date_start"] == start["date_start"] <= env["date"]
    assert env["load_average_before"] == start["load_average_before"]
    assert isinstance(env["load_average_after"], list) and len(env["load_average_after"]) == 3
    assert env["cpu_model"], "the CPU model is read on Linux (/proc/cpuinfo)"
    # the kernels' instruction set: the same model name can mean AVX512 on one machine and AVX2 on the next
    assert isinstance(env["cpu_capability"], str) and env["cpu_capability"]


def test_a_record_without_a_start_says_so():
    env = environment(1)
    assert env["date_start"] is None and env["load_average_before"] is None and env["load_average_after"] is not None


def test_dirty_means_changed_code_not_a_benchmarks_own_results(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert git_dirty(tmp_path / "src") is False
    (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"new": 1}\n')
    (tmp_path / "untracked.py").write_text("")
    assert git_dirty(tmp_path / "src") is False  # its own output and untracked files are not dirt
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    assert git_dirty(tmp_path / "src") is True
