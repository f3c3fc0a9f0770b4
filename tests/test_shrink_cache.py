"""A run may start from another run's teacher cache (a sweep's points share it); a foreign cache is rebuilt."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_overrides
from edgestill.config import load_config
from edgestill.jobs.shrink import distill as distill_run


def _fail(*a, **k):
    raise AssertionError("the teacher ran again although the cache of an earlier run was given")


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "first"
    run, _ = distill_run(load_config(overrides=tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=1)))
    return run.path


def test_a_second_run_starts_from_the_first_runs_cache(first_run, tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr("edgestill.distill.teacher_cache.teacher_topk", _fail)
    cfg = load_config(overrides=[*tiny_overrides(tiny_model_dir, tiny_corpus, tmp_path / "second", steps=1),
                                 "student.num_layers=3"])  # another student, same teacher and text
    run, _ = distill_run(cfg, teacher_cache_from=first_run)
    meta = json.loads((run.path / "cache" / "teacher_topk" / "meta.json").read_text())
    assert meta == json.loads((first_run / "cache" / "teacher_topk" / "meta.json").read_text())


def test_a_cache_of_other_settings_is_rebuilt_not_trusted(first_run, tiny_model_dir, tiny_corpus, tmp_path):
    cfg = load_config(overrides=[*tiny_overrides(tiny_model_dir, tiny_corpus, tmp_path / "other", steps=1),
                                 "distill.top_k=4"])
    run, _ = distill_run(cfg, teacher_cache_from=first_run)
    meta = json.loads((run.path / "cache" / "teacher_topk" / "meta.json").read_text())
    assert meta["k"] == 4 and meta["rows_done"] == meta["rows"]
    assert meta["fingerprint"] != json.loads((first_run / "cache" / "teacher_topk" / "meta.json").read_text())["fingerprint"]
