"""Layer sensitivity: coarser formats hurt more, only the measured unit changes, weights come back exactly."""

from __future__ import annotations

import pytest
import torch

from edgestill.plan.sensitivity import Sensitivity, layer_sensitivity, mean_kl, unit_names
from edgestill.quant.fake_quant import QuantConfig, quantize_
from edgestill.quant.formats import format_by_name
from plan_fixtures import calib_batches, tiny2, tiny2_dir  # noqa: F401  (fixtures)


def test_coarser_formats_cost_more_kl_and_weights_are_restored(tiny2, calib_batches):
    before = {k: v.clone() for k, v in tiny2.state_dict().items()}
    sens = layer_sensitivity(tiny2, calib_batches, formats=("f16", "q8_0", "q4_0"))
    assert sens.units == unit_names(2) == ["model.layers.0", "model.layers.1", "lm_head"]
    for unit in sens.units:
        kl = sens.kl[unit]
        assert 0 <= kl["f16"] < kl["q8_0"] < kl["q4_0"]
    for k, v in tiny2.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert Sensitivity.from_dict(sens.to_dict()) == sens


def test_sensitivity_equals_kl_of_quantize_with_only_that_layer(tiny2, calib_batches):
    """The definition, s_l(b) = KL(teacher || model with only layer l at b), through the public quantize_ verb."""
    sens = layer_sensitivity(tiny2, calib_batches, formats=("q4_0",), units=["model.layers.1"])
    with torch.no_grad():
        reference = [tiny2(input_ids=ids).logits for ids in calib_batches]
    quantize_(tiny2, QuantConfig(default=None, plan={"re:model\\.layers\\.1\\.": format_by_name("q4_0")}), step="convert")
    direct = mean_kl(tiny2, calib_batches, reference)
    assert abs(sens.kl["model.layers.1"]["q4_0"] - direct) <= 1e-9 + 1e-6 * direct


def test_remap_follows_the_kept_teacher_layers(tiny2, calib_batches):
    sens = layer_sensitivity(tiny2, calib_batches, formats=("q4_0",))
    student = sens.remap([1])
    assert student.kl["model.layers.0"] == sens.kl["model.layers.1"] and student.kl["lm_head"] == sens.kl["lm_head"]


def test_a_file_measured_for_more_formats_is_read_for_fewer(tiny2, calib_batches, tmp_path, monkeypatch):
    """A sweep rerun with fewer formats reads them from the kept file; another teacher's file is measured again."""
    import json

    import edgestill.plan.sensitivity as sensitivity

    path = tmp_path / "sensitivity.json"
    key = {"formats": ["q8_0", "q4_0"], "teacher": "tiny", "calibration_tokens_sha256": "abc"}
    full = sensitivity.cached_sensitivity(tiny2, calib_batches, ("q8_0", "q4_0"), path, key)
    kept = path.read_text()

    def measured(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(sensitivity, "layer_sensitivity", measured)
    fewer = sensitivity.cached_sensitivity(tiny2, calib_batches, ("q4_0",), path, {**key, "formats": ["q4_0"]})
    assert fewer.formats == ["q4_0"] and fewer.units == full.units
    assert fewer.kl == {u: {"q4_0": d["q4_0"]} for u, d in full.kl.items()}
    assert path.read_text() == kept  # the whole file stays for the next run with every format

    monkeypatch.undo()
    other = sensitivity.cached_sensitivity(tiny2, calib_batches, ("q4_0",), path,
                                           {**key, "formats": ["q4_0"], "teacher": "other"})
    assert json.loads(path.read_text())["key"]["teacher"] == "other" and other.formats == ["q4_0"]
    monkeypatch.setattr(sensitivity, "layer_sensitivity", measured)
    with pytest.raises(AssertionError, match="measured again"):  # a format the file lacks
        sensitivity.cached_sensitivity(tiny2, calib_batches, ("q8_0",), path,
                                       {**key, "formats": ["q8_0"], "teacher": "other"})
