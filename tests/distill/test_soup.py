"""The uniform soup: a mean of ingredients cut alike, refused for ingredients that were not."""

from __future__ import annotations

import pytest
import torch

from edgestill.distill.soup import SoupConfig, check_soup_config, ingredient_seeds, uniform_soup
from edgestill.errors import EdgestillError


def _sd(w: float, ids=(0, 1, 2)) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), w), "b": torch.tensor([w, -w]), "position_ids": torch.tensor(ids)}


def test_the_soup_is_the_mean_of_the_floats_and_keeps_the_integer_buffers():
    soup = uniform_soup([_sd(1.0), _sd(2.0), _sd(6.0)])
    torch.testing.assert_close(soup["w"], torch.full((2, 3), 3.0))
    torch.testing.assert_close(soup["b"], torch.tensor([3.0, -3.0]))
    assert torch.equal(soup["position_ids"], torch.tensor([0, 1, 2])) and soup["position_ids"].dtype == torch.int64
    assert soup["w"].dtype == torch.float32


def test_a_soup_of_one_is_that_ingredient():
    one = _sd(0.1234567)
    assert all(torch.equal(uniform_soup([one])[k], one[k]) for k in one)


def test_ingredients_that_were_not_cut_alike_are_refused():
    with pytest.raises(EdgestillError, match="other tensors than ingredient 0"):
        uniform_soup([_sd(1.0), {**_sd(1.0), "extra": torch.zeros(1)}])
    with pytest.raises(EdgestillError, match=r"'w' is \(3, 3\), ingredient 0's is \(2, 3\)"):
        uniform_soup([_sd(1.0), {**_sd(1.0), "w": torch.zeros(3, 3)}])
    with pytest.raises(EdgestillError, match="integer tensor 'position_ids' differs"):
        uniform_soup([_sd(1.0), _sd(1.0, ids=(0, 1, 3))])
    with pytest.raises(EdgestillError, match="at least one ingredient"):
        uniform_soup([])


def test_settings_are_checked():
    check_soup_config(SoupConfig())
    check_soup_config(SoupConfig(ingredients=3))
    check_soup_config(SoupConfig(), kd_method="mutual")  # no soup: mutual learning is fine
    for bad in (0, 17):
        with pytest.raises(EdgestillError, match=f"soup.ingredients={bad} must be between 1"):
            check_soup_config(SoupConfig(ingredients=bad))
    with pytest.raises(EdgestillError, match="kd.method=mutual"):
        check_soup_config(SoupConfig(ingredients=2), kd_method="mutual")
    assert ingredient_seeds(4, SoupConfig(ingredients=3)) == [4, 5, 6]
