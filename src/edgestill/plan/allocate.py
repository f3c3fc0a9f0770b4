"""Bit allocation and student planning against a device budget: `plan(model, device, budget, batches)`.

EdgeDistill's HPAQD allocator (docs/references.md [8]), reconstructed [R]:

1. Sensitivity: s_u(f) = KL(teacher || teacher with only unit u in format f) for every decoder layer
   and the head (plan/sensitivity.py), measured once on the teacher.
2. Candidates: students of several depths (layers chosen by ShortGPT block influence, as
   models/slice.py does) and FFN widths (units ranked by their activations on the calibration batches, as
   `shrink` cuts them). A student layer keeps its teacher layer's sensitivities [R],
   and a candidate's structural loss is measured directly: KL(teacher || sliced student, float) on the
   same calibration batches (before distillation, so it ranks shapes rather than predicting the
   distilled quality).
3. Greedy allocation per candidate: every unit starts at the highest-precision format; while the
   budget fails, lower the unit whose move has the smallest Delta-sensitivity / Delta-cost, where the
   cost sums the move's relative relief on each constraint still violated (bytes for RAM and file
   size, decode and prefill seconds for speed, all from plan/cost.py). A move is any lower format of
   a unit (not only the next one), so a format that quantizes better than a higher one is taken.
   The result is checked with the full cost model after every move, so a returned plan never
   exceeds the budget. Then a refill pass spends what the moves freed beyond the budget: units are raised
   back, the largest KL saved per byte first, while the plan still fits.
4. Predicted loss = structural KL + sum over units of s_u(f_u) (additive, [R]). Plans are returned
   feasible-only, ranked by predicted loss; if no candidate fits, EdgestillError names the nearest
   one and what it would need.

Before step 1, check_budget prices the smallest student the candidates allow (fewest layers, narrowest
FFN, every unit at its fewest-bytes format) with the cost model alone: a budget even that one misses
is refused in milliseconds, naming the least budget that would do, instead of after the measurements.

A Plan is a student shape (teacher layers kept, FFN width) plus a QuantConfig-compatible plan dict
(`re:model\\.layers\\.3\\.` or `lm_head` -> format name; `quant_config()` builds the QuantConfig), with
its predicted bytes, RAM and tokens/s.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
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
from edgestill.plan.devices import DeviceProfile
from edgestill.plan.load import load_device
from edgestill.plan.sensitivity import HEAD, Sensitivity, unit_names, unit_pattern
from edgestill.quant.formats import format_by_name, format_name, format_names, resolve_format

# The format registry's default candidates (plan_default; students are trained in them). q4_k is left out: its exact
# fake-quant (quant/q4_k.py) takes ~3 s per decoder layer of a 135M model (one 1536x576 matrix: 0.87 s on one thread,
# measured 2026-12-03), and QAT pays that again at every training step; pass formats=(..., "q4_k") to include it.
DEFAULT_FORMATS = format_names(plan_default=True)  # ("q8_0", "q5_0", "q4_0")
log = logging.getLogger(__name__)
# The command-line option that sets each budget field (`plan` and `shrink --device` both accept these).
BUDGET_FLAGS = {"max_ram_bytes": "--max-memory", "max_file_bytes": "--max-file-size",
                "min_decode_tokens_per_s": "--min-decode-tokens-per-s",
                "min_prefill_tokens_per_s": "--min-prefill-tokens-per-s"}
_UNITS = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}


def parse_bytes(text: str | int | float | None) -> int | None:
    """'300MB' -> 300000000, '1.5GiB' -> 1610612736, 12345 -> 12345 (None stays None).

    A size is a budget here, so zero, negative and unreadable sizes are refused with one line rather
    than planned against (a 0-byte budget would otherwise fail only after the measurements).
    """
    if text is None:
        return None
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-z]*)\s*", str(text), re.IGNORECASE)
        unit = match.group(2).lower() if match else ""
        if not match or (unit and unit not in _UNITS):
            raise EdgestillError(f"'{text}' is not a size; write e.g. 300MB, 1.5GiB or a number of bytes")
        value = float(match.group(1))
    nbytes = value * _UNITS.get(unit, 1)
    if not (math.isfinite(nbytes) and nbytes >= 1):
        raise EdgestillError(f"'{text}' is not a usable size: a budget must be at least 1 byte (e.g. 300MB)")
    return int(nbytes)


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

    def __post_init__(self):
        """Refuse a zero, negative or NaN limit at once: no plan meets it, and None already means no limit."""
        for name, flag in BUDGET_FLAGS.items():
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise EdgestillError(f"the budget's {name} ({flag}) is {value}: a limit must be positive; "
                                     "leave it out for no limit")

    @classmethod
    def parse(cls, ram: str | None = None, file: str | None = None, decode: float | None = None,
              prefill: float | None = None) -> Budget:
        """A Budget from command-line text: sizes such as '150MB', speeds in tokens/s (None: no limit)."""
        return cls(max_ram_bytes=parse_bytes(ram), max_file_bytes=parse_bytes(file), min_decode_tokens_per_s=decode,
                   min_prefill_tokens_per_s=prefill)

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
    # a trimmed vocabulary (plan(vocab_keep=...)): {"size", "teacher_size", "teacher_mass_trimmed"}; None = the teacher's
    vocab: dict[str, Any] | None = None
    # the recovery probe (plan/probe.py), for the plans it tried: {"steps", "kl", "losses", "wall_s", "rank_kl"};
    # rank_kl = the KL after the probe + quantization_kl, what the probed plans are ranked by. None = not probed
    recovery: dict[str, Any] | None = None

    @property
    def rank_kl(self) -> float:
        """What plans are ordered by: the KL after the recovery probe (+ quantization) when probed, else as cut."""
        return self.recovery["rank_kl"] if self.recovery else self.predicted_kl

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

        return QuantConfig(default=self.default_format, plan=dict(self.quant_plan), **kwargs)

    def summary(self) -> str:
        counts = Counter(self.unit_formats().values())
        mix = ", ".join(f"{n}x{fmt}" for fmt, n in counts.most_common())
        p = self.prediction
        trim = f", vocabulary {self.vocab['size']:,} of {self.vocab['teacher_size']:,}" if self.vocab else ""
        return (f"{self.shape.layers} layers{hidden_note(self.shape)}, ffn {self.shape.intermediate}{trim}, {mix}: "
                f"{p.file_bytes / 1e6:.1f} MB file, "
                f"{p.peak_ram_bytes / 1e6:.1f} MB RAM, decode {p.decode_tokens_per_s:.1f} tok/s, "
                f"prefill {p.prefill_tokens_per_s:.1f} tok/s, predicted KL {self.predicted_kl:.4f}"
                + (f", {self.recovery['kl']:.4f} after a {self.recovery['steps']}-step recovery probe"
                   if self.recovery else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape.to_dict(), "layers": list(self.layers), "intermediate_size": self.intermediate_size,
                "default_format": self.default_format, "quant_plan": dict(self.quant_plan),
                "prediction": self.prediction.to_dict(), "predicted_kl": self.predicted_kl,
                "structural_kl": self.structural_kl, "quantization_kl": self.quantization_kl,
                "device": self.device, "workload": self.workload.to_dict(), "vocab": self.vocab,
                "recovery": self.recovery}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(shape=StudentShape.from_dict(data["shape"]), layers=list(data["layers"]),
                   default_format=data["default_format"], quant_plan=dict(data["quant_plan"]),
                   prediction=Prediction.from_dict(data["prediction"]), predicted_kl=float(data["predicted_kl"]),
                   structural_kl=float(data["structural_kl"]), quantization_kl=float(data["quantization_kl"]),
                   device=str(data.get("device", "")), workload=Workload.from_dict(data.get("workload") or {}),
                   vocab=data.get("vocab"), recovery=data.get("recovery"))


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
    p = _refill(state, units, order, sensitivity, cost, budget, predicted, p)
    return dict(state), p, sum(sensitivity.kl[u][f] for u, f in state.items())


def _refill(state: dict, units, order, sensitivity: Sensitivity, cost: dict, budget: Budget, predicted,
            p: Prediction) -> Prediction:
    """Spend what the lowering left over. A lowering move can free more than the budget needed (a unit may drop
    several formats at once), so raise units back, the largest KL saved per byte first, while the plan still fits;
    stop when no raise of any unit to any format with a lower measured KL fits. Changes `state`; returns its
    prediction."""
    while True:
        moves = []
        for u in units:
            cur = state[u]
            for f in order[:order.index(cur)]:  # the higher-precision formats
                saved = sensitivity.kl[u][cur] - sensitivity.kl[u][f]
                if saved > 0:
                    extra = max(1, cost[(u, f)][0] - cost[(u, cur)][0])
                    moves.append((saved / extra, u, f))
        for _, u, f in sorted(moves, key=lambda m: m[0], reverse=True):
            cur, state[u] = state[u], f
            q = predicted()
            if not budget.violations(q):
                p = q
                break
            state[u] = cur
        else:
            return p


class _Infeasible(EdgestillError):
    def __init__(self, state, prediction, violated):
        self.state, self.prediction, self.violated = state, prediction, violated
        super().__init__(f"budget not met at the lowest formats: {violated}")


# --- the floor: what no plan can go below, known from the cost model before anything is measured ----------

@dataclass(frozen=True)
class Floor:
    """The least any plan from these candidates can need, so an impossible budget fails in milliseconds.

    Measuring sensitivity takes minutes to an hour on a real teacher; a budget even the smallest student
    misses must be refused before that. Every cost grows with depth and width, so the floor is the
    smallest candidate shape. `formats` gives each unit its fewest-bytes format (after the cost model's
    fallbacks): the file bytes and peak RAM of `bound`. Its tokens/s are each unit's fastest format
    instead (on a compute-bound device a bigger format can be faster), so a limit `bound` breaks is one
    no candidate and no mix of formats meets (to within GGUF's 32-byte padding of a tensor). A budget
    it meets can still fail later (the greedy allocator then names the nearest plan): the floor is a
    lower bound, so it refuses only budgets that are certainly impossible.
    """

    shape: StudentShape
    formats: dict[str, str]  # {unit: its fewest-bytes format}
    bound: Prediction  # file bytes and peak RAM of that mix; the best decode/prefill tokens/s of any mix

    def describe(self) -> str:
        """'8 layers, FFN 768, all q4_0' (or '8 layers, FFN 768, 6x q4_0, 3x q5_0' when the fewest bytes mix)."""
        counts = Counter(self.formats.values()).most_common()
        mix = f"all {counts[0][0]}" if len(counts) == 1 else ", ".join(f"{n}x {f}" for f, n in counts)
        layers = f"{self.shape.layers} layer" + ("s" if self.shape.layers != 1 else "")
        return f"{layers}{hidden_note(self.shape)}, FFN {self.shape.intermediate}, {mix}"


def candidate_sizes(teacher: StudentShape, depths=None, widths=None) -> tuple[list[int], list[int]]:
    """The candidate layer counts and FFN widths, largest first (defaults from the teacher's), validated."""
    depths = sorted(set(depths or default_depths(teacher.layers)), reverse=True)
    widths = sorted(set(widths or default_widths(teacher.intermediate)), reverse=True)
    for d in depths:
        if not 1 <= d <= teacher.layers:
            raise EdgestillError(f"depth {d} is outside 1..{teacher.layers} (the teacher's layers)")
    for w in widths:
        if not 1 <= w <= teacher.intermediate:
            raise EdgestillError(f"width {w} is outside 1..{teacher.intermediate} (the teacher's FFN)")
    return depths, widths


def candidate_hiddens(teacher: StudentShape, hiddens=None) -> list[int]:
    """The candidate hidden sizes, largest first (default: the teacher's alone; Minitron's hidden-channel cut is a
    lever to ask for), validated: a cut one below the teacher's, a multiple of 32 (every GGUF format's block) and of
    the heads, which the cut keeps (transformers refuses a Llama config whose hidden size is not)."""
    hiddens = sorted(set(hiddens or [teacher.hidden]), reverse=True)
    step = math.lcm(32, teacher.heads)
    for h in hiddens:
        if h != teacher.hidden and (not step <= h < teacher.hidden or h % step):
            fits = range(step, teacher.hidden, step)[::-1]
            raise EdgestillError(f"hidden size {h} cannot be cut to: it must be a multiple of {step} (32 for GGUF's "
                                 f"blocks, {teacher.heads} for the teacher's heads, which transformers needs) below the "
                                 f"teacher's {teacher.hidden}; " + (f"use {', '.join(map(str, fits))}" if fits else
                                                                     "this teacher has no such size"))
    return hiddens


def with_hidden(shape: StudentShape, hidden: int) -> StudentShape:
    """`shape` with its hidden channels cut to `hidden` (heads and head_dim kept, as models.width cuts them)."""
    if hidden == shape.hidden:
        return shape
    return dataclasses.replace(shape, hidden=hidden, head_dim=shape.dim_per_head)


def hidden_note(shape: StudentShape) -> str:
    """', hidden 416' for a shape whose hidden channels were cut (hidden no longer heads x head_dim), else ''."""
    return "" if shape.hidden == shape.heads * shape.dim_per_head else f", hidden {shape.hidden}"


def with_device_ram(budget: Budget, device: DeviceProfile) -> Budget:
    """`budget` with its RAM limit defaulted to the device's RAM for a model (what plan() holds a plan to)."""
    if budget.max_ram_bytes is not None:
        return budget
    return dataclasses.replace(budget, max_ram_bytes=int(device.ram_bytes.value))


def check_formats(formats) -> None:
    """One clear error unless `formats` names at least one format the cost model can price (and QAT can train)."""
    if not formats:
        raise EdgestillError(f"no candidate formats; choose from {', '.join(GGUF_FORMAT_NAMES)}")
    bad = [f for f in formats if f not in GGUF_FORMAT_NAMES]
    if bad:
        raise EdgestillError(f"formats {bad} are not GGUF formats; choose from {', '.join(GGUF_FORMAT_NAMES)}")


def student_floor(teacher: StudentShape, device: DeviceProfile, formats=DEFAULT_FORMATS, depths=None, widths=None,
                  workload: Workload = Workload(), metadata_bytes: int = 0, hiddens=None) -> Floor:
    """The Floor of plan(teacher, device, ..., formats, depths, widths, hiddens): arithmetic on the cost model only."""
    check_formats(formats)
    depths, widths = candidate_sizes(teacher, depths, widths)
    shape = with_hidden(dataclasses.replace(teacher, layers=depths[-1], intermediate=widths[-1]),
                        candidate_hiddens(teacher, hiddens)[-1])
    rates = Rates.of(device, workload.runtime)
    lowest_first = sorted(formats, key=lambda f: (format_bits(f), f))  # a cost tie goes to the fewer nominal bits
    costs = {u: {f: _unit_costs(shape, u, f, rates, workload.prompt_tokens) for f in lowest_first}
             for u in unit_names(shape.layers)}

    def embedding_bytes(fmt: str) -> int:  # an untied embedding is stored in the plan's default format
        return resolve_format(format_by_name(fmt), shape.hidden)[0].weight_bytes((shape.vocab, shape.hidden))

    embedding = min(lowest_first, key=embedding_bytes)

    def least(i: int) -> dict[str, str]:  # {unit: its format least in cost i}: 0 bytes, 1 decode s, 2 prefill s
        return {u: min(lowest_first, key=lambda f: by_format[f][i]) for u, by_format in costs.items()}

    def predicted(by_unit: dict[str, str]) -> Prediction:
        return predict(shape, {unit_pattern(u): f for u, f in by_unit.items()}, device, embedding, workload,
                       metadata_bytes)

    smallest = least(0)
    bound = dataclasses.replace(predicted(smallest), decode_tokens_per_s=predicted(least(1)).decode_tokens_per_s,
                                prefill_tokens_per_s=predicted(least(2)).prefill_tokens_per_s)
    return Floor(shape, smallest, bound)


def _size(n: float, up: bool = True) -> str:
    """Bytes as '61.3MB'. up: rounded up to a tenth, so a floor printed is never below the real one."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{-(-int(n) * 10 // scale) / 10:.1f}{unit}" if up else f"{n / scale:.4g}{unit}"
    return f"{int(n)}B"


def _speed_down(x: float) -> str:
    """Tokens/s rounded down to 3 significant digits, so a ceiling printed is never above the real one."""
    if not (math.isfinite(x) and x > 0):
        return f"{x:g}"
    step = 10.0 ** (math.floor(math.log10(x)) - 2)
    return f"{math.floor(x / step) * step:.6g}"


def floor_error(budget: Budget, floor: Floor, device: DeviceProfile, ram_from_device: bool = False,
                sources: dict[str, str] | None = None, fixes: dict[str, str] | None = None,
                hint: str = "") -> str | None:
    """The one line saying which limits of `budget` no plan can meet on `device`, or None if the floor meets them.

    It names the device, each broken limit with its value and where it came from (the option, or
    `sources` by constraint: the sweep's --budgets), the floor's student and its figures, and the least
    change that lets the floor through (`fixes` replaces one by constraint); `hint` says how the floor
    itself could go lower.
    """
    violated = budget.violations(floor.bound)
    if not violated:
        return None
    p = floor.bound
    flag = dict(zip(("ram", "file", "decode", "prefill"), BUDGET_FLAGS.values()))
    sources = {**flag, **({"ram": "the device's RAM for a model"} if ram_from_device else {}), **(sources or {})}
    asked = {"ram": f"peak RAM <= {_size(budget.max_ram_bytes or 0, up=False)}",
             "file": f"file <= {_size(budget.max_file_bytes or 0, up=False)}",
             "decode": f"decode >= {budget.min_decode_tokens_per_s or 0:g} tok/s",
             "prefill": f"prefill >= {budget.min_prefill_tokens_per_s or 0:g} tok/s"}
    ram_fix = (f"use a device with at least {_size(p.peak_ram_bytes)} of RAM for a model" if ram_from_device
               else f"raise {flag['ram']} to at least {_size(p.peak_ram_bytes)}")
    fix = {"ram": ram_fix, "file": f"raise {flag['file']} to at least {_size(p.file_bytes)}",
           "decode": f"lower {flag['decode']} to at most {_speed_down(p.decode_tokens_per_s)}",
           "prefill": f"lower {flag['prefill']} to at most {_speed_down(p.prefill_tokens_per_s)}", **(fixes or {})}
    needs = f"a {_size(p.file_bytes)} file and {_size(p.peak_ram_bytes)} peak RAM"
    if "decode" in violated:
        needs += f", and at best decodes {_speed_down(p.decode_tokens_per_s)} tok/s"
    if "prefill" in violated:
        needs += f", and at best prefills {_speed_down(p.prefill_tokens_per_s)} tok/s"
    broken = " and ".join(f"{asked[k]} ({sources[k]})" for k in violated)
    return (f"no student can meet the budget on {device.name} ({broken}): the smallest student edgestill can plan "
            f"here ({floor.describe()}) needs {needs}; " + "; ".join(fix[k] for k in violated) + hint)


def _lower_floor_hint(teacher: StudentShape, device: DeviceProfile, budget: Budget, floor: Floor, formats, widths,
                      workload: Workload, metadata_bytes: int, hiddens=None) -> str:
    """How `edgestill plan`'s own options lower the floor, said only where they would let it meet `budget`.

    Fewer layers (--depths) help when one layer would fit; a shorter --context when the weights fit the
    RAM limit and the KV cache and compute buffer do not.
    """
    hints = []
    if floor.shape.layers > 1:
        one = student_floor(teacher, device, formats, [1], widths, workload, metadata_bytes, hiddens)
        if not budget.violations(one.bound):
            hints.append(f"or plan fewer layers: with --depths 1 the smallest needs a {_size(one.bound.file_bytes)} "
                         f"file and {_size(one.bound.peak_ram_bytes)} peak RAM")
    p = floor.bound
    if "ram" in budget.violations(p) and p.file_bytes <= budget.max_ram_bytes:
        hints.append(f"the KV cache and compute buffer for a {workload.context_tokens}-token context take "
                     f"{_size(p.peak_ram_bytes - p.file_bytes)} of it (a shorter --context lowers them)")
    return "".join(f"; {h}" for h in hints)


def check_budget(teacher: StudentShape, device: str | DeviceProfile, budget: Budget, formats=DEFAULT_FORMATS,
                 depths=None, widths=None, workload: Workload = Workload(), metadata_bytes: int = 0,
                 plan_options: bool = True, hiddens=None) -> Floor:
    """Refuse, with one line, a budget no plan of these candidates can meet; call it before measuring anything.

    plan(), shrink --device and the sweep all call it first: pure arithmetic, milliseconds. Returns the
    Floor when the budget may be met. plan_options: the line may suggest `edgestill plan`'s --depths and
    --context (other commands do not have them).
    """
    device = load_device(device)
    full = with_device_ram(budget, device)
    floor = student_floor(teacher, device, formats, depths, widths, workload, metadata_bytes, hiddens)
    if not full.violations(floor.bound):
        return floor
    hint = (_lower_floor_hint(teacher, device, full, floor, formats, widths, workload, metadata_bytes, hiddens)
            if plan_options else "")
    raise EdgestillError(floor_error(full, floor, device, budget.max_ram_bytes is None, hint=hint))


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
         cache: dict | None = None, vocab_keep=None, hiddens: list[int] | None = None, probe=None,
         probe_batches=None) -> list[Plan]:
    """Ranked feasible student plans for `model` (a Llama-style teacher) on `device` within `budget`.

    batches: calibration token ids (held-out text is never used here). depths/widths: candidate layer
    counts and FFN sizes (defaults: 100/75/50/33/25% of the layers, 100/75/50% of the FFN). hiddens: candidate
    hidden sizes (default: the teacher's alone), cut Minitron-style by activation importance on `batches` as shrink
    cuts them (student.hidden_size; heads and head_dim kept); every layer/FFN candidate is tried at each.
    metadata_bytes: the tokenizer's share of the GGUF (cost.tokenizer_metadata_bytes(teacher.gguf)).
    cache: a dict kept between calls on the same model and batches (a sweep plans for several budgets): the
      reference logits, block influence and every candidate's structural KL are measured once.
    vocab_keep: the teacher token ids a trimmed vocabulary keeps (models/vocab.py's VocabTrim.kept), when the student
      is to be trimmed: every candidate then has that many embedding rows (pass the trimmed tokenizer's
      metadata_bytes too), and its structural KL compares the teacher with the student over the kept tokens only
      (both renormalised there, which is what the trimmed student is trained to match). What the trim itself costs
      is the teacher's probability on the tokens cut, on the calibration text: each plan's vocab records it, as a
      number beside the KL rather than inside it (a KL against a student that gives those tokens no mass is
      infinite). The layer sensitivities stay those measured over the whole vocabulary [R].
    probe: a plan.probe.RecoveryProbe; when on, the `probe.top` best plans (and the best at each hidden size) are
      each distilled for `probe.steps` KD steps on `probe_batches` (train-split blocks the calibration does not use,
      plan.probe.probe_batches), scored again on `batches`, and ranked by that KL + their quantization KL
      (Plan.recovery, Plan.rank_kl); the rest follow in their order as cut. Probe results are kept in `cache` too.
    A budget even the smallest candidate cannot meet raises EdgestillError before anything is measured
    (check_budget); one the floor meets but no allocation does names the nearest plan at the end.
    """
    import torch

    from edgestill.models.slice import block_influence, choose_layers, slice_decoder
    from edgestill.models.width import prune_width
    from edgestill.plan.sensitivity import layer_sensitivity, mean_kl, model_logits

    device = load_device(device)
    teacher_shape = StudentShape.from_config(model.config)
    columns = None
    if vocab_keep is not None:
        ids = sorted({int(i) for i in vocab_keep})
        if not ids or ids[0] < 0 or ids[-1] >= teacher_shape.vocab:
            raise EdgestillError(f"vocab_keep must hold token ids of the teacher's {teacher_shape.vocab}-row embedding "
                                 f"(got {len(ids)} ids{f', from {ids[0]} to {ids[-1]}' if ids else ''})")
        columns = torch.tensor(ids, dtype=torch.long)
        teacher_shape = dataclasses.replace(teacher_shape, vocab=len(columns))
    depths, widths = candidate_sizes(teacher_shape, depths, widths)
    hiddens = candidate_hiddens(teacher_shape, hiddens)
    # An impossible budget fails here, in milliseconds, not after the minutes of measurement below.
    check_budget(teacher_shape, device, budget, formats, depths, widths, workload, metadata_bytes, hiddens=hiddens)
    budget = with_device_ram(budget, device)
    model.eval()
    cache = {} if cache is None else cache
    if "reference" not in cache:
        with torch.no_grad():
            cache["reference"] = model_logits(model, batches)
    reference = cache["reference"]
    trim_record = None
    if columns is not None:
        full = reference
        reference = [r.index_select(-1, columns) for r in full]
        cut = sum(float((1 - (torch.logsumexp(k.double(), -1) - torch.logsumexp(r.double(), -1)).exp()).sum())
                  for k, r in zip(reference, full))
        trim_record = {"size": len(columns), "teacher_size": int(full[0].shape[-1]),
                       "teacher_mass_trimmed": cut / sum(ids.numel() for ids in batches)}
    trimmed = None if columns is None else len(columns)  # structural KLs over the kept tokens are cached apart
    if sensitivity is None:
        log.info("layer sensitivity: %d units x %d formats on %d calibration tokens", teacher_shape.layers + 1,
                 len(formats), sum(ids.numel() for ids in batches))
        sensitivity = layer_sensitivity(model, batches, formats, reference_logits=cache["reference"])  # whole vocabulary
    if "block_influence" not in cache:
        cache["block_influence"] = block_influence(model, batches)
    scores = cache["block_influence"]

    plans, nearest = [], None
    for depth in depths:
        layers = choose_layers(teacher_shape.layers, depth, scores)
        sens = sensitivity.remap(layers)
        for width, hidden in ((w, h) for w in widths for h in hiddens):
            shape = with_hidden(dataclasses.replace(teacher_shape, layers=depth, intermediate=width), hidden)
            narrower = {"intermediate_size": width} if width != teacher_shape.intermediate else {}
            if hidden != teacher_shape.hidden:
                narrower["hidden_size"] = hidden
            key = (depth, width, hidden, trimmed)
            if depth == teacher_shape.layers and not narrower:
                structural = 0.0  # the teacher itself, only quantized
            elif key in cache:
                structural = cache[key]
            else:
                student = slice_decoder(model, layers, allow_full=True)
                if narrower:  # FFN units and hidden channels ranked by their activations, as shrink cuts them
                    student = prune_width(student, batches, **narrower)
                structural = cache[key] = mean_kl(student, batches, reference, columns)
                del student
                log.info("candidate %d layers%s, ffn %d: structural KL %.4f", depth, hidden_note(shape), width,
                         structural)
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
                              quantization_kl=quant_kl, device=device.name, workload=workload, vocab=trim_record))
    if not plans:
        worst, shape, layers, state, p, violated = nearest
        mix = ", ".join(f"{n}x{fmt}" for fmt, n in Counter(state.values()).most_common())
        need = {"ram": f"max_ram_bytes >= {p.peak_ram_bytes}", "file": f"max_file_bytes >= {p.file_bytes}",
                "decode": f"min_decode_tokens_per_s <= {p.decode_tokens_per_s:.1f}",
                "prefill": f"min_prefill_tokens_per_s <= {p.prefill_tokens_per_s:.1f}"}
        raise EdgestillError(
            f"no student fits the budget on {device.name} ({budget.to_dict()}). The nearest: {shape.layers} layers "
            f"(teacher layers {layers}){hidden_note(shape)}, ffn {shape.intermediate}, at its lowest formats ({mix}): "
            f"{p.file_bytes / 1e6:.1f} MB file, {p.peak_ram_bytes / 1e6:.1f} MB peak RAM, "
            f"decode {p.decode_tokens_per_s:.1f} tok/s, prefill {p.prefill_tokens_per_s:.1f} tok/s; it would need "
            + ", ".join(need[k] for k in violated)
            + ". Relax the budget, allow lower formats, or add smaller depths/widths")
    plans.sort(key=lambda p: p.predicted_kl)
    if probe is not None and probe.on:
        plans = _probe(model, plans, batches, reference, columns, trimmed, probe, probe_batches, cache)
    return plans[:top] if top else plans


def _probe(model, plans: list[Plan], batches, reference, columns, trimmed, probe, probe_batches, cache: dict) -> list[Plan]:
    """The recovery probe (plan/probe.py) on the best `probe.top` plans and the best plan at each hidden size (the
    hidden cut changes the KL as cut the most, and recovery can undo it: a cut family may fill the top K alone);
    those are re-ranked by Plan.rank_kl, ahead of the rest."""
    from edgestill.models.slice import slice_decoder
    from edgestill.models.width import prune_width
    from edgestill.plan.probe import recover
    from edgestill.plan.sensitivity import mean_kl

    tried = plans[: probe.top]
    for hidden in sorted({p.shape.hidden for p in plans}, reverse=True):
        best = next(p for p in plans if p.shape.hidden == hidden)
        if all(best is not t for t in tried):
            tried.append(best)
    for i, p in enumerate(tried):
        key = ("probe", tuple(p.layers), p.shape.intermediate, p.shape.hidden, trimmed, probe.steps, probe.lr,
               probe.warmup_steps)
        if key not in cache:
            student = slice_decoder(model, p.layers, allow_full=True)
            narrower = {k: v for k, v in (("intermediate_size", p.shape.intermediate), ("hidden_size", p.shape.hidden))
                        if v != getattr(model.config, k)}
            if narrower:
                student = prune_width(student, batches, **narrower)
            start = time.perf_counter()
            losses = recover(student, model, probe_batches or [], probe, columns)
            cache[key] = {"steps": probe.steps, "kl": mean_kl(student, batches, reference, columns),
                          "losses": [round(x, 5) for x in losses], "wall_s": time.perf_counter() - start}
            del student
            log.info("recovery probe %d/%d, %d layers%s, ffn %d: KL %.4f as cut, %.4f after %d steps", i + 1,
                     len(tried), p.shape.layers, hidden_note(p.shape), p.shape.intermediate, p.structural_kl,
                     cache[key]["kl"], probe.steps)
        p.recovery = {**cache[key], "rank_kl": cache[key]["kl"] + p.quantization_kl}
    return sorted(tried, key=lambda p: p.rank_kl) + [p for p in plans if all(p is not t for t in tried)]


def uniform_bytes(shape: StudentShape, fmt: str, metadata_bytes: int = 0) -> int:
    """File bytes of `shape` with every weight in `fmt` (a convenience for budgets)."""
    return gguf_bytes(shape, {}, fmt, metadata_bytes)["file"]


def feasible_file_budgets(teacher: StudentShape, device: str | DeviceProfile, teacher_bytes: int, fractions,
                          formats=DEFAULT_FORMATS, metadata_bytes: int = 0,
                          hiddens=None) -> tuple[list[tuple[float, Budget]], dict]:
    """([(fraction, Budget(max_file_bytes=fraction x teacher_bytes))] for the fractions the smallest plannable student
    can meet, {fraction: why} for the others), before anything is measured; each drop is also logged as a warning.
    None left: one line, at once."""
    device = load_device(device)
    floor = student_floor(teacher, device, formats, metadata_bytes=metadata_bytes, hiddens=hiddens)
    n = teacher_bytes // floor.bound.file_bytes  # 1/n: the tightest fraction whose budget the floor's file fits
    fixes = {"file": f"use --budgets no tighter than 1/{n} of the teacher ({teacher_bytes / 1e6:.1f}MB in fp32)"
             if n >= 1 else "no file budget below the teacher's own size can be met"}
    budgets, dropped = [], {}
    for fraction in fractions:
        budget = Budget(max_file_bytes=max(1, int(teacher_bytes * fraction)))  # 0 bytes: refused by Budget
        why = floor_error(with_device_ram(budget, device), floor, device, ram_from_device=True, fixes=fixes,
                          sources={"file": f"--budgets {fraction:.4g} of the teacher"})
        if why is None:
            budgets.append((fraction, budget))
        else:
            dropped[fraction] = why
            log.warning("budget 1/%.0f of the teacher dropped before planning: %s", 1 / fraction, why)
    if not budgets:
        raise EdgestillError(f"no budget of the sweep can be met: {dropped[max(dropped)]}")
    return budgets, dropped
