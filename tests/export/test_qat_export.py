"""Quantization-aware distillation end to end: the GGUF stores exactly the weights that were trained.

`edgestill shrink quant.format=q4_0 'quant.plan={lm_head: q8_0}'` on the tiny model, then the GGUF's
tensors are decoded with the gguf package and compared bit for bit with the saved PyTorch student,
and (with llama-cpp-python installed) llama.cpp's logits are compared with PyTorch's.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from edgestill.cli import main


@pytest.fixture(scope="module")
def qat_run(tiny_model_dir, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "run"
    assert main(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, out), "quant.format=q4_0",
                 "quant.plan={lm_head: q8_0}"]) == 0
    return out


def _gguf_tensors(path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, dequantize(t.data, t.tensor_type)) for t in reader.tensors}


def test_gguf_holds_exactly_the_trained_weights(qat_run):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(qat_run / "student")
    tensors = _gguf_tensors(qat_run / "student.gguf")
    layers = student.config.num_hidden_layers
    assert tensors["token_embd.weight"][0] == "Q8_0"  # the tied head's plan entry
    for i in range(layers):
        for gguf_name, module in (("ffn_down", student.model.layers[i].mlp.down_proj),
                                  ("ffn_up", student.model.layers[i].mlp.up_proj),
                                  ("attn_v", student.model.layers[i].self_attn.v_proj)):
            qtype, values = tensors[f"blk.{i}.{gguf_name}.weight"]
            assert qtype == "Q4_0"
            np.testing.assert_array_equal(values.reshape(module.weight.shape), module.weight.detach().numpy())
    emb = student.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(tensors["token_embd.weight"][1].reshape(emb.shape), emb)


def test_gguf_header_names_the_trained_file_type(qat_run):
    """general.file_type comes from the tensors written (mostly Q4_0 here, the head Q8_0), not the f16 a QAT export
    asks for, and general.quantization_version is ggml's GGML_QNT_VERSION, as llama.cpp's tools write them."""
    from gguf import GGML_QUANT_VERSION, GGUFReader, LlamaFileType

    fields = GGUFReader(str(qat_run / "student.gguf")).fields
    assert LlamaFileType(fields["general.file_type"].contents()) == LlamaFileType.MOSTLY_Q4_0
    assert fields["general.quantization_version"].contents() == GGML_QUANT_VERSION == 2
    if importlib.util.find_spec("llama_cpp") is not None:  # llama.cpp still loads it, and reads the same header
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(qat_run / "student.gguf"), n_ctx=64, verbose=False)
        try:
            assert llm.metadata["general.file_type"] == str(int(LlamaFileType.MOSTLY_Q4_0))
            assert llm.metadata["general.quantization_version"] == "2"
            assert llm.n_vocab() > 0
        finally:
            llm.close()


def test_metrics_count_the_gguf_bytes(qat_run):
    m = json.loads((qat_run / "metrics.json").read_text())
    assert m["student"]["artifact"].endswith("student.gguf")
    assert m["student"]["bytes"] == (qat_run / "student.gguf").stat().st_size
    fp16_bytes = m["student"]["params"] * 2
    assert m["student"]["bytes"] < 0.6 * fp16_bytes  # 4.5-8.5 bits per weight, not 16
    report = json.loads((qat_run / "quant_report.json").read_text())
    assert {r["format"]["format"] for r in report} == {"GGUFQ4_0", "GGUFQ8_0"}


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="needs llama-cpp-python: pip install 'edgestill[llamacpp]'")
def test_llamacpp_runs_the_qat_gguf_like_pytorch(qat_run):
    from transformers import AutoModelForCausalLM

    from edgestill.evaluate.metrics import logit_parity
    from edgestill.runtime.llamacpp import llamacpp_logits

    student = AutoModelForCausalLM.from_pretrained(qat_run / "student")
    ids = torch.randint(3, student.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = student(input_ids=ids).logits[0].numpy()
    parity = logit_parity(reference, llamacpp_logits(qat_run / "student.gguf", ids[0].tolist(), kv_type="f32"))
    # llama.cpp also rounds activations to 8 bits inside quantized matmuls, so agreement is high, not exact
    assert parity["top1_agreement"] >= 0.95, parity
