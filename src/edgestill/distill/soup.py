"""A uniform model soup: several students distilled from the same cut with different seeds, their weights averaged
into one student of the same size ([soups] in docs/references.md).

    soup = (1/K) · Σ_k θ_k        θ_k: the student trained with seed train.seed + k, k = 0 .. K−1

Every ingredient starts from the same weights (the student cut from the teacher: sliced layers, trimmed vocabulary,
SVD factors, all copied, nothing random) and differs only in what the seed draws: the order of the batches, dropout,
the perturbed copies of `kd.augment`. Fine-tuned from one start, they stay in one basin of the loss, so their average
is a model of its own that usually scores above its ingredients; averaged from different starts (a different cut) it
would not be, which is why the cut is shared and `uniform_soup` refuses tensors whose names or shapes differ.

The soup costs K trainings and nothing at inference: the device loads one student of the ingredients' size. Only
floating-point tensors are averaged; integer buffers (position ids) must be equal in every ingredient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgestill.errors import EdgestillError

MAX_INGREDIENTS = 16


@dataclass
class SoupConfig:
    """A uniform soup of students (docs/classifier.md). ingredients >= 2 turns it on."""

    ingredients: int = 1  # students trained with seeds train.seed, train.seed + 1, ...; 1 = one student, no soup


def check_soup_config(cfg: SoupConfig, kd_method: str = "offline") -> None:
    """Refuse settings that cannot work, before any run folder is made."""
    if not 1 <= cfg.ingredients <= MAX_INGREDIENTS:
        raise EdgestillError(f"soup.ingredients={cfg.ingredients} must be between 1 (no soup) and {MAX_INGREDIENTS}: "
                             "the number of students trained with different seeds and averaged (2 or 3 is a sensible "
                             "start; each one costs a training)")
    if cfg.ingredients > 1 and kd_method == "mutual":
        raise EdgestillError("soup.ingredients > 1 with kd.method=mutual: each ingredient would learn beside its own "
                             "copy of the teacher, so they no longer share one reference; set kd.method=offline or "
                             "soup.ingredients=1")


def ingredient_seeds(seed: int, cfg: SoupConfig) -> list[int]:
    return [seed + k for k in range(cfg.ingredients)]


@torch.no_grad()
def uniform_soup(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of the floating-point tensors of `state_dicts` (the other tensors taken from the first, and checked
    equal in all). Raises when the ingredients do not share every tensor name and shape: they were not cut alike."""
    if not state_dicts:
        raise EdgestillError("a soup needs at least one ingredient")
    first = state_dicts[0]
    for k, sd in enumerate(state_dicts[1:], 1):
        if sd.keys() != first.keys():
            odd = sorted(set(sd) ^ set(first))[:3]
            raise EdgestillError(f"soup ingredient {k} has other tensors than ingredient 0 ({', '.join(odd)}): only "
                                 "students cut alike (same teacher, student settings and data) can be averaged")
        for name, t in sd.items():
            if t.shape != first[name].shape:
                raise EdgestillError(f"soup ingredient {k}: '{name}' is {tuple(t.shape)}, ingredient 0's is "
                                     f"{tuple(first[name].shape)}; only students cut alike can be averaged")
            if not t.is_floating_point() and not torch.equal(t, first[name]):
                raise EdgestillError(f"soup ingredient {k}: the integer tensor '{name}' differs from ingredient 0's")
    out = {}
    for name, t in first.items():
        if t.is_floating_point():
            out[name] = (sum(sd[name].double() for sd in state_dicts) / len(state_dicts)).to(t.dtype)
        else:
            out[name] = t.clone()
    return out
