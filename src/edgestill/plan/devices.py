"""Device profiles: what a target can hold and how fast it reads and multiplies.

EdgeDistill (docs/references.md [8]) allocates bits against a *device profile*: memory plus a
latency model. The seed gives no profile format; this one is reconstructed [R]. A profile is a
YAML file with, for every figure, its value, whether it is a `spec` (a vendor sheet), `measured`
(by someone, on the device), `estimated` (derived from other figures, with the reasoning in `note`)
or `fit` (fitted by edgestill's host micro-benchmark on shapes separate from any validation), and
where it comes from (a URL, or the edgestill function that measured it):

    name: rpi5-8gb
    description: Raspberry Pi 5 (8 GB), 4x Cortex-A76 @ 2.4 GHz, LPDDR4X-4267
    threads: 4
    ram_bytes: {value: 6.0e9, kind: estimated, source: https://..., note: 8 GB minus OS and desktop}
    memory_bandwidth_bytes_per_s: {value: ..., kind: measured, source: https://...}
    compute_flops_per_s:            # peak-ish matmul throughput of the CPU (or GPU) by precision
      f32: {value: ..., kind: estimated, source: ..., note: ...}
    runtimes:
      llama.cpp:                    # per-runtime efficiency factors of the cost model (plan/cost.py)
        bandwidth_efficiency: {value: 0.6, kind: estimated, source: ...}
        decode_weights_per_s: {q8_0: {...}, q4_0: {...}}   # optional: kernel-bound decode rates
        decode_row_overhead_s: {q8_0: {...}, ...}          # optional: fixed cost per output row (dot product)
        decode_op_overhead_s: {q8_0: {...}, ...}           # optional: fixed cost per matmul (weights from DRAM)
        prefill_flops_per_s: {q8_0: {...}, q4_0: {...}}    # optional: per-format prefill throughput
        prefill_row_overhead_s: {q8_0: {...}, ...}         # optional: per output row and token
        prefill_op_overhead_s: {q8_0: {...}, ...}          # optional: per matmul
        compute_efficiency: {value: 0.4, ...}              # used where a per-format rate is absent
        token_overhead_s: {...}                            # optional: fixed cost per decode step
        layer_overhead_s: {...}                            # optional: per decoder layer per step

Profiles shipped with edgestill live in `edgestill/plan/devices/*.yaml` (`list_devices()`); a user
adds one by passing a path (`load_device("my-board.yaml")`, `edgestill plan --device my-board.yaml`).
`host` is this machine, measured by `edgestill.plan.hostbench` and cached. `load_device` (plan/load.py)
finds any of them; this module is the profile format only, so the cost model and the host benchmark
can build on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgestill.errors import EdgestillError

DEVICES_DIR = Path(__file__).parent / "devices"
FIGURE_KINDS = ("spec", "measured", "estimated", "fit")
HOST = "host"


@dataclass(frozen=True)
class Figure:
    """One number of a profile, with where it comes from (`kind` is one of FIGURE_KINDS)."""

    value: float
    kind: str
    source: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = {"value": self.value, "kind": self.kind, "source": self.source}
        if self.note:
            data["note"] = self.note
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Figure:
        if not isinstance(data, dict):
            raise EdgestillError(f"{where} must be a mapping {{value, kind, source[, note]}}, got {data!r}")
        for key in ("value", "kind", "source"):
            if key not in data:
                raise EdgestillError(f"{where} is missing '{key}'; every figure needs value, kind "
                                     f"({'/'.join(FIGURE_KINDS)}) and source (a URL or how it was measured)")
        unknown = set(data) - {"value", "kind", "source", "note"}
        if unknown:
            raise EdgestillError(f"{where} has unknown keys {sorted(unknown)}; use value, kind, source, note")
        if data["kind"] not in FIGURE_KINDS:
            raise EdgestillError(f"{where}.kind = {data['kind']!r}; use one of {', '.join(FIGURE_KINDS)}")
        try:
            value = float(data["value"])
        except (TypeError, ValueError):
            raise EdgestillError(f"{where}.value = {data['value']!r} is not a number") from None
        if not value > 0:
            raise EdgestillError(f"{where}.value = {value} must be positive")
        return cls(value=value, kind=str(data["kind"]), source=str(data["source"]), note=str(data.get("note", "")))


def _figures(data: Any, where: str) -> dict[str, Figure]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EdgestillError(f"{where} must be a mapping of names to figures")
    return {str(k): Figure.from_dict(v, f"{where}.{k}") for k, v in data.items()}


_PER_FORMAT = ("decode_weights_per_s", "prefill_flops_per_s", "decode_row_overhead_s", "prefill_row_overhead_s",
               "decode_op_overhead_s", "prefill_op_overhead_s")


@dataclass(frozen=True)
class RuntimeProfile:
    """How well one runtime (llama.cpp, onnxruntime, ...) uses the device: the cost model's factors.

    decode:  a token reads every weight once; each tensor takes the larger of bytes / (bandwidth *
             bandwidth_efficiency) and weights / decode_weights_per_s[format] + rows *
             decode_row_overhead_s[format] + decode_op_overhead_s[format] (kernel-bound), plus token_overhead_s + layers *
             layer_overhead_s (graph and thread scheduling).
    prefill: compute-bound, 2 FLOPs per weight per token at prefill_flops_per_s[format] (+ rows x tokens
             * prefill_row_overhead_s[format] + prefill_op_overhead_s[format]), or the device's compute_flops_per_s * compute_efficiency
             where no per-format rate is given.
    """

    bandwidth_efficiency: Figure
    compute_efficiency: Figure
    decode_weights_per_s: dict[str, Figure] = field(default_factory=dict)
    prefill_flops_per_s: dict[str, Figure] = field(default_factory=dict)
    decode_row_overhead_s: dict[str, Figure] = field(default_factory=dict)
    prefill_row_overhead_s: dict[str, Figure] = field(default_factory=dict)
    decode_op_overhead_s: dict[str, Figure] = field(default_factory=dict)
    prefill_op_overhead_s: dict[str, Figure] = field(default_factory=dict)
    token_overhead_s: Figure | None = None
    layer_overhead_s: Figure | None = None
    prefill_token_overhead_s: Figure | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"bandwidth_efficiency": self.bandwidth_efficiency.to_dict(),
                                "compute_efficiency": self.compute_efficiency.to_dict()}
        for name in _PER_FORMAT:
            if getattr(self, name):
                data[name] = {k: f.to_dict() for k, f in getattr(self, name).items()}
        for name in ("token_overhead_s", "layer_overhead_s", "prefill_token_overhead_s"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name).to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> RuntimeProfile:
        if not isinstance(data, dict):
            raise EdgestillError(f"{where} must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise EdgestillError(f"{where} has unknown keys {sorted(unknown)}; known: {', '.join(sorted(known))}")
        for key in ("bandwidth_efficiency", "compute_efficiency"):
            if key not in data:
                raise EdgestillError(f"{where} is missing '{key}' (a figure: value, kind, source)")
        optional = {k: Figure.from_dict(data[k], f"{where}.{k}")
                    for k in ("token_overhead_s", "layer_overhead_s", "prefill_token_overhead_s") if k in data}
        return cls(
            bandwidth_efficiency=Figure.from_dict(data["bandwidth_efficiency"], f"{where}.bandwidth_efficiency"),
            compute_efficiency=Figure.from_dict(data["compute_efficiency"], f"{where}.compute_efficiency"),
            **{k: _figures(data.get(k), f"{where}.{k}") for k in _PER_FORMAT},
            **optional,
        )


_REQUIRED = ("name", "description", "threads", "ram_bytes", "memory_bandwidth_bytes_per_s",
             "compute_flops_per_s", "runtimes")


@dataclass(frozen=True)
class DeviceProfile:
    """A target device: RAM a model may use, memory bandwidth, compute by precision, runtimes.

    ram_bytes: what a model process may use (physical RAM minus the OS and what usually runs).
    memory_bandwidth_bytes_per_s: sustained read bandwidth (STREAM-like), not the bus peak.
    compute_flops_per_s: matmul throughput by precision ("f32", "f16", "int8") with `threads`.
    """

    name: str
    description: str
    threads: int
    ram_bytes: Figure
    memory_bandwidth_bytes_per_s: Figure
    compute_flops_per_s: dict[str, Figure]
    runtimes: dict[str, RuntimeProfile]
    notes: str = ""

    def runtime(self, name: str) -> RuntimeProfile:
        if name not in self.runtimes:
            raise EdgestillError(f"device '{self.name}' has no figures for runtime '{name}'; "
                                 f"it has {', '.join(self.runtimes) or 'none'} (add a runtimes.{name} entry)")
        return self.runtimes[name]

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name, "description": self.description, "threads": self.threads,
            "ram_bytes": self.ram_bytes.to_dict(),
            "memory_bandwidth_bytes_per_s": self.memory_bandwidth_bytes_per_s.to_dict(),
            "compute_flops_per_s": {k: f.to_dict() for k, f in self.compute_flops_per_s.items()},
            "runtimes": {k: r.to_dict() for k, r in self.runtimes.items()},
        }
        if self.notes:
            data["notes"] = self.notes
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "device profile") -> DeviceProfile:
        if not isinstance(data, dict):
            raise EdgestillError(f"{where} must be a YAML mapping with {', '.join(_REQUIRED)}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise EdgestillError(f"{where} is missing {', '.join(missing)}; a profile needs "
                                 f"{', '.join(_REQUIRED)} (see edgestill/plan/devices/rpi5-8gb.yaml)")
        unknown = set(data) - {*_REQUIRED, "notes"}
        if unknown:
            raise EdgestillError(f"{where} has unknown keys {sorted(unknown)}")
        try:
            threads = int(data["threads"])
        except (TypeError, ValueError):
            raise EdgestillError(f"{where}.threads = {data['threads']!r} is not an integer") from None
        compute = _figures(data["compute_flops_per_s"], f"{where}.compute_flops_per_s")
        if not compute:
            raise EdgestillError(f"{where}.compute_flops_per_s needs at least one precision (f32, f16, int8)")
        runtimes = data["runtimes"]
        if not isinstance(runtimes, dict) or not runtimes:
            raise EdgestillError(f"{where}.runtimes needs at least one runtime (e.g. llama.cpp)")
        return cls(
            name=str(data["name"]), description=str(data["description"]), threads=threads,
            ram_bytes=Figure.from_dict(data["ram_bytes"], f"{where}.ram_bytes"),
            memory_bandwidth_bytes_per_s=Figure.from_dict(data["memory_bandwidth_bytes_per_s"],
                                                          f"{where}.memory_bandwidth_bytes_per_s"),
            compute_flops_per_s=compute,
            runtimes={str(k): RuntimeProfile.from_dict(v, f"{where}.runtimes.{k}") for k, v in runtimes.items()},
            notes=str(data.get("notes", "")),
        )

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=110)

    @classmethod
    def from_yaml(cls, text: str, where: str = "device profile") -> DeviceProfile:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise EdgestillError(f"{where} is not valid YAML ({str(e).splitlines()[0]})") from None
        return cls.from_dict(data, where)


def shipped_devices() -> dict[str, Path]:
    """{name: path} of the profiles shipped in edgestill/plan/devices/."""
    return {p.stem: p for p in sorted(DEVICES_DIR.glob("*.yaml"))}


def list_devices() -> list[str]:
    """Names `load_device` accepts: the shipped profiles and `host`."""
    return [*shipped_devices(), HOST]


def describe_devices() -> str:
    """A table of the shipped profiles (and how to get `host`), for `edgestill devices`."""
    lines = [f"{'device':22s} {'RAM for a model':>15s} {'bandwidth':>11s} {'f32 peak':>10s}  description"]
    for name, path in shipped_devices().items():
        d = DeviceProfile.from_yaml(path.read_text(), where=str(path))
        f32 = d.compute_flops_per_s.get("f32")
        lines.append(f"{name:22s} {d.ram_bytes.value / 1e9:12.1f} GB {d.memory_bandwidth_bytes_per_s.value / 1e9:6.1f} GB/s "
                     f"{(f32.value / 1e9 if f32 else float('nan')):6.0f} GF/s  {d.description}")
    lines.append(f"{HOST:22s} {'(measured)':>15s} {'':>11s} {'':>10s}  this machine: a short micro-benchmark, "
                 "cached (edgestill devices --show host)")
    lines.append("Every figure says whether it is spec, measured, estimated or fit, and its source: "
                 "edgestill devices --show NAME. Your own board: --device path/to/board.yaml")
    return "\n".join(lines)
