"""How edgestill loads a GGUF into llama.cpp: without llama.cpp's extra buffer types on AMX builds (whose AMX matmul
segfaults on decode, llama.cpp issue #20824), with them everywhere else, and the parameters restored afterwards."""

from __future__ import annotations

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from edgestill.evaluate.environment import environment  # noqa: E402
from edgestill.runtime import llamacpp  # noqa: E402


def _fake_build(monkeypatch, amx: bool) -> None:
    info = b"CPU : AVX2 = 1 | AMX_INT8 = 1 | " if amx else b"CPU : AVX2 = 1 | "
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: info)


@pytest.mark.parametrize("amx", [True, False])
def test_extra_buffer_types_are_off_exactly_on_amx_builds(monkeypatch, amx):
    _fake_build(monkeypatch, amx)
    seen = {}

    class Recorder:  # stands in for llama_cpp.Llama: what model parameters would it load with?
        def __init__(self, model_path, **kwargs):
            seen["use_extra_bufts"] = llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts
            seen["kwargs"] = kwargs

    monkeypatch.setattr(llama_cpp, "Llama", Recorder)
    default = llama_cpp.llama_cpp.llama_model_default_params
    llamacpp._load("model.gguf", n_ctx=32)
    assert seen["use_extra_bufts"] is (not amx) and seen["kwargs"] == {"verbose": False, "n_ctx": 32}
    assert llama_cpp.llama_cpp.llama_model_default_params is default  # restored
    assert llamacpp.uses_extra_buffer_types() is (not amx)
    assert environment(threads=1)["llamacpp_extra_buffer_types"] is (not amx)  # every timing records it


def test_a_failed_load_is_one_line_and_restores_the_parameters(monkeypatch):
    _fake_build(monkeypatch, True)

    def broken(model_path, **kwargs):
        raise ValueError("Failed to load model from file")

    monkeypatch.setattr(llama_cpp, "Llama", broken)
    default = llama_cpp.llama_cpp.llama_model_default_params
    with pytest.raises(llamacpp.EdgestillError, match="llama.cpp could not load 'bad.gguf' .ValueError"):
        llamacpp._load("bad.gguf")
    assert llama_cpp.llama_cpp.llama_model_default_params is default
