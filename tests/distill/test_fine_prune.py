"""Fine-pruning a decoder student: the cut, then clean fine-tuning that lowers the loss on the clean text, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_tiny_teacher

from edgestill.distill.classifier import FinePruneConfig
from edgestill.distill.fine_prune import fine_prune_lm
from edgestill.errors import EdgestillError


def clean_blocks() -> np.ndarray:
    pattern = np.random.default_rng(0).integers(3, 250, size=12)
    return np.tile(pattern, (8, 3))  # (8, 36): a repeated phrase, learnable in a few steps


def test_fine_pruning_cuts_units_then_fine_tunes_the_loss_down_and_is_seeded(tiny_model_dir, caplog):
    cfg = FinePruneConfig(fraction=0.25, steps=15, lr=3e-3, batch_size=4)
    models = [load_tiny_teacher(tiny_model_dir) for _ in range(2)]
    records = [fine_prune_lm(m, clean_blocks(), cfg, seed=3, show_progress=False) for m in models]
    r = records[0]
    assert r["units_before"] == 128 and r["units_after"] == 96 and models[0].config.intermediate_size == 96
    assert r["val_loss_after_fine_tune"] < min(r["val_loss_before"], r["val_loss_after_prune"]) - 0.5, r
    assert r["steps"] == 15 and r["batch_size"] == 4 and r["clean_blocks"] == 8 and r["epochs"] == 7.5
    assert "learn them by heart" in caplog.text  # 7.5 passes over 8 blocks: the user is told
    for a, b in zip(models[0].parameters(), models[1].parameters()):  # same seed, same batches, same weights
        torch.testing.assert_close(a, b)


def test_no_clean_blocks_is_refused():
    with pytest.raises(EdgestillError, match="validation blocks"):
        fine_prune_lm(None, np.zeros((0, 8), dtype=np.int64), FinePruneConfig(fraction=0.3))
