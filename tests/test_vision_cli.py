"""`edgestill shrink --task vision` end to end: a small folder with a real paired view, the default MNIST with
its derived low-light view (quick profile), resume after a failure, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

from edgestill.cli import main
from edgestill.jobs import vision
from tests.data.test_images import _folder

SMALL = ["data.size=12", "data.heldout=[sea lion]", "data.second_view=ir", "teacher.widths=[4, 8]", "teacher.convs=1",
         "student.widths=[4]", "teacher_fit.epochs=2", "stage1.epochs=2", "stage2.epochs=1", "stage1.batch_size=4",
         "stage2.batch_size=4", "eval.latency_images=2", "eval.latency_repeats=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    data = _folder(root / "data", per=6)
    out = root / "run"
    assert main(["shrink", "--task", "vision", "--data", str(data), "--out", str(out), *SMALL]) == 0
    return data, out


def test_run_writes_every_model_and_its_zero_shot_numbers(finished):
    _, out = finished
    for name in ("teacher.onnx", "student_rgb_only.onnx", "edgevl_stage1.onnx", "edgevl_stage2.int8.onnx",
                 "edgevl_stage1.ptq.int8.onnx", "edgevl_stage2_noqat.ptq.int8.onnx", "class_embeddings.npy", "classes.json", "metrics.json", "report.md",
                 "zero_shot.png", "DONE"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["models"]) == list(vision.MODELS)
    assert m["data"]["second_modality"] == "real: ir/ paired folder"
    assert m["data"]["seen"] == ["cat", "dog"] and m["data"]["heldout"] == ["sea lion"]
    for name, row in m["models"].items():
        assert row["bytes"] == (out / row["file"]).stat().st_size
        assert row["compression_x"] == pytest.approx(m["models"]["teacher"]["bytes"] / row["bytes"])
        for view in ("first", "second"):
            z = row["zero_shot"][view]
            assert 0 <= z["seen"] <= 1 and z["heldout"] == 1.0  # one held-out class: always right
            assert z["n"] == {"seen": 2, "heldout": 6}  # 1 test image of each of the 2 seen classes
    assert not (out / "edgevl_stage2.onnx").exists() and not (out / "edgevl_stage2_noqat.onnx").exists()
    for name in ("edgevl_stage2.int8.onnx", "edgevl_stage1.ptq.int8.onnx", "edgevl_stage2_noqat.ptq.int8.onnx"):
        assert any(i.data_type == onnx.TensorProto.INT8 for i in onnx.load(str(out / name)).graph.initializer)
    emb = np.load(out / "class_embeddings.npy", allow_pickle=False)
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert "edgevl_stage2_int8" in (out / "report.md").read_text()


def test_the_default_data_runs_with_its_derived_low_light_view(tmp_path):
    out = tmp_path / "mnist"
    assert main(["shrink", "--task", "vision", "--quick", "--out", str(out), "stage1.epochs=1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["second_modality"].startswith("derived: low-light")
    assert m["data"]["images"] == {"train": 2450, "val": 350, "test_seen": 700, "test_heldout": 1500}


def test_a_failed_run_resumes_from_its_trained_models(tmp_path, monkeypatch, caplog):
    data = _folder(tmp_path / "data", per=6)
    out = tmp_path / "run"
    args = ["shrink", "--task", "vision", "--data", str(data), "--out", str(out), *SMALL]

    def fail(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(vision, "export_and_measure", fail)
    with pytest.raises(RuntimeError):
        main(args)
    partial = tmp_path / "run.partial"
    teacher = (partial / "teacher.safetensors").read_bytes()
    monkeypatch.undo()
    caplog.set_level("INFO")
    assert main(args) == 0
    assert "teacher: kept from the interrupted run" in caplog.text
    assert (out / "teacher.safetensors").read_bytes() == teacher and not partial.exists()


@pytest.mark.parametrize("case, extra, match", [
    ("ok", ["--teacher", "x"], "--teacher: not used with --task vision"),
    ("ok", ["stage1.second_share=2"], r"stage1.second_share=2.0 must be in \[0, 1\]"),
    ("ok", ["low_light.electrons_at_white=0"], "electrons_at_white"),
    ("ok", ["data.heldout=[zebra]"], "data.heldout names"),
    ("missing pair", [], "has no paired view"),
    ("no classes", [], "has no class folders"),
    ("unreadable", [], "cannot read image"),
    ("not a folder", [], "is neither mnist-5k nor a folder"),
])
def test_bad_input_one_line_and_no_folder(tmp_path, capsys, case, extra, match):
    data = tmp_path / "data"
    if case == "missing pair":
        _folder(data, drop=("ir", "dog", 1))
    elif case == "no classes":
        (data / "rgb").mkdir(parents=True)
    elif case != "not a folder":
        _folder(data)
    if case == "unreadable":
        (data / "rgb" / "dog" / "2.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "bad"
    assert main(["shrink", "--task", "vision", "--data", str(data), "--out", str(out), *SMALL, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err
    assert not out.exists() and not (tmp_path / "bad.partial").exists()
