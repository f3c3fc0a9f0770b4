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

A format is a config (GGUFQ4_K()) or its short name ("q4_k", any case: quant.formats.REGISTRY), so a
recipe's `quant` section is a QuantConfig as it is: QuantConfig.from_dict({"format": "q4_0", "plan":
{"lm_head": "q8_0"}, "skip": [], "activations": None}), the recipe's `format` being `default`.

Sample:
    config = QuantConfig(default=GGUFQ4_K(), plan={"re:.*mlp\\.down_proj": GGUFQ8_0(), "lm_head": "q8_0"})
    report = quantize_(model, config, step="prepare")
    ... train ...
    quantize_(model, config, step="convert")

Dtypes: fake-quant values are computed in float32. In a float32 model they are exactly the
runtime's values; in an fp16/bf16 model they are rounded once more to the weights' dtype.

Activations (`QuantConfig(..., activations="llama.cpp")`, off by default): llama.cpp's CPU backend
does not multiply a quantized weight with float activations. ggml_compute_forward_mul_mat first
converts each input row to the weight type's `vec_dot_type` (ggml-cpu.c, type_traits_cpu): Q8_0
for Q4_0/Q5_0/Q8_0 weights, Q8_1 for Q4_1/Q5_1, Q8_K for Q4_K/Q3_K/Q2_K, F16 for F16. With this option a
FakeQuantLinear rounds its input the same way (per token, along in_features; identity gradient),
bit for bit with libggml-cpu's quantizers, so PyTorch computes what llama.cpp computes up to the
order of float32 sums. That order still matters in a deep model: rounding is discontinuous, so a
last-bit difference can flip a code and the flips compound layer after layer (a 1e-6 relative input
perturbation moves a 15-layer SmolLM2 student's logits by ~0.12 at scale 23, ~0.96 top-1), which is
the size of llama.cpp's own gap to PyTorch. Shallow models match to ~1e-8. See
`llamacpp_activations` for the exact rounding. `convert` gives back plain Linears either way
(the runtime does this rounding itself).
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
    FORMAT_NAMES,
    FORMATS,
    GGUFQ8_0,
    Format,
    f32_div,
    format_from_dict,
    format_spec,
    format_to_dict,
    resolve_format,
    round_to_fp16,
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


# --- activations as llama.cpp's CPU backend rounds them ---------------------------------------------

ACTIVATION_MODES = (None, "llama.cpp")


def _q8_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (n, 32) and float32 scales d (n, 1) of quantize_row_q8_0 / quantize_row_q8_1 (ggml-cpu).

    x86 AVX/AVX2 path (arch/x86/quants.c; the repacked ggml_quantize_mat_q8_0_4x8 is the same),
    checked bit for bit against llama-cpp-python's libggml-cpu in tests/quant/test_activation_quant.py:
    amax = max |x| per 32-block, d = amax / 127, id = 127 / amax (0 if amax is 0),
    q = round-half-even(x * id) (_mm256_round_ps, _MM_ROUND_NEAREST); d is stored as fp16.
    The scalar reference (quantize_row_q8_0_ref) uses id = 1/d and roundf; the two differ only on
    ties and on last-bit differences of the product.
    """
    blocks = x.reshape(-1, 32)  # (n, 32)
    amax = blocks.abs().amax(-1, keepdim=True)  # (n, 1)
    safe = torch.where(amax == 0, 1.0, amax)
    inv = torch.where(amax == 0, 0.0, torch.full_like(amax, 127.0) / safe)
    return torch.round(blocks * inv), f32_div(amax, 127)  # torch.round: half to even


def _q8_0_activations(x: torch.Tensor) -> torch.Tensor:
    """Q8_0 (and Q8_1: same d and codes) activations, dequantized: q * fp16(d)."""
    q, d = _q8_codes(x)
    return (q * round_to_fp16(d)).reshape(x.shape)


def _q8_1_min_correction(x: torch.Tensor) -> torch.Tensor:
    """(..., in_features/32): per unit of weight min, what llama.cpp's Q4_1/Q5_1 dot adds to sum(w_hat*x_hat).

    ggml_vec_dot_q4_1_q8_1 computes d_w*d_x*sum(q_w*q_x) + m * s with s = fp16(d * sum(q_x)) stored
    in the Q8_1 block, where sum(w_hat * x_hat) has m * fp16(d) * sum(q_x); the difference per block
    is m * (s - fp16(d) * sum(q_x)).
    """
    q, d = _q8_codes(x.detach().to(torch.float32))
    total = q.sum(-1, keepdim=True)
    corr = round_to_fp16(d * total) - round_to_fp16(d) * total  # (n, 1)
    return corr.reshape(*x.shape[:-1], x.shape[-1] // 32)


def _nearest_int(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # ggml's nearest_int (the 12582912.f trick): round half to even


def _q8_k_activations(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_K, dequantized: 256-blocks, iscale = -127 / signed max, float32 d = 1 / iscale."""
    blocks = x.reshape(-1, 256)
    signed_max = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # first one on ties, as in C
    zero = signed_max == 0
    iscale = torch.full_like(signed_max, -127.0) / torch.where(zero, 1.0, signed_max)
    q = _nearest_int(blocks * iscale).clamp(max=127)
    d = torch.ones_like(iscale) / iscale
    return torch.where(zero, 0.0, q * d).reshape(x.shape)


def llamacpp_activations(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """`x` (..., in_features) rounded as llama.cpp's CPU backend rounds a matmul input for weights in `fmt`.

    Q4_0, Q5_0, Q8_0 -> Q8_0 blocks; Q4_1, Q5_1 -> Q8_1 (same values; its extra s = fp16(d * sum(q))
    enters only the weight-min term, which FakeQuantLinear adds separately); Q4_K, Q3_K, Q2_K -> Q8_K; F16 -> fp16.
    Computed in float32, returned in x's dtype. No gradient (see activation_quant_ste).
    """
    x32 = x.detach().to(torch.float32)
    vec_dot_type = _vec_dot_type(fmt)  # the registry's: which input type llama.cpp's kernel for `fmt` takes
    if vec_dot_type in ("q8_0", "q8_1"):
        out = _q8_0_activations(x32)
    elif vec_dot_type == "q8_k":
        out = _q8_k_activations(x32)
    elif vec_dot_type == "f16":
        out = round_to_fp16(x32)
    else:
        raise EdgestillError(f"activations='llama.cpp' needs a GGUF format; {fmt} does not run in llama.cpp")
    return out.to(x.dtype)


def _vec_dot_type(fmt: Format) -> str | None:
    return format_spec(fmt).vec_dot_type if isinstance(fmt, FORMATS) else None


class _ActivationStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: Format) -> torch.Tensor:
        return llamacpp_activations(x, fmt)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def activation_quant_ste(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """llamacpp_activations(x, fmt) forward, identity gradient to `x` backward."""
    return _ActivationStraightThrough.apply(x, fmt)


class FakeQuantLinear(nn.Linear):
    """An nn.Linear that multiplies with its weight fake-quantized to `fmt` (scales from the live weight).

    With activations="llama.cpp" its input is also rounded as llama.cpp rounds it (llamacpp_activations).
    It holds the original module's Parameters, not copies: ties, optimizer state and state-dict
    keys (`weight`, `bias`) are unchanged.
    """

    def __init__(self, linear: nn.Linear, fmt: Format, activations: str | None = None):
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate new parameters
        if activations not in ACTIVATION_MODES:
            raise EdgestillError(f"activations={activations!r}: use None or 'llama.cpp'")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.fmt = fmt
        self.activations = activations
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations != "llama.cpp":
            return F.linear(x, fake_quant_ste(self.weight, self.fmt), self.bias)
        y = F.linear(activation_quant_ste(x, self.fmt), fake_quant_ste(self.weight, self.fmt), self.bias)
        if _vec_dot_type(self.fmt) == "q8_1":  # Q4_1/Q5_1: the min term uses Q8_1's fp16 s (no gradient)
            w = self.weight.detach().to(torch.float32)
            block_min = round_to_fp16(w.reshape(w.shape[0], -1, 32).amin(-1))  # (out, in/32), as formats._affine
            y = y + (_q8_1_min_correction(x) @ block_min.T).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        extra = f", activations={self.activations}" if self.activations else ""
        return f"{super().extra_repr()}, fmt={self.fmt}{extra}"


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

def pattern_matches(pattern: str, name: str) -> bool:
    """Whether a QuantConfig key (an exact module name, or `re:` + a regex matched from the start) names `name`."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


@dataclass
class QuantConfig:
    """Weight formats per Linear: `skip` first, then the first matching `plan` entry, then `default`.

    A format is a config (GGUFQ4_0()) or a short name ("q4_0"); names are turned into configs here.
    `activations="llama.cpp"` also rounds each prepared Linear's input as llama.cpp's CPU backend
    does (see llamacpp_activations); None (the default) leaves activations in float.
    """

    default: Format | str | None = field(default_factory=GGUFQ8_0)
    plan: dict[str, Format | str] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    activations: str | None = None

    def __post_init__(self):
        if self.activations not in ACTIVATION_MODES:
            raise EdgestillError(f"QuantConfig.activations = {self.activations!r}: use None (float "
                                 "activations) or 'llama.cpp' (rounded as llama.cpp's CPU matmuls do)")
        self.default = _config_format("default", self.default)
        self.plan = {pattern: _config_format(f"plan[{pattern!r}]", fmt) for pattern, fmt in self.plan.items()}

    def format_for(self, name: str) -> Format | None:
        if any(pattern_matches(pattern, name) for pattern in self.skip):
            return None
        for pattern, fmt in self.plan.items():
            if pattern_matches(pattern, name):
                return fmt
        return self.default

    def to_dict(self) -> dict[str, Any]:
        data = {
            "default": None if self.default is None else format_to_dict(self.default),
            "plan": {pattern: format_to_dict(fmt) for pattern, fmt in self.plan.items()},
            "skip": list(self.skip),
        }
        if self.activations is not None:  # absent when off: older configs and reports stay as they were
            data["activations"] = self.activations
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Inverse of to_dict; also reads a recipe's `quant` section as it is (its `format` is `default`).

        Formats may be to_dict's dicts, class names ("GGUFQ4_0") or short names ("q4_0", any case).
        """
        data = dict(data)
        if "format" in data:  # the recipe's key (quant.format) for the default format
            if "default" in data:
                raise EdgestillError("QuantConfig: give `default` or a recipe's `format` (the same setting), not both")
            data["default"] = data.pop("format")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise EdgestillError(f"unknown QuantConfig keys {sorted(unknown)}; "
                                 "expected default (a recipe's format), plan, skip, activations")
        default = data.get("default", format_to_dict(GGUFQ8_0()))
        return cls(
            default=None if default is None else format_from_dict(default),
            plan={pattern: format_from_dict(fmt) for pattern, fmt in (data.get("plan") or {}).items()},
            skip=list(data.get("skip") or []),
            activations=data.get("activations"),
        )


def _config_format(where: str, fmt) -> Format | None:
    """A QuantConfig entry as a format config: a config stays, a short or class name is looked up, None stays."""
    if fmt is None or isinstance(fmt, FORMATS):
        return fmt
    if isinstance(fmt, str):
        try:
            return format_from_dict(fmt)
        except EdgestillError:
            pass
    raise EdgestillError(f"QuantConfig.{where} = {fmt!r} is not a format; use a name such as q4_0 (one of "
                         f"{', '.join(FORMAT_NAMES)}) or a config such as GGUFQ4_K()")


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


def check_patterns_used(config: QuantConfig, names: list[str]) -> None:
    """Refuse a plan or skip entry that matches none of the Linears `names` (a typo), with a suggestion."""
    for kind, patterns in (("plan", list(config.plan)), ("skip", config.skip)):
        for pattern in patterns:
            if not any(pattern_matches(pattern, name) for name in names):
                close = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=3)
                hint = f"did you mean {', '.join(close)}?" if close else f"Linears look like {names[:3]}"
                raise EdgestillError(f"QuantConfig.{kind} entry {pattern!r} matches no nn.Linear; {hint}")


def tied_embeddings(model: nn.Module) -> dict[int, list[tuple[str, nn.Embedding]]]:
    """{id(weight): [(name, embedding)]}: every nn.Embedding by the tensor it holds (a tied head shares one)."""
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
    check_patterns_used(config, [name for name, _ in linears])
    tied = tied_embeddings(model)

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
            if config.activations is not None and _vec_dot_type(fmt) is None:
                raise EdgestillError(f"{name}: activations={config.activations!r} needs a GGUF format, "
                                     f"got {fmt}")
            _replace(model, name, FakeQuantLinear(linear, fmt, activations=config.activations))
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
