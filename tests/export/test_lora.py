"""A PEFT LoRA adapter as a llama.cpp LoRA GGUF: llama.cpp with the adapter computes the logits of the model with the
adapter merged in (W + alpha/r B A) in transformers; bad adapters are refused in one line."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from conftest import make_peft_adapter

from edgestill.errors import EdgestillError

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")
@pytest.fixture(scope="module")
def tiny_base(tiny_model_dir, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgestill.export.gguf import export_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = tmp_path_factory.mktemp("lora") / "base-f32.gguf"
    export_gguf(model, tokenizer, path, tensor_type="f32")
    return model, tokenizer, path


@needs_llama_cpp
def test_llama_cpp_with_the_adapter_computes_the_merged_model(tiny_base, tmp_path):
    import copy

    import torch
    from llama_cpp import Llama

    from edgestill.export.lora import export_lora_gguf, read_peft_adapter

    model, tokenizer, base = tiny_base
    folder = make_peft_adapter(tmp_path / "peft", model.config)
    lora = export_lora_gguf(folder, base, tmp_path / "adapter.gguf")
    merged = copy.deepcopy(model)
    pairs, alpha, rank = read_peft_adapter(folder)
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            merged.get_submodule(module).weight += torch.from_numpy(alpha / rank * b @ a)
    ids = tokenizer("the king and the queen walked into the hall", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = merged(torch.tensor([ids])).logits[0].numpy()
        plain = model(torch.tensor([ids])).logits[0].numpy()
    def llama_cpp_logits(**adapter):
        llm = Llama(str(base), n_ctx=64, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0,  # f32 KV
                    **adapter)
        try:
            llm.eval(ids)
            return np.array(llm.scores[: len(ids)])
        finally:
            llm.close()

    got, base_got = llama_cpp_logits(lora_path=str(lora)), llama_cpp_logits()
    floor = np.abs(base_got - plain).max()  # llama.cpp against transformers without any adapter
    print(f"max |llama.cpp - transformers|: {np.abs(got - want).max():.2e} with the adapter, {floor:.2e} without")
    assert np.abs(want - plain).max() > 0.1  # the adapter changes the model...
    assert floor < 1e-4 and np.abs(got - want).max() < 1e-4  # ...and llama.cpp applies it as transformers merges it


def test_bad_adapters_are_refused_in_one_line(tiny_base, tmp_path):
    from edgestill.export.lora import export_lora_gguf

    model, _, base = tiny_base
    with pytest.raises(EdgestillError, match="not a PEFT LoRA adapter folder.*safetensors"):
        export_lora_gguf(tmp_path, base, tmp_path / "x.gguf")
    folder = make_peft_adapter(tmp_path / "wide", model.config)
    config = model.config.__class__(**{**model.config.to_dict(), "hidden_size": 32, "num_attention_heads": 2,
                                       "intermediate_size": 64})
    make_peft_adapter(folder, config)  # the same folder, now for a narrower model
    with pytest.raises(EdgestillError, match="trained for another model"):
        export_lora_gguf(folder, base, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(EdgestillError, match="only LoRA adapters"):
        export_lora_gguf(folder, base, tmp_path / "x.gguf")
