"""Device profiles: the shipped set, YAML round trips, errors that name the fix, the cached host profile."""

from __future__ import annotations

import pytest
import yaml

from edgestill.errors import EdgestillError
from edgestill.plan import hostbench
from edgestill.plan.devices import FIGURE_KINDS, DeviceProfile, list_devices
from edgestill.plan.load import load_device
from plan_fixtures import toy_device  # noqa: F401  (fixture)

REQUIRED = ("rpi4-4gb", "rpi5-8gb", "jetson-nano-4gb", "jetson-orin-nano-8gb", "phone-midrange", "host")


def test_the_issue_s_devices_are_listed():
    assert set(REQUIRED) <= set(list_devices())


@pytest.mark.parametrize("name", [n for n in list_devices() if n != "host"])
def test_shipped_profiles_load_round_trip_and_cite_every_figure(name):
    """Every YAML in plan/devices/ (a new profile is tested by being there)."""
    device = load_device(name)
    assert DeviceProfile.from_yaml(device.to_yaml()) == device
    figures = [device.ram_bytes, device.memory_bandwidth_bytes_per_s, *device.compute_flops_per_s.values()]
    for rt in device.runtimes.values():
        figures += [rt.bandwidth_efficiency, rt.compute_efficiency]
    for f in figures:
        assert f.kind in FIGURE_KINDS and f.source and f.value > 0
    assert "llama.cpp" in device.runtimes
    assert device.ram_bytes.value < 8.1e9  # RAM *available to a model*, never more than the board has


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(EdgestillError, match="rpi5-8gb.*host"):
        load_device("pi-zero")


def test_a_user_profile_from_a_path(tmp_path, toy_device):
    path = tmp_path / "board.yaml"
    path.write_text(toy_device.to_yaml())
    assert load_device(str(path)) == toy_device


def test_malformed_profiles_name_the_missing_field(tmp_path, toy_device):
    data = toy_device.to_dict()
    del data["memory_bandwidth_bytes_per_s"]
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EdgestillError, match="memory_bandwidth_bytes_per_s"):
        load_device(str(path))
    data = toy_device.to_dict()
    del data["ram_bytes"]["source"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EdgestillError, match="ram_bytes is missing 'source'"):
        load_device(str(path))
    data = toy_device.to_dict()
    data["runtimes"]["llama.cpp"]["bandwidth_efficiency"]["kind"] = "guessed"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EdgestillError, match="kind"):
        load_device(str(path))
    path.write_text("name: [unclosed")
    with pytest.raises(EdgestillError, match="not valid YAML"):
        load_device(str(path))


def test_host_profile_is_measured_once_then_cached(tmp_path, monkeypatch):
    calls = []
    real = hostbench.measure_host

    def counting(threads, **kw):
        calls.append(threads)
        return real(threads, buffer_mib=16, repeats=2)

    monkeypatch.setattr(hostbench, "measure_host", counting)
    first = load_device("host", cache_dir=tmp_path, calibrate_llamacpp=False)
    second = load_device("host", cache_dir=tmp_path, calibrate_llamacpp=False)
    assert calls == [2]  # the second load read the cache
    assert first == second
    assert first.memory_bandwidth_bytes_per_s.kind == "measured"
    assert first.memory_bandwidth_bytes_per_s.value > 1e8 and first.compute_flops_per_s["f32"].value > 1e8
    assert list(tmp_path.glob("host-*.json"))


def test_a_unique_prefix_names_a_shipped_device():
    from edgestill.errors import EdgestillError
    from edgestill.plan.load import load_device

    assert load_device("rpi5").name == load_device("rpi5-8gb").name
    with pytest.raises(EdgestillError, match="unknown device 'jetson'"):  # two Jetsons: ambiguous
        load_device("jetson")
