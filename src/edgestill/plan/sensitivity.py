"""Layer sensitivity: how much each decoder layer's output distribution suffers in each format.

EdgeDistill (docs/references.md [8], HPAQD) measures `s_l(b) = KL(teacher || model with only layer l at
b bits)` on calibration data and feeds it to the bit allocator. Reconstructed here [R]:

- a *unit* is one decoder layer (all its Linears: q, k, v, o, gate, up, down) or the head (`lm_head`,
  which in a tied model is also the token embedding: GGUF stores the tensor once, so it gets one format);
- a format is a GGUF weight format by name (q8_0, q5_0, q4_0, q4_k, ...); a unit's Linears are written
  with exactly the values the runtime multiplies with (`Format.fake_quant`), after llama.cpp's
  fallback rules (`resolve_format`: Q4_K rows that 256 does not divide become Q5_0 or F16);
- the reference ("teacher") is the model itself in float unless `reference_logits` is given, and the
  score is the mean per-token KL(reference || quantized) in nats over the calibration tokens.

Only the measured unit is quantized; weights are restored exactly afterwards. Cost: units x formats
forward passes over the calibration batches.

    sens = layer_sensitivity(model, batches, formats=("q8_0", "q5_0", "q4_0"))
    sens.kl["model.layers.3"]["q4_0"]   # nats per token
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from edgestill.errors import EdgestillError
from edgestill.progress import progress_bar
from edgestill.quant.formats import format_by_name, format_names, resolve_format

log = logging.getLogger("edgestill")

HEAD = "lm_head"


def unit_names(num_layers: int) -> list[str]:
    """The allocation units of a decoder: `model.layers.{i}` for each layer, then `lm_head`."""
    return [f"model.layers.{i}" for i in range(num_layers)] + [HEAD]


def unit_pattern(unit: str) -> str:
    """The QuantConfig plan key selecting a unit's Linears: `re:model\\.layers\\.3\\.` or `lm_head`."""
    return unit if unit == HEAD else "re:" + re.escape(unit + ".")


def unit_linears(model, unit: str) -> list[tuple[str, torch.nn.Linear]]:
    prefix = unit + "."
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and (name == unit if unit == HEAD else name.startswith(prefix))]
    if not found:
        raise EdgestillError(f"unit '{unit}' has no nn.Linear in {type(model).__name__}")
    return found


@dataclass
class Sensitivity:
    """kl[unit][format]: mean per-token KL(reference || model with only `unit` in `format`), nats."""

    units: list[str]
    formats: list[str]
    kl: dict[str, dict[str, float]]
    tokens: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"units": list(self.units), "formats": list(self.formats), "kl": self.kl, "tokens": self.tokens,
                "notes": self.notes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sensitivity:
        return cls(units=list(data["units"]), formats=list(data["formats"]),
                   kl={u: {f: float(v) for f, v in d.items()} for u, d in data["kl"].items()},
                   tokens=int(data.get("tokens", 0)), notes=dict(data.get("notes") or {}))

    def restrict(self, formats) -> Sensitivity:
        """The same measurements for `formats` only (each unit and format was measured on its own)."""
        missing = [f for f in formats if f not in self.formats]
        if missing:
            raise KeyError(f"formats not measured: {missing}")
        kl = {u: {f: d[f] for f in formats} for u, d in self.kl.items()}
        return Sensitivity(units=list(self.units), formats=list(formats), kl=kl, tokens=self.tokens,
                           notes=dict(self.notes))

    def remap(self, layers: list[int]) -> Sensitivity:
        """Sensitivities of a student sliced with teacher `layers`: student layer j takes teacher layer layers[j] [R]."""
        kl = {f"model.layers.{j}": self.kl[f"model.layers.{i}"] for j, i in enumerate(layers)}
        kl[HEAD] = self.kl[HEAD]
        return Sensitivity(units=list(kl), formats=list(self.formats), kl=kl, tokens=self.tokens,
                           notes={**self.notes, "remapped_from_teacher_layers": list(layers)})


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(softmax(reference) || softmax(logits)); (B, T, V) inputs, float64 result."""
    ref = F.log_softmax(reference_logits.double(), dim=-1)  # (B, T, V)
    out = F.log_softmax(logits.double(), dim=-1)
    return (ref.exp() * (ref - out)).sum()


@torch.no_grad()
def model_logits(model, batches: list[torch.Tensor], columns: torch.Tensor | None = None) -> list[torch.Tensor]:
    """float32 logits of `model` on each batch of token ids (the reference side of `mean_kl`); columns: only those
    token ids' logits (a trimmed vocabulary: its softmax is the model's renormalised over them)."""
    out = [model(input_ids=ids).logits.float() for ids in batches]
    return out if columns is None else [x.index_select(-1, columns) for x in out]


@torch.no_grad()
def mean_kl(model, batches: list[torch.Tensor], reference_logits: list[torch.Tensor],
            columns: torch.Tensor | None = None) -> float:
    """Mean KL(reference || model) per token; columns: compare over those token ids only (reference_logits hold
    just those columns then)."""
    total = sum(float(token_kl(ref, out)) for ref, out in zip(reference_logits, model_logits(model, batches, columns)))
    return total / sum(ids.numel() for ids in batches)


@torch.no_grad()
def _logits_from_layer(model, start: int, hidden_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of running layers start.. on their cached float inputs: layers before `start` are unchanged
    by quantizing a later unit, so their outputs are reused (on average half the forward cost)."""
    inner = model.model
    layers = inner.layers
    inner.layers = torch.nn.ModuleList(list(layers)[start:])
    try:
        return [model(inputs_embeds=h, use_cache=False).logits.float() for h in hidden_inputs]
    finally:
        inner.layers = layers


