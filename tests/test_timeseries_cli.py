"""`edgestill shrink --task timeseries` end to end on a small synthetic fleet: files, numbers, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

from edgestill.cli import main
from tests.data.test_timeseries import write_fleet

SMALL = ["data.window=16", "student.kernel=3", "student.channels=4", "student.hidden=8", "teacher.d_model=16",
         "teacher.layers=1", "teacher.heads=2", "teacher.ffn=32", "train.epochs=2", "train.batch_size=128",
         "eval.latency_windows=4", "eval.latency_repeats=1", "eval.plot_units=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("ts")
    data = write_fleet(root / "fleet.csv", units=12, life=(30, 50))
    out = root / "run"
    assert main(["shrink", "--task", "timeseries", "--data", str(data), "--out", str(out), *SMALL]) == 0
    return root, data, out


def test_run_writes_the_deployable_student_and_its_numbers(finished):
    _, _, out = finished
    for name in ("student.onnx", "student.f32.onnx", "teacher.onnx", "student.safetensors", "teacher.safetensors",
                 "series.json", "metrics.json", "report.md", "rul_test_units.png", "stream.png", "DONE"):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith("ckpt")]  # checkpoints go once the run is done
    m = json.loads((out / "metrics.json").read_text())
    assert m["kd"]["method"] == "mutual" and m["data"]["test_units"] >= 1
    test_ids = {"train": m["data"]["train_units"], "val": m["data"]["val_units"], "test": m["data"]["test_units"]}
    assert sum(test_ids.values()) == 12
    q = m["onnx"]["student_int8"]
    assert q["bytes"] == (out / "student.onnx").stat().st_size and q["test"]["n"] == m["student"]["test"]["n"]
    assert m["x_smaller"] == pytest.approx(m["onnx"]["teacher_f32"]["bytes"] / q["bytes"])
    assert any(i.data_type == onnx.TensorProto.INT8 for i in onnx.load(str(out / "student.onnx")).graph.initializer)
    assert len(m["stream"]["tenths"]) == 10 and m["stream"]["windows"] == m["student"]["test"]["n"]
    assert m["environment"]["threads"] == 2
    assert "student (int8, deployed)" in (out / "report.md").read_text()
    series = json.loads((out / "series.json").read_text())
    assert series["window"] == 16 and series["sensors"] == ["s1", "s2"] and len(series["normalizer"]["mean"]) == 2


def test_a_finished_run_is_not_replaced_without_overwrite(finished, capsys):
    _, data, out = finished
    before = (out / "metrics.json").read_bytes()
    assert main(["shrink", "--task", "timeseries", "--data", str(data), "--out", str(out), *SMALL]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("extra, match", [
    (["--teacher", "x"], "--teacher is not used with --task timeseries"),
    (["kd.method=distil"], "kd.method 'distil'"),
    (["data.window=5"], "shorter than the student's receptive field"),
    (["data.sensors=[s1,s7]"], r"sensor column\(s\) s7 missing"),
    (["train.lr_schedule=step"], "train.lr_schedule 'step': choose constant or cosine"),
    (["student.pool=max"], "student.pool 'max': choose mean or trend"),
])
def test_bad_input_one_line_and_no_folder(finished, tmp_path, capsys, extra, match):
    _, data, _ = finished
    out = tmp_path / "bad"
    assert main(["shrink", "--task", "timeseries", "--data", str(data), "--out", str(out), *SMALL, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0])
    assert not out.exists() and not (tmp_path / "bad.partial").exists()


def test_nan_in_the_csv_names_the_line(tmp_path, capsys):
    data = write_fleet(tmp_path / "f.csv", units=6, rows=["3,999,nan,0.1,0"])
    assert main(["shrink", "--task", "timeseries", "--data", str(data), "--out", str(tmp_path / "r"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "column 's1' is 'nan'" in err and "line" in err
    assert np.all([not p.name.startswith("r") for p in tmp_path.iterdir()])
