"""Fine-pruning's cut on a decoder: dormant FFN units leave physically, the model saves and reloads, removing units
that contribute nothing changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_tiny_teacher
from torch import nn

from edgestill.errors import EdgestillError
from edgestill.models.decoder_prune import ffn_mean_abs_activation, gated_mlps, prune_dormant_decoder_


def blocks(n: int = 6, t: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 250, size=(n, t))


def logits(model, ids: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids).long()).logits


def test_units_whose_gate_is_dead_score_zero_and_are_the_ones_cut_with_nothing_changed(tiny_model_dir, tmp_path):
    model = load_tiny_teacher(tiny_model_dir)
    units = model.config.intermediate_size
    dead = torch.arange(1, units, 4)  # silu(0) * up = 0: these units feed down_proj nothing on any input
    for mlp in gated_mlps(model):
        mlp.gate_proj.weight.data[dead] = 0
    ids = blocks()
    before = logits(model, ids)
    scores = ffn_mean_abs_activation(model, ids)
    assert all(float(s[dead].abs().max()) == 0 and float(s.max()) > 0 for s in scores)
    record = prune_dormant_decoder_(model, ids, len(dead) / units)
    assert record["units_before"] == units and record["units_after"] == units - len(dead)
    assert all(a == 0 for a in record["mean_activation_of_pruned"])
    assert model.config.intermediate_size == units - len(dead)
    assert all(m.gate_proj.out_features == m.up_proj.out_features == m.down_proj.in_features == units - len(dead)
               for m in gated_mlps(model))
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "pruned")  # the cut model is a plain smaller model of the same class
    reloaded = type(model).from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.intermediate_size == units - len(dead)
    torch.testing.assert_close(logits(reloaded, ids), before, atol=1e-5, rtol=1e-5)


def test_cutting_live_units_changes_the_output(tiny_model_dir):
    model = load_tiny_teacher(tiny_model_dir)
    ids = blocks()
    before = logits(model, ids)
    prune_dormant_decoder_(model, ids, 0.5)
    assert model.config.intermediate_size == 64
    assert not torch.allclose(logits(model, ids), before, atol=1e-4)


def test_a_model_without_a_dense_gated_ffn_or_text_is_refused(tiny_model_dir):
    model = load_tiny_teacher(tiny_model_dir)
    with pytest.raises(EdgestillError, match="at least one token"):
        prune_dormant_decoder_(model, np.zeros((0, 16), dtype=np.int64), 0.3)
    with pytest.raises(EdgestillError, match="must be in"):
        prune_dormant_decoder_(model, blocks(), 1.0)
    mlp = gated_mlps(model)[0]
    mlp.up_proj = nn.Sequential(mlp.up_proj)  # e.g. a low-rank or fake-quantized projection
    with pytest.raises(EdgestillError, match="no dense gated FFN"):
        prune_dormant_decoder_(model, blocks(), 0.3)
