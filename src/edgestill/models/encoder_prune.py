"""Pruning an encoder's FFN units by their activation on clean text: the "pruning" half of fine-pruning
([fine-pruning] in docs/references.md), a backdoor defence.

A backdoor often lives in units that clean inputs leave dormant and the trigger wakes. Fine-pruning ranks the
FFN units of each layer by their mean activation (after the activation function) over the non-padding tokens of
clean text, removes the least active ones, then fine-tunes on clean labelled data (distill/classifier.py,
`fine_prune`). The units are cut out, not masked: each layer's intermediate dense loses rows and its output
dense loses columns (plain nn.Linear or LowRankLinear alike), and config.intermediate_size shrinks, so the
pruned model saves, reloads and exports like any other. Every layer keeps the same number of units (BERT's
config has one intermediate size).
"""

from __future__ import annotations

import torch
from torch import nn

from edgestill.errors import EdgestillError


def ffn_layers(model) -> list[nn.Module]:
    """The encoder layers of a BERT-style model (each with .intermediate.dense and .output.dense)."""
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None or not all(hasattr(x, "intermediate") and hasattr(x, "output") for x in layers):
        raise EdgestillError(f"{model.__class__.__name__} has no BERT-style FFN (encoder.layer[i].intermediate / "
                             "output); fine-pruning supports encoder classifiers")
    return list(layers)


@torch.no_grad()
def ffn_mean_activation(model, enc: dict, batch_size: int = 32) -> list[torch.Tensor]:
    """Per layer, each FFN unit's mean activation over the non-padding tokens of `enc` (numpy arrays)."""
    layers = ffn_layers(model)
    sums = [None] * len(layers)
    count = 0.0
    mask_now: list[torch.Tensor] = []

    def hook(i):
        def fn(module, inputs, output):
            m = mask_now[0].unsqueeze(-1).to(output.dtype)  # (B, T, 1)
            s = (output * m).sum(dim=(0, 1))
            sums[i] = s if sums[i] is None else sums[i] + s
        return fn

    handles = [layer.intermediate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    model.eval()
    try:
        n = len(enc["input_ids"])
        for a in range(0, n, batch_size):
            batch = {k: torch.from_numpy(v[a:a + batch_size]) for k, v in enc.items()}
            mask_now[:] = [batch["attention_mask"]]
            model(**batch)
            count += float(batch["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise EdgestillError("fine-pruning needs clean text with at least one token")
    return [s / count for s in sums]


def _rows(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep output units `keep` of a Linear or LowRankLinear."""
    if isinstance(layer, nn.Linear):
        layer.weight = nn.Parameter(layer.weight.data[keep].clone())
    else:
        layer.U = nn.Parameter(layer.U.data[keep].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.data[keep].clone())
    layer.out_features = len(keep)


def _columns(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep input units `keep` of a Linear or LowRankLinear."""
    if isinstance(layer, nn.Linear):
        layer.weight = nn.Parameter(layer.weight.data[:, keep].clone())
    else:
        layer.V = nn.Parameter(layer.V.data[:, keep].clone())
    layer.in_features = len(keep)


@torch.no_grad()
def cut_ffn_(model, keep: list[torch.Tensor]) -> None:
    """Keep FFN units `keep[i]` (sorted indices, the same count in every layer) of each layer, in place."""
    layers = ffn_layers(model)
    if len(keep) != len(layers) or len({len(k) for k in keep}) != 1 or len(keep[0]) == 0:
        raise EdgestillError("fine-pruning keeps the same, non-zero number of FFN units in every layer")
    for layer, k in zip(layers, keep):
        k = torch.sort(k).values
        _rows(layer.intermediate.dense, k)
        _columns(layer.output.dense, k)
    model.config.intermediate_size = len(keep[0])


def most_active(scores: list[torch.Tensor], fraction: float) -> tuple[list[torch.Tensor], dict]:
    """Per layer, the units to keep when the `fraction` least active (lowest score) go, the same count in every
    layer; and the record of what goes."""
    if not 0 < fraction < 1:
        raise EdgestillError(f"fine-pruning fraction {fraction} must be in (0, 1)")
    units = len(scores[0])
    kept = max(1, units - int(round(fraction * units)))
    order = [torch.argsort(s, descending=True) for s in scores]  # most active first
    keep, dropped = [o[:kept] for o in order], [o[kept:] for o in order]
    return keep, {"units_before": units, "units_after": kept, "fraction": fraction,
                  "mean_activation_of_pruned": [float(s[d].mean()) if len(d) else None for s, d in zip(scores, dropped)],
                  "mean_activation_of_kept": [float(s[k].mean()) for s, k in zip(scores, keep)]}


def prune_dormant_(model, enc: dict, fraction: float) -> dict:
    """Remove the `fraction` least active FFN units of every layer (activation on clean `enc`). Returns a record."""
    keep, record = most_active(ffn_mean_activation(model, enc), fraction)
    cut_ffn_(model, keep)
    return record
