"""Int8 quantization-aware training for a conv net that onnxruntime will run in static int8 (QDQ).

The fake quantization follows the grid of onnxruntime's `quantize_static(per_channel=True, weight_type=QInt8,
activation_type=QInt8)`, which export/onnx_vision.quantize_int8 then applies to the trained float weights:
- weights: symmetric int8 per output channel, scale = max |w| / 127, levels -127..127;
- activations: asymmetric int8 per tensor, [-128, 127] over a range that contains 0. The range is the running
  min / max of what the layer reads (EMA while training, frozen in eval), as MinMax calibration would find.
Rounding passes gradients straight through inside the range (torch's fake-quantize ops).

`prepare(model)` returns a copy whose Conv2d / Linear layers quantize their weights and inputs; `to_float`
copies the trained weights back into a plain model of the original class for export.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    scale = (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / 127).clamp_min(1e-12)
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, -127, 127)


class ActivationFakeQuant(nn.Module):
    def __init__(self, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            lo, hi = x.detach().min(), x.detach().max()
            if not bool(self.seen):
                self.lo.copy_(lo)
                self.hi.copy_(hi)
                self.seen.fill_(True)
            else:
                self.lo.mul_(self.momentum).add_((1 - self.momentum) * lo)
                self.hi.mul_(self.momentum).add_((1 - self.momentum) * hi)
        if not bool(self.seen):
            return x
        lo, hi = float(self.lo.clamp(max=0)), float(self.hi.clamp(min=0))
        scale = max((hi - lo) / 255, 1e-8)
        zero = int(min(127, max(-128, round(-128 - lo / scale))))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, -128, 127)


class QuantConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act(x), fake_quant_weight(self.weight), self.bias)


class QuantLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(x), fake_quant_weight(self.weight), self.bias)


def prepare(model: nn.Module) -> nn.Module:
    """A copy of `model` whose every Conv2d and Linear fake-quantizes its weights and its input."""
    qat = copy.deepcopy(model)
    for module in qat.modules():
        for name, child in module.named_children():
            kind = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}.get(type(child))
            if kind is not None:
                child.__class__ = kind
                child.add_module("act", ActivationFakeQuant())
    return qat


def to_float(qat: nn.Module, plain: nn.Module) -> nn.Module:
    """`plain` (a model of the original class) holding `qat`'s trained float weights."""
    state = {k: v for k, v in qat.state_dict().items() if ".act." not in k}
    plain.load_state_dict(state)
    return plain