DEFAULT_FORMATS = format_names(plan_default=True)  # the format registry's default candidates: q8_0, q5_0, q4_0


@torch.no_grad()
def layer_sensitivity(model, batches: list[torch.Tensor], formats=DEFAULT_FORMATS,
                      units: list[str] | None = None, reference_logits: list[torch.Tensor] | None = None) -> Sensitivity:
    """s[unit][fmt] for every unit (default: every decoder layer and the head) and format (see module doc).

    The float model's hidden states are computed once; measuring layer l reruns only layers l.. from
    its cached input (the head reruns the last layer), which gives the same logits as a full forward.
    """
    if not batches:
        raise EdgestillError("layer_sensitivity needs at least one calibration batch of token ids")
    fmts = {name: format_by_name(name) for name in formats}
    num_layers = model.config.num_hidden_layers
    if units is None:
        units = unit_names(num_layers)
    model.eval()
    outputs = [model(input_ids=ids, output_hidden_states=True, use_cache=False) for ids in batches]
    reference = reference_logits if reference_logits is not None else [o.logits.float() for o in outputs]
    hidden = [o.hidden_states for o in outputs]  # per batch: num_layers + 1 x (B, T, C); [i] is layer i's input
    del outputs
    tokens = sum(ids.numel() for ids in batches)
    kl: dict[str, dict[str, float]] = {}
    bar = progress_bar(total=len(units) * len(fmts), desc="layer sensitivity", unit="probe")
    for unit in units:
        start = num_layers - 1 if unit == HEAD else int(unit.rsplit(".", 1)[1])
        inputs = [h[start] for h in hidden]
        linears = unit_linears(model, unit)
        originals = [m.weight.detach().clone() for _, m in linears]
        kl[unit] = {}
        for name, fmt in fmts.items():
            for (_, m), w in zip(linears, originals):
                stored, _ = resolve_format(fmt, m.in_features)
                m.weight.copy_(stored.fake_quant(w).to(w.dtype))  # a tied head writes the embedding too
            logits = _logits_from_layer(model, start, inputs)
            kl[unit][name] = sum(float(token_kl(r, o)) for r, o in zip(reference, logits)) / tokens
            bar.update(1)
        for (_, m), w in zip(linears, originals):
            m.weight.copy_(w)
    bar.close()
    return Sensitivity(units=list(units), formats=list(formats), kl=kl, tokens=tokens,
                       notes={"reference": "given logits" if reference_logits is not None else "the model in float"})


def cached_sensitivity(model, batches: list[torch.Tensor], formats, path=None, key: dict | None = None) -> Sensitivity:
    """layer_sensitivity, kept in `path` (JSON) under `key` (teacher, formats, a hash of the calibration tokens).

    Measuring takes minutes to an hour on a real teacher; a sweep killed while planning, or rerun with other
    budgets, reads it back. A file measured for more formats under an otherwise equal key is read for the formats
    asked (every unit and format is measured on its own, so the subset is what measuring them would give, and the
    file is kept whole). A file under another key is measured again and replaced.
    """
    import json
    from pathlib import Path

    from edgestill.files import write_text_atomic

    if path is not None and Path(path).is_file():
        stored = json.loads(Path(path).read_text())
        if stored.get("key") == key:
            log.info("layer sensitivity read from %s", path)
            return Sensitivity.from_dict(stored["sensitivity"])
        if _formats_subset(stored.get("key"), key):
            log.info("layer sensitivity read from %s (its %s of the formats it measured)", path, list(formats))
            return Sensitivity.from_dict(stored["sensitivity"]).restrict(list(formats))
    sensitivity = layer_sensitivity(model, batches, formats)
    if path is not None:
        write_text_atomic(path, json.dumps({"key": key, "sensitivity": sensitivity.to_dict()}, indent=1))
    return sensitivity


def _formats_subset(stored: dict | None, key: dict | None) -> bool:
    """Whether a sensitivity file kept under `stored` holds every format of `key`, all else in the keys equal."""
    if not isinstance(stored, dict) or not isinstance(key, dict) or "formats" not in key:
        return False
    rest = {k: v for k, v in stored.items() if k != "formats"}
    return (rest == {k: v for k, v in key.items() if k != "formats"}
            and set(key["formats"]) <= set(stored.get("formats") or ()))
