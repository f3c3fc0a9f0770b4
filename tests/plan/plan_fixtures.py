"""Fixtures for edgestill.plan tests (imported by the test modules; tests/conftest.py is the shared one): a made-up device profile (no measurement), a 2-layer tiny model."""

from __future__ import annotations

import pytest

from edgestill.plan.devices import DeviceProfile, Figure, RuntimeProfile


def fig(value, kind="estimated"):
    return Figure(value=value, kind=kind, source="tests/plan/conftest.py")


@pytest.fixture
def toy_device():
    """A device whose figures are round numbers, so tests can reason about the cost model."""
    return DeviceProfile(
        name="toy", description="a made-up board for tests", threads=2,
        ram_bytes=fig(1e9), memory_bandwidth_bytes_per_s=fig(1e9),
        compute_flops_per_s={"f32": fig(1e10), "int8": fig(2e10)},
        runtimes={"llama.cpp": RuntimeProfile(
            bandwidth_efficiency=fig(0.5), compute_efficiency=fig(0.5),
            decode_weights_per_s={"q8_0": fig(4e9), "q4_0": fig(3e9)},
            token_overhead_s=fig(1e-4), layer_overhead_s=fig(1e-5))},
    )


@pytest.fixture
def kernel_bound_device(toy_device):
    """The toy board with memory so fast that kernels bound decode, and q4_0's kernel 4x slower than q8_0's.

    So the fewest bytes (q4_0) and the fastest decode (q8_0) need different formats.
    """
    import dataclasses

    runtime = dataclasses.replace(toy_device.runtimes["llama.cpp"],
                                  decode_weights_per_s={"q8_0": fig(4e9), "q4_0": fig(1e9)})
    return dataclasses.replace(toy_device, name="kernel-bound", memory_bandwidth_bytes_per_s=fig(1e13),
                               runtimes={"llama.cpp": runtime})


@pytest.fixture(scope="session")
def tiny2_dir(tmp_path_factory):
    """The shared tiny random Llama (hidden 64, vocab ~300) with 2 layers."""
    from conftest import build_tiny_model  # tests/conftest.py

    return build_tiny_model(tmp_path_factory.mktemp("tiny2"), num_layers=2)


@pytest.fixture
def tiny2(tiny2_dir):
    from conftest import load_tiny_teacher

    return load_tiny_teacher(tiny2_dir)


@pytest.fixture
def calib_batches():
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 250, (2, 16), generator=g) for _ in range(2)]
