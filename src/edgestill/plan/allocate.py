"""Bit allocation and student planning against a device budget: `plan(model, device, budget, batches)`.

EdgeDistill's HPAQD allocator (shared/METHODS.md [8]), reconstructed [R]:

1. Sensitivity: s_u(f) = KL(teacher || teacher with only unit u in format f) for every decoder layer
   and the head (plan/sensitivity.py), measured once on the teacher.
2. Candidates: students of several depths (layers chosen by ShortGPT block influence, as
   models/slice.py does) and FFN widths. A student layer keeps its teacher layer's sensitivities [R],
   and a candidate's structural loss is measured directly: KL(teacher || sliced student, float) on the
   same calibration batches (before distillation, so it ranks shapes rather than predicting the
   distilled quality).
3. Greedy allocation per candidate: every unit starts at the highest-precision format; while the
   budget fails, lower the unit whose move has the smallest Delta-sensitivity / Delta-cost, where the
   cost sums the move's relative relief on each constraint still violated (bytes for RAM and file
   size, decode and prefill seconds for speed, all from plan/cost.py). A move is any lower format of
   a unit (not only the next one), so a format that quantizes better than a higher one is taken.
   The result is checked with the full cost model after every move, so a returned plan never
   exceeds the budget.
4. Predicted loss = structural KL + sum over units of s_u(f_u) (additive, [R]). Plans are returned
   feasible-only, ranked by predicted loss; if no candidate fits, EdgestillError names the nearest
   one and what it would need.

A Plan is a student shape (teacher layers kept, FFN width) plus a QuantConfig-compatible plan dict
(`re:model\\.layers\\.3\\.` or `lm_head` -> format name; `quant_config()` builds the QuantConfig), with
its predicted bytes, RAM and tokens/s.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from edgestill.errors import EdgestillError
from edgestill.plan.cost import (
    GGUF_FORMAT_NAMES,
    Prediction,
    Rates,
    StudentShape,
    Workload,
    gguf_bytes,
    predict,
)
from edgestill.plan.devices import DeviceProfile, load_device
from edgestill.plan.sensitivity import HEAD, Sensitivity, unit_names, unit_pattern
from edgestill.quant.formats import format_by_name, resolve_format

# q4_k is left out by default: its exact fake-quant (quant/q4_k.py) takes ~10 s per layer of a 135M model on
# 2 cores; pass formats=(..., "q4_k") to include it.
DEFAULT_FORMATS = ("q8_0", "q5_0", "q4_0")
log = logging.getLogger(__name__)
_UNITS = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}


def parse_bytes(text: str | int | float | None) -> int | None:
    """'300MB' -> 300000000, '1.5GiB' -> 1610612736, 12345 -> 12345 (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in _UNITS):
        raise EdgestillError(f"'{text}' is not a size; write e.g. 300MB, 1.5GiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS.get(unit, 1))


def format_bits(name: str) -> float:
    return format_by_name(name).bits_per_weight


@dataclass(frozen=True)
class Budget:
    """What a plan must fit: peak RAM and/or file bytes, minimum decode/prefill tokens/s; None = no limit.

    max_ram_bytes defaults to the device's RAM available to a model (see plan()).
    """

    max_ram_bytes: int | None = None
    max_file_bytes: int | None = None
    min_decode_tokens_per_s: float | None = None
    min_prefill_tokens_per_s: float | None = None

    def violations(self, p: Prediction) -> dict[str, float]:
        """{constraint: how far over, as a fraction} for each constraint `p` breaks (empty: feasible)."""
        out = {}
        if self.max_ram_bytes is not None and p.peak_ram_bytes > self.max_ram_bytes:
            out["ram"] = p.peak_ram_bytes / self.max_ram_bytes - 1
        if self.max_file_bytes is not None and p.file_bytes > self.max_file_bytes:
            out["file"] = p.file_bytes / self.max_file_bytes - 1
        if self.min_decode_tokens_per_s is not None and p.decode_tokens_per_s < self.min_decode_tokens_per_s:
            out["decode"] = self.min_decode_tokens_per_s / p.decode_tokens_per_s - 1
        if self.min_prefill_tokens_per_s is not None and p.prefill_tokens_per_s < self.min_prefill_tokens_per_s:
            out["prefill"] = self.min_prefill_tokens_per_s / p.prefill_tokens_per_s - 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        from edgestill.plan.cost import strict_from_dict

        return strict_from_dict(cls, data)


@dataclass
class Plan:
    """One student: shape, teacher layers kept, per-unit formats, and what the cost model predicts."""

    shape: StudentShape
    layers: list[int]  # teacher layer indices, in order
    default_format: str
    quant_plan: dict[str, str]  # QuantConfig-style: module name or `re:` regex -> format name
    prediction: Prediction
    predicted_kl: float  # structural_kl + quantization_kl (nats per token)
    structural_kl: float
    quantization_kl: float
    device: str = ""
    workload: Workload = field(default_factory=Workload)

    @property
    def intermediate_size(self) -> int:
        return self.shape.intermediate

    def unit_formats(self) -> dict[str, str]:
        """{unit: format} for every unit (the plan dict expanded)."""
        out = {}
        for unit in unit_names(self.shape.layers):
            pattern = unit_pattern(unit)
            out[unit] = self.quant_plan.get(pattern, self.default_format)
        return out

    def quant_config(self, **kwargs):
        """The QuantConfig that quantize_ (and export via gguf_tensor_plan) applies to the student."""
        from edgestill.quant.fake_quant import QuantConfig

        return QuantConfig(default=format_by_name(self.default_format),
                           plan={k: format_by_name(v) for k, v in self.quant_plan.items()}, **kwargs)

    def summary(self) -> str:
        counts = Counter(self.unit_formats().values())
        mix = ", ".join(f"{n}x{fmt}" for fmt, n in counts.most_common())
        p = self.prediction
        return (f"{self.shape.layers} layers, ffn {self.shape.intermediate}, {mix}: {p.file_bytes / 1e6:.1f} MB file, "
                f"{p.peak_ram_bytes / 1e6:.1f} MB RAM, decode {p.decode_tokens_per_s:.1f} tok/s, "
                f"prefill {p.prefill_tokens_per_s:.1f} tok/s, predicted KL {self.predicted_kl:.4f}")

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape.to_dict(), "layers": list(self.layers), "intermediate_size": self.intermediate_size,
                "default_format": self.default_format, "quant_plan": dict(self.quant_plan),
                "prediction": self.prediction.to_dict(), "predicted_kl": self.predicted_kl,
                "structural_kl": self.structural_kl, "quantization_kl": self.quantization_kl,
                "device": self.device, "workload": self.workload.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(shape=StudentShape.from_dict(data["shape"]), layers=list(data["layers"]),
                   default_format=data["default_format"], quant_plan=dict(data["quant_plan"]),
                   prediction=Prediction.from_dict(data["prediction"]), predicted_kl=float(data["predicted_kl"]),
                   structural_kl=float(data["structural_kl"]), quantization_kl=float(data["quantization_kl"]),
                   device=str(data.get("device", "")), workload=Workload.from_dict(data.get("workload") or {}))


def plan_dict(formats: dict[str, str]) -> tuple[str, dict[str, str]]:
    """{unit: format} -> (default format, QuantConfig plan dict of the units that differ from it)."""
    default = Counter(formats.values()).most_common(1)[0][0]
    return default, {unit_pattern(u): f for u, f in formats.items() if f != default}


# --- the greedy allocator ----------------------------------------------------------------------------------

def _unit_tensors(shape: StudentShape, unit: str) -> list[tuple[int, int, bool]]:
    """(out, in, is_head) of each Linear of `unit`."""
    shapes = shape.linear_shapes()
    if unit == HEAD:
        return [(*shapes[HEAD], True)]
    return [(*s, False) for name, s in shapes.items() if name.startswith(unit + ".")]


def _unit_costs(shape: StudentShape, unit: str, fmt: str, rates: Rates, prompt_tokens: int) -> tuple[int, float, float]:
    """(bytes, decode seconds, prefill seconds) of a unit's weights in `fmt` (after fallbacks)."""
    nbytes, decode_s, prefill_s = 0, 0.0, 0.0
    for rows, cols, is_head in _unit_tensors(shape, unit):
        stored, _ = resolve_format(format_by_name(fmt), cols)
        from edgestill.plan.cost import format_name

        name = format_name(stored)
        b = stored.weight_bytes((rows, cols))
        n = rows * cols
        nbytes += b
        tokens = 1 if is_head else prompt_tokens
        decode_s += rates.decode_tensor_s(name, n, b, rows)
        prefill_s += rates.prefill_tensor_s(name, 2.0 * n * tokens, b, rows * tokens)
    return nbytes, decode_s, prefill_s


def allocate(shape: StudentShape, sensitivity: Sensitivity, device: DeviceProfile, budget: Budget,
             formats=DEFAULT_FORMATS, workload: Workload = Workload(), metadata_bytes: int = 0,
             ) -> tuple[dict[str, str], Prediction, float]:
    """Greedy per-unit formats for `shape` within `budget`: ({unit: format}, prediction, quantization KL).

    Raises EdgestillError (with the closest it got) if even every unit at the lowest format fails.
    """
    units = unit_names(shape.layers)
    missing = [u for u in units if u not in sensitivity.kl]
    if missing:
        raise EdgestillError(f"no sensitivity for units {missing[:3]}; measure layer_sensitivity on this shape "
                             "or remap the teacher's with Sensitivity.remap(layers)")
    formats = [f for f in formats if all(f in sensitivity.kl[u] for u in units)]
    if not formats:
        raise EdgestillError(f"none of the formats was measured by layer_sensitivity ({sensitivity.formats})")
    order = sorted(formats, key=format_bits, reverse=True)
    rates = Rates.of(device, workload.runtime)
    cost = {(u, f): _unit_costs(shape, u, f, rates, workload.prompt_tokens) for u in units for f in order}
    state = {u: order[0] for u in units}

    def predicted() -> Prediction:
        default, plan = plan_dict(state)
        return predict(shape, plan, device, default, workload, metadata_bytes)

    p = predicted()
    while True:
        violated = budget.violations(p)
        if not violated:
            break
        # What relieving each violated constraint is worth: 1 / its budget (so moves compare in fractions).
        scale_bytes = 0.0
        if "ram" in violated:
            scale_bytes += 1 / budget.max_ram_bytes
        if "file" in violated:
            scale_bytes += 1 / budget.max_file_bytes
        scale_decode = budget.min_decode_tokens_per_s if "decode" in violated else 0.0
        scale_prefill = budget.min_prefill_tokens_per_s / workload.prompt_tokens if "prefill" in violated else 0.0
        best = None
        for u in units:
            cur = state[u]
            cb, cd, cp = cost[(u, cur)]
            for f in order[order.index(cur) + 1:]:
                nb, nd, npf = cost[(u, f)]
                relief = (cb - nb) * scale_bytes + (cd - nd) * scale_decode + (cp - npf) * scale_prefill
                if relief <= 0:
                    continue
                ratio = (sensitivity.kl[u][f] - sensitivity.kl[u][cur]) / relief
                if best is None or ratio < best[0]:
                    best = (ratio, u, f)
        if best is None:
            raise _Infeasible(state, p, violated)
        state[best[1]] = best[2]
        p = predicted()
    return dict(state), p, sum(sensitivity.kl[u][f] for u, f in state.items())


class _Infeasible(EdgestillError):
    def __init__(self, state, prediction, violated):
        self.state, self.prediction, self.violated = state, prediction, violated
        super().__init__(f"budget not met at the lowest formats: {violated}")


# --- candidates and the verb ------------------------------------------------------------------------------

def default_depths(num_layers: int) -> list[int]:
    return sorted({max(2, round(num_layers * r)) for r in (1.0, 0.75, 0.5, 0.33, 0.25)} & set(range(1, num_layers + 1)),
                  reverse=True)


def default_widths(intermediate: int) -> list[int]:
    def block(n):  # a multiple of 256 keeps Q4_K's super-blocks on down_proj rows; else 32 for the others
        return n // 256 * 256 if n >= 512 else max(32, n // 32 * 32)

    return sorted({intermediate, *(block(int(intermediate * r)) for r in (0.75, 0.5))}, reverse=True)


def plan(model, device: str | DeviceProfile, budget: Budget, batches, formats=DEFAULT_FORMATS,
         depths: list[int] | None = None, widths: list[int] | None = None, workload: Workload = Workload(),
         metadata_bytes: int = 0, sensitivity: Sensitivity | None = None, top: int | None = None,
         cache: dict | None = None) -> list[Plan]:
    """Ranked feasible student plans for `model` (a Llama-style teacher) on `device` within `budget`.

    batches: calibration token ids (held-out text is never used here). depths/widths: candidate layer
    counts and FFN sizes (defaults: 100/75/50/33/25% of the layers, 100/75/50% of the FFN).
    metadata_bytes: the tokenizer's share of the GGUF (cost.tokenizer_metadata_bytes(teacher.gguf)).
    cache: a dict kept between calls on the same model and batches (a sweep plans for several budgets): the
      reference logits, block influence and every candidate's structural KL are measured once.
    """
    import torch

    from edgestill.models.slice import block_influence, choose_layers, slice_decoder
    from edgestill.plan.sensitivity import _logits, layer_sensitivity, mean_kl

    device = load_device(device)
    if budget.max_ram_bytes is None:
        budget = dataclasses.replace(budget, max_ram_bytes=int(device.ram_bytes.value))
    bad = [f for f in formats if f not in GGUF_FORMAT_NAMES]
    if bad:
        raise EdgestillError(f"formats {bad} are not GGUF formats; choose from {', '.join(GGUF_FORMAT_NAMES)}")
    teacher_shape = StudentShape.from_config(model.config)
    model.eval()
    cache = {} if cache is None else cache
    if "reference" not in cache:
        with torch.no_grad():
            cache["reference"] = _logits(model, batches)
    reference = cache["reference"]
    if sensitivity is None:
        log.info("layer sensitivity: %d units x %d formats on %d calibration tokens", teacher_shape.layers + 1,
                 len(formats), sum(ids.numel() for ids in batches))
        sensitivity = layer_sensitivity(model, batches, formats, reference_logits=reference)
    if "block_influence" not in cache:
        cache["block_influence"] = block_influence(model, batches)
    scores = cache["block_influence"]
    depths = sorted(set(depths or default_depths(teacher_shape.layers)), reverse=True)
    widths = sorted(set(widths or default_widths(teacher_shape.intermediate)), reverse=True)
    for d in depths:
        if not 1 <= d <= teacher_shape.layers:
            raise EdgestillError(f"depth {d} is outside 1..{teacher_shape.layers} (the teacher's layers)")
    for w in widths:
        if not 1 <= w <= teacher_shape.intermediate:
            raise EdgestillError(f"width {w} is outside 1..{teacher_shape.intermediate} (the teacher's FFN)")

    plans, nearest = [], None
    for depth in depths:
        layers = choose_layers(teacher_shape.layers, depth, scores)
        for width in widths:
            shape = dataclasses.replace(teacher_shape, layers=depth, intermediate=width)
            if depth == teacher_shape.layers and width == teacher_shape.intermediate:
                structural = 0.0  # the teacher itself, only quantized
            elif (depth, width) in cache:
                structural = cache[(depth, width)]
            else:
                student = slice_decoder(model, layers, None if width == teacher_shape.intermediate else width)
                structural = cache[(depth, width)] = mean_kl(student, batches, reference)
                del student
                log.info("candidate %d layers, ffn %d: structural KL %.4f", depth, width, structural)
            sens = sensitivity.remap(layers)
            try:
                formats_by_unit, prediction, quant_kl = allocate(shape, sens, device, budget, formats, workload,
                                                                 metadata_bytes)
            except _Infeasible as e:
                worst = max(e.violated.values())
                if nearest is None or worst < nearest[0]:
                    nearest = (worst, shape, layers, e.state, e.prediction, e.violated)
                continue
            default, qplan = plan_dict(formats_by_unit)
            plans.append(Plan(shape=shape, layers=list(layers), default_format=default, quant_plan=qplan,
                              prediction=prediction, predicted_kl=structural + quant_kl, structural_kl=structural,
                              quantization_kl=quant_kl, device=device.name, workload=workload))
    if not plans:
        worst, shape, layers, state, p, violated = nearest
        mix = ", ".join(f"{n}x{fmt}" for fmt, n in Counter(state.values()).most_common())
        need = {"ram": f"max_ram_bytes >= {p.peak_ram_bytes}", "file": f"max_file_bytes >= {p.file_bytes}",
                "decode": f"min_decode_tokens_per_s <= {p.decode_tokens_per_s:.1f}",
                "prefill": f"min_prefill_tokens_per_s <= {p.prefill_tokens_per_s:.1f}"}
        raise EdgestillError(
            f"no student fits the budget on {device.name} ({budget.to_dict()}). The nearest: {shape.layers} layers "
            f"(teacher layers {layers}), ffn {shape.intermediate}, at its lowest formats ({mix}): "
            f"{p.file_bytes / 1e6:.1f} MB file, {p.peak_ram_bytes / 1e6:.1f} MB peak RAM, "
            f"decode {p.decode_tokens_per_s:.1f} tok/s, prefill {p.prefill_tokens_per_s:.1f} tok/s; it would need "
            + ", ".join(need[k] for k in violated)
            + ". Relax the budget, allow lower formats, or add smaller depths/widths")
    plans.sort(key=lambda p: p.predicted_kl)
    return plans[:top] if top else plans


def uniform_bytes(shape: StudentShape, fmt: str, metadata_bytes: int = 0) -> int:
    """File bytes of `shape` with every weight in `fmt` (a convenience for budgets)."""
    return gguf_bytes(shape, {}, fmt, metadata_bytes)["file"]


def plan_for_teacher(teacher: str, device: str | DeviceProfile, budget: Budget, data: str = "shakespeare",
                     workload: Workload = Workload(), calibration_tokens: int = 256, seq_len: int = 128,
                     **kwargs) -> list[Plan]:
    """plan() for a teacher by name/path (as edgestill.models.load takes it), calibrated on `data`'s train split.

    The tokenizer's share of the GGUF file is read from the teacher's GGUF when it is one.
    """
    from edgestill.models.load import load_causal_lm, resolve_model_path
    from edgestill.plan.cost import tokenizer_metadata_bytes
    from edgestill.plan.sensitivity import calibration_batches

    loaded = load_causal_lm(teacher)
    batches = calibration_batches(loaded.tokenizer, data, seq_len=seq_len, blocks=max(1, calibration_tokens // seq_len))
    metadata = 0
    path = resolve_model_path(teacher)
    if str(path).lower().endswith(".gguf"):
        metadata = tokenizer_metadata_bytes(path)
    return plan(loaded.model, device, budget, batches, workload=workload, metadata_bytes=metadata, **kwargs)
