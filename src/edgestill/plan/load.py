"""Find a device profile: a shipped one by name (`rpi5-8gb`, or `rpi5`), `host` (this machine), or a YAML path.

It sits above both the profile format (devices.py) and the host benchmark (hostbench.py, which needs
the cost model, which needs the profile format), so none of them imports another in a circle.
"""

from __future__ import annotations

from pathlib import Path

from edgestill.errors import EdgestillError
from edgestill.plan.devices import HOST, DeviceProfile, list_devices, shipped_devices


def load_device(spec: str | Path | DeviceProfile, **host_kwargs) -> DeviceProfile:
    """A profile by name (`rpi5-8gb`, `host`), or from a YAML file path.

    `host` runs (or reads from cache) the micro-benchmark of edgestill.plan.hostbench; host_kwargs go
    to `hostbench.host_profile` (cache_dir, refresh, threads, calibrate_llamacpp).
    """
    if isinstance(spec, DeviceProfile):
        return spec
    text = str(spec)
    if text == HOST:
        from edgestill.plan.hostbench import host_profile

        return host_profile(**host_kwargs)
    shipped = shipped_devices()
    prefixed = [name for name in shipped if name.startswith(text + "-")]  # "rpi5" -> "rpi5-8gb"
    if text in shipped or len(prefixed) == 1:
        path = shipped[text if text in shipped else prefixed[0]]
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise EdgestillError(f"unknown device '{text}'; choose one of {', '.join(list_devices())}, "
                                 "or pass the path of a profile YAML file")
    return DeviceProfile.from_yaml(path.read_text(), where=str(path))
