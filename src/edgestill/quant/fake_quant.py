"""Quantization-aware training and freezing: `quantize_(model, QuantConfig(...), step=...)`.

torchao's two-step verb. `step="prepare"` swaps every selected nn.Linear for a FakeQuantLinear
that multiplies with `fmt.fake_quant(weight)`, recomputed from the live weights each forward, and
passes gradients straight through to the float weights (STE, Bengio et al. 2013,
arXiv:1308.3432). Train as usual. `step="convert"` then writes the exact dequantized values into
the weights and puts plain nn.Linear modules back, so the model computes what the runtime will.
Convert on a model that was never prepared is post-training quantization: same values, no QAT.

Which format a Linear gets: a `skip` entry wins, then the first `plan` entry that matches, then
`default` (None leaves unmatched layers in float). A name is a module's qualified name
(`model.layers.0.mlp.down_proj`); a `re:` prefix makes it a regex matched from the start of the
name with re.match (llm-compressor's convention), e.g. `re:.*mlp\\.down_proj`. A plan or skip entry
that matches no Linear is an error (a typo would otherwise quantize with the default).

Tied embeddings: when the Linear's weight is shared with an nn.Embedding (a tied lm_head), the
stored tensor is one (GGUF keeps only token_embd.weight), so the embedding gets the same format:
prepare wraps it in FakeQuantEmbedding, convert freezes the shared weight once. An untied
embedding is not a Linear and stays in float.

Each call returns a report: one LayerReport per selected Linear with its shape, requested and
actual format, the fallback reason if they differ (see formats.resolve_format), and its bytes.

Sample:
    config = QuantConfig(default=GGUFQ4_K(), plan={"re:.*mlp\\.down_proj": GGUFQ8_0(), "lm_head": GGUFQ8_0()})
    report = quantize_(model, config, step="prepare")
    ... train ...
    quantize_(model, config, step="convert")

Dtypes: fake-quant values are computed in float32. In a float32 model they are exactly the
runtime's values; in an fp16/bf16 model they are rounded once more to the weights' dtype.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgestill.errors import EdgestillError
from edgestill.quant.formats import (
    FORMATS,
    GGUFQ8_0,
    Format,
    format_from_dict,
    format_to_dict,
    resolve_format,
)


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly fmt.fake_quant(w). Backward: the identity.

    The usual `w + (w_hat - w).detach()` has the same gradient, but its float32 forward can miss
    w_hat by a rounding (1.0 + (1e-8 - 1.0) is 0.0), and parity here is bit for bit.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, fmt: Format) -> torch.Tensor:
        return fmt.fake_quant(weight).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_quant_ste(weight: torch.Tensor, fmt: Format) -> torch.Tensor:
    """fmt.fake_quant(weight) in the forward pass, identity gradient to `weight` in the backward pass."""
    return _StraightThrough.apply(weight, fmt)


class FakeQuantLinear(nn.Linear):
    """An nn.Linear that multiplies with its weight fake-quantized to `fmt` (scales from the live weight).

    It holds the original module's Parameters, not copies: ties, optimizer state and state-dict
    keys (`weight`, `bias`) are unchanged.
    """

    def __init__(self, linear: nn.Linear, fmt: Format):
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate new parameters
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.fmt = fmt
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant_ste(self.weight, self.fmt), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fmt={self.fmt}"


class FakeQuantEmbedding(nn.Embedding):
    """An nn.Embedding whose (tied) weight is fake-quantized like the Linear it is shared with."""

    def __init__(self, embedding: nn.Embedding, fmt: Format):
        nn.Module.__init__(self)
        for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, name, getattr(embedding, name))
        self.weight = embedding.weight
        self.fmt = fmt
        self.train(embedding.training)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, fake_quant_ste(self.weight, self.fmt), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


def _plain_linear(module: nn.Linear) -> nn.Linear:
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight, linear.bias = module.weight, module.bias
    return linear.train(module.training)


def _plain_embedding(module: nn.Embedding) -> nn.Embedding:
    emb = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                       max_norm=module.max_norm, norm_type=module.norm_type,
                       scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse, device="meta")
    emb.weight = module.weight
    return emb.train(module.training)


# --- which format each Linear gets --------------------------------------------------------------------

def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


@dataclass
class QuantConfig:
    """Weight formats per Linear: `skip` first, then the first matching `plan` entry, then `default`."""

    default: Format | None = field(default_factory=GGUFQ8_0)
    plan: dict[str, Format] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)

    def __post_init__(self):
        for where, fmt in [("default", self.default), *((f"plan[{p!r}]", f) for p, f in self.plan.items())]:
            if fmt is not None and not isinstance(fmt, FORMATS):
                names = ", ".join(cls.__name__ for cls in FORMATS)
                raise EdgestillError(f"QuantConfig.{where} = {fmt!r} is not a format; use a config such as "
                                     f"GGUFQ4_K() (one of {names})")

    def format_for(self, name: str) -> Format | None:
        if any(_matches(pattern, name) for pattern in self.skip):
            return None
        for pattern, fmt in self.plan.items():
            if _matches(pattern, name):
                return fmt
        return self.default

    def to_dict(self) -> dict[str, Any]:
        return {
            "default": None if self.default is None else format_to_dict(self.default),
            "plan": {pattern: format_to_dict(fmt) for pattern, fmt in self.plan.items()},
            "skip": list(self.skip),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise EdgestillError(f"unknown QuantConfig keys {sorted(unknown)}; expected default, plan, skip")
        default = data.get("default", format_to_dict(GGUFQ8_0()))
        return cls(
            default=None if default is None else format_from_dict(default),
            plan={pattern: format_from_dict(fmt) for pattern, fmt in (data.get("plan") or {}).items()},
            skip=list(data.get("skip") or []),
        )


@dataclass(frozen=True)
class LayerReport:
    """What one Linear became: `fmt` is what is stored, `requested` what the config asked for."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    requested: Format
    fmt: Format
    fallback: str | None  # why fmt is not requested
    weight_bytes: int  # the stored weight with its scales (bias and norms not counted)
    tied: tuple[str, ...] = ()  # embeddings sharing this weight (stored once)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / (self.shape[0] * self.shape[1])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "requested": format_to_dict(self.requested),
                "format": format_to_dict(self.fmt), "fallback": self.fallback,
                "weight_bytes": self.weight_bytes, "bits_per_weight": self.bits_per_weight,
                "tied": list(self.tied)}


