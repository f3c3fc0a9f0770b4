"""The server's aggregation of client logits: each method against a hand computation, and a malicious client's
share under the robust ones."""

from __future__ import annotations

import pytest
import torch

from edgestill.errors import EdgestillError
from edgestill.federated.aggregate import aggregate_logits, check_aggregation


def _logits(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


# 4 clients, 1 text, 2 labels: three agree on label 0, the fourth (malicious) insists on label 1
HONEST_AND_ONE_LIAR = _logits([[[0.9, 0.1]], [[0.8, 0.2]], [[0.7, 0.3]], [[0.01, 0.99]]])


def test_mean_is_the_average_of_probabilities():
    target, share = aggregate_logits(HONEST_AND_ONE_LIAR, "mean")
    expected = torch.tensor([0.9 + 0.8 + 0.7 + 0.01, 0.1 + 0.2 + 0.3 + 0.99]) / 4
    assert torch.allclose(target.exp()[0], expected, atol=1e-6)
    assert torch.allclose(share, torch.full((4,), 0.25))


def test_median_and_trimmed_mean_drop_the_extremes_per_label():
    for method in ("median", "trimmed_mean"):  # 4 clients: the median is the mean of the middle two
        target, share = aggregate_logits(HONEST_AND_ONE_LIAR, method, trim=1)
        kept = torch.tensor([(0.8 + 0.7) / 2, (0.2 + 0.3) / 2])
        assert torch.allclose(target.exp()[0], kept / kept.sum(), atol=1e-6)
        assert share[3] == 0  # the liar is the extreme of both labels: never kept
        assert torch.isclose(share.sum(), torch.tensor(1.0))


def test_agreement_gives_the_odd_one_out_the_smallest_weight():
    target, share = aggregate_logits(HONEST_AND_ONE_LIAR, "agreement", tau=0.1)
    assert share.argmin() == 3 and share[3] < 0.05
    mean, _ = aggregate_logits(HONEST_AND_ONE_LIAR, "mean")
    assert target.exp()[0, 1] < mean.exp()[0, 1]  # the liar's label gets less mass than under the mean


def test_bad_settings_are_refused():
    with pytest.raises(EdgestillError, match="unknown"):
        check_aggregation("mode", 4, 1)
    with pytest.raises(EdgestillError, match="at least 3 clients"):
        check_aggregation("median", 2, 1)
    with pytest.raises(EdgestillError, match="trim=2"):
        check_aggregation("trimmed_mean", 4, 2)
