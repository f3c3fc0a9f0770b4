"""edgestill.plan: device profiles, a cost model, layer sensitivity and bit allocation (EdgeDistill [8]).

    from edgestill.plan import Budget, load_device, plan
    plans = plan(teacher, "rpi5-8gb", Budget(max_ram_bytes=300_000_000, min_decode_tokens_per_s=20), batches)
    plans[0].quant_config()        # a QuantConfig for quantize_; plans[0].layers / .shape for slicing

Modules: devices (the profile format, shipped YAML in devices/), cost (bytes, RAM, tokens/s), hostbench
(the measured `host` profile), load (load_device: a shipped profile, `host` or a YAML path),
sensitivity (per-layer KL), allocate (greedy allocation, plan()).
Names are imported lazily so that `import edgestill.plan` stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DeviceProfile": "devices", "Figure": "devices", "RuntimeProfile": "devices", "load_device": "load",
    "list_devices": "devices", "host_profile": "hostbench", "StudentShape": "cost", "Workload": "cost",
    "Prediction": "cost", "predict": "cost", "gguf_bytes": "cost", "gguf_tensor_plan": "cost",
    "Sensitivity": "sensitivity", "layer_sensitivity": "sensitivity",
    "Budget": "allocate", "Plan": "allocate", "allocate": "allocate", "plan": "allocate",
    "parse_bytes": "allocate", "check_budget": "allocate", "DEFAULT_FORMATS": "allocate",
    "cached_sensitivity": "sensitivity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"edgestill.plan.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'edgestill.plan' has no attribute {name!r}")