def _check_patterns_used(config: QuantConfig, names: list[str]) -> None:
    for kind, patterns in (("plan", list(config.plan)), ("skip", config.skip)):
        for pattern in patterns:
            if not any(_matches(pattern, name) for name in names):
                close = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=3)
                hint = f"did you mean {', '.join(close)}?" if close else f"Linears look like {names[:3]}"
                raise EdgestillError(f"QuantConfig.{kind} entry {pattern!r} matches no nn.Linear; {hint}")


def _tied_embeddings(model: nn.Module) -> dict[int, list[tuple[str, nn.Embedding]]]:
    tied: dict[int, list[tuple[str, nn.Embedding]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            tied.setdefault(id(module.weight), []).append((name, module))
    return tied


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# --- the verb ---------------------------------------------------------------------------------------------

def quantize_(model: nn.Module, config: QuantConfig, step: str = "prepare") -> list[LayerReport]:
    """Prepare `model` for QAT (fake-quant Linears) or convert it to its exact quantized values, in place."""
    if not isinstance(config, QuantConfig):
        raise EdgestillError(f"quantize_ takes a QuantConfig, got {type(config).__name__}")
    if step not in ("prepare", "convert"):
        raise EdgestillError(f"quantize_ step={step!r}: use 'prepare' (fake-quant for QAT) "
                             "or 'convert' (freeze)")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EdgestillError(f"{type(model).__name__} has no nn.Linear modules to quantize")
    _check_patterns_used(config, [name for name, _ in linears])
    tied = _tied_embeddings(model)

    report = []
    for name, linear in linears:
        requested = config.format_for(name)
        if requested is None:
            if step == "convert" and isinstance(linear, FakeQuantLinear):
                raise EdgestillError(f"{name} was prepared for QAT but this config skips it; "
                                     "convert with the config used for prepare")
            continue
        fmt, fallback = resolve_format(requested, linear.in_features)
        embeddings = tied.get(id(linear.weight), [])
        if step == "prepare":
            if isinstance(linear, FakeQuantLinear):
                raise EdgestillError(f"{name} is already prepared for QAT; "
                                     "call quantize_(..., step='convert')")
            _replace(model, name, FakeQuantLinear(linear, fmt))
            for emb_name, emb in embeddings:
                _replace(model, emb_name, FakeQuantEmbedding(emb, fmt))
        else:
            if isinstance(linear, FakeQuantLinear) and linear.fmt != fmt:
                raise EdgestillError(f"{name} was prepared as {linear.fmt} but this config converts it to "
                                     f"{fmt}; convert with the config used for prepare")
            with torch.no_grad():  # in place: tied modules and optimizer references see the frozen values
                linear.weight.copy_(fmt.fake_quant(linear.weight))
            _replace(model, name, _plain_linear(linear))
            for emb_name, emb in embeddings:
                if isinstance(emb, FakeQuantEmbedding):
                    _replace(model, emb_name, _plain_embedding(emb))
        shape = (linear.out_features, linear.in_features)
        report.append(LayerReport(name, shape, requested, fmt, fallback, fmt.weight_bytes(shape),
                                  tuple(emb_name for emb_name, _ in embeddings)))
    return report


def total_weight_bytes(report: list[LayerReport]) -> int:
    return sum(layer.weight_bytes for layer in report)
