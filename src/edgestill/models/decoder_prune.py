"""Pruning a decoder's FFN units by their activation on clean text: the "pruning" half of fine-pruning
([fine-pruning] in docs/references.md) for causal LM students, a backdoor defence (distill/fine_prune.py).

The encoder version (models/encoder_prune.py) ranks a BERT FFN's units by their mean activation after GELU. A
Llama-style block's FFN is gated, down_proj(act(gate_proj x) * up_proj x), and the product it feeds down_proj is
signed, so a unit's score here is its mean absolute value over the clean tokens. The units are cut out, not masked
(models/slice.narrow_ffn: gate and up lose rows, down loses columns) and config.intermediate_size shrinks, so the
pruned student saves, reloads, exports to GGUF and runs in llama.cpp like any sliced one. Every layer keeps the same
number of units (the config has one intermediate size).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgestill.errors import EdgestillError
from edgestill.models.encoder_prune import most_active
from edgestill.models.slice import narrow_ffn


def gated_mlps(model) -> list[nn.Module]:
    """The gated MLP of every decoder block (gate_proj, up_proj and down_proj as plain nn.Linear)."""
    layers = getattr(getattr(model, getattr(model, "base_model_prefix", "model"), model), "layers", None)
    mlps = [getattr(layer, "mlp", None) for layer in layers or []]
    if not mlps or not all(isinstance(getattr(m, name, None), nn.Linear)
                           for m in mlps for name in ("gate_proj", "up_proj", "down_proj")):
        raise EdgestillError(f"{model.__class__.__name__} has no dense gated FFN (model.layers[i].mlp.gate_proj / "
                             "up_proj / down_proj as plain Linear layers): fine-pruning a decoder supports Llama-style "
                             "students that are neither low-rank nor fake-quantized")
    return mlps


@torch.no_grad()
def ffn_mean_abs_activation(model, blocks: np.ndarray, batch_size: int = 8) -> list[torch.Tensor]:
    """Per block, each FFN unit's mean |act(gate) * up| (what down_proj reads) over every token of `blocks` (N, T)."""
    mlps = gated_mlps(model)
    if blocks.size == 0:
        raise EdgestillError("fine-pruning needs clean text with at least one token")
    sums: list[torch.Tensor | None] = [None] * len(mlps)

    def hook(i):
        def fn(module, inputs):
            s = inputs[0].detach().abs().float().sum(dim=(0, 1))
            sums[i] = s if sums[i] is None else sums[i] + s
        return fn

    handles = [m.down_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
    model.eval()
    try:
        for a in range(0, len(blocks), batch_size):
            model(input_ids=torch.from_numpy(blocks[a:a + batch_size]).long())
    finally:
        for h in handles:
            h.remove()
    return [s / float(blocks.size) for s in sums]


@torch.no_grad()
def prune_dormant_decoder_(model, blocks: np.ndarray, fraction: float) -> dict:
    """Remove the `fraction` least active FFN units of every decoder block (activation on clean `blocks`), in place.
    Returns a record (units before and after, the mean activation of what went and what stayed)."""
    mlps = gated_mlps(model)
    keep, record = most_active(ffn_mean_abs_activation(model, blocks), fraction)
    for mlp, k in zip(mlps, keep):
        narrow_ffn(mlp, torch.sort(k).values)
    model.config.intermediate_size = record["units_after"]
    return record
