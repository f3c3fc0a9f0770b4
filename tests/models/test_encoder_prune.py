"""Fine-pruning's cut: dormant FFN units leave physically, the model saves and reloads, removing units that
contribute nothing changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgestill.distill.classifier import FinePruneConfig, StudentConfig, build_student, fine_prune
from edgestill.errors import EdgestillError
from edgestill.evaluate.classification import predict_logits
from edgestill.models.encoder import load_encoder_classifier, save_classifier, tiny_encoder, tokenize
from edgestill.models.encoder_prune import cut_ffn_, ffn_layers, ffn_mean_activation, prune_dormant_
from edgestill.models.lowrank import LowRankLinear, stored_params
from tests.distill.test_classifier import make_data, splits  # noqa: F401  (the splits fixture)


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory, splits):  # noqa: F811
    folder = tiny_encoder(tmp_path_factory.mktemp("bert"), make_data(60, seed=9).texts)
    torch.manual_seed(0)
    model, tok, _ = load_encoder_classifier(str(folder), splits.label_map)
    return model, tok


def test_removing_units_that_contribute_nothing_changes_nothing(model_tok, splits):  # noqa: F811
    model, tok = model_tok
    import copy

    m = copy.deepcopy(model).eval()
    enc = tokenize(tok, splits.test.texts, 24)
    units = m.config.intermediate_size
    dead = torch.arange(0, units, 3)  # every third unit: its output column is zeroed
    for layer in ffn_layers(m):
        layer.output.dense.weight.data[:, dead] = 0
    before = predict_logits(m, enc)
    keep = torch.tensor([i for i in range(units) if i not in set(dead.tolist())])
    cut_ffn_(m, [keep] * len(ffn_layers(m)))
    assert m.config.intermediate_size == len(keep)
    for layer in ffn_layers(m):
        assert layer.intermediate.dense.weight.shape == (len(keep), m.config.hidden_size)
        assert layer.output.dense.weight.shape == (m.config.hidden_size, len(keep))
    np.testing.assert_allclose(predict_logits(m, enc), before, atol=1e-5)


def test_prune_dormant_keeps_the_most_active_units(model_tok, splits):  # noqa: F811
    model, tok = model_tok
    import copy

    m = copy.deepcopy(model)
    enc = tokenize(tok, splits.val.texts, 24)
    scores = ffn_mean_activation(m, enc)
    record = prune_dormant_(m, enc, 0.25)
    units = record["units_before"]
    assert record["units_after"] == units - round(0.25 * units) == m.config.intermediate_size
    for s, kept_mean, pruned_mean in zip(scores, record["mean_activation_of_kept"], record["mean_activation_of_pruned"]):
        assert pruned_mean < kept_mean
        assert kept_mean == pytest.approx(float(torch.topk(s, record["units_after"]).values.mean()), rel=1e-5)
    with pytest.raises(EdgestillError, match="must be in"):
        prune_dormant_(m, enc, 1.0)


def test_fine_pruned_factorized_student_saves_reloads_and_trains(model_tok, splits, tmp_path):  # noqa: F811
    model, tok = model_tok
    torch.manual_seed(0)
    student, s_tok, _, _ = build_student(model, tok, splits.train.texts,
                                         StudentConfig(num_layers=1, max_len=24, target_params=stored_params(model) // 3,
                                                       min_rank=2, multiple_of=1))
    assert any(isinstance(layer.intermediate.dense, LowRankLinear) for layer in ffn_layers(student))
    params = stored_params(student)
    record = fine_prune(student, s_tok, splits, FinePruneConfig(fraction=0.5, steps=5, lr=1e-3), 24)
    assert stored_params(student) < params and record["steps"] == 5
    assert set(record) >= {"val_before", "val_after_prune", "val_after_fine_tune"}
    out = save_classifier(student, s_tok, splits.label_map, tmp_path / "pruned")
    again, tok2, _ = load_encoder_classifier(str(out))
    enc = tokenize(tok2, splits.test.texts, 24)
    assert again.config.intermediate_size == student.config.intermediate_size
    np.testing.assert_allclose(predict_logits(again, enc), predict_logits(student, enc), atol=1e-6)
