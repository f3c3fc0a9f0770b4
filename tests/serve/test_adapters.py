"""Per-task LoRA adapters in serving: a run's PEFT adapter converted once, swapped per request over the same resident
weights (switching back gives the base model's answer exactly), an unknown adapter refused."""

from __future__ import annotations

import importlib.util

import httpx
import pytest
from conftest import make_peft_adapter
from test_server import running

from edgestill.errors import EdgestillError

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")


@needs_llama_cpp
def test_the_server_swaps_adapters_per_request_over_the_same_weights(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgestill.export.gguf import export_gguf
    from edgestill.jobs.serve import resolve_adapters
    from edgestill.serve.app import create_app
    from edgestill.serve.engine import Engine

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base = tmp_path / "base.gguf"
    export_gguf(model, AutoTokenizer.from_pretrained(tiny_model_dir), base, "f16")
    run = tmp_path / "run"
    make_peft_adapter(run / "adapters" / "bold", model.config, seed=1, scale=1.0)  # a run's own adapter (PEFT)
    adapters = resolve_adapters(None, [run], base)
    assert list(adapters) == ["bold"] and adapters["bold"].suffix == ".gguf"
    engine = Engine(base, name="tiny", n_ctx=128, adapters=adapters)
    try:
        with running(create_app(engine, policy="fifo", cache_entries=0)) as url:
            def ask(**extra):
                r = httpx.post(url + "/v1/completions", json={"prompt": "the king", "max_tokens": 8,
                                                              "temperature": 0.0, **extra}, timeout=60)
                assert r.status_code == 200, r.text
                return r.json()

            plain = ask()
            bold = ask(adapter="bold")
            again = ask()
            unknown = httpx.post(url + "/v1/completions", json={"prompt": "x", "adapter": "nope"}, timeout=60)
            metrics = httpx.get(url + "/metrics").text
        assert bold["edgestill"]["adapter"] == "bold" and plain["edgestill"]["adapter"] is None
        assert bold["choices"][0]["text"] != plain["choices"][0]["text"]
        assert again["choices"][0]["text"] == plain["choices"][0]["text"]  # back to the base weights, exactly
        assert unknown.status_code == 404 and "'bold'" in unknown.json()["error"]["message"]
        assert 'edgestill_adapter_requests_total{adapter="bold"} 1' in metrics
        assert "edgestill_adapter_switches_total 2" in metrics
    finally:
        engine.close()
    with pytest.raises(EdgestillError, match="write NAME=PATH"):
        resolve_adapters(["bold"], [], base)
