"""ONNX export: onnxruntime computes what the PyTorch (fake-quant) model computes, from quantized bytes.

Each format is exported once from the tiny model. With onnxruntime's basic graph optimizations the
logits equal PyTorch's to float rounding (the packed weights are exact); with its default
optimizations ORT may rewrite an int8 DequantizeLinear+MatMul into an int8-activation kernel, so
there only top-1 agreement is required.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import load_tiny_teacher, tiny_overrides
from edgestill.cli import main
from edgestill.errors import EdgestillError
from edgestill.export.onnx import export_onnx
from edgestill.quant.formats import GGUFQ4_0, GGUFQ4_1, GGUFQ8_0, Int4Block, Int8PerChannel
from edgestill.runtime.onnx import check_onnx, onnx_logits, onnx_session

FORMATS = {"q4_0": GGUFQ4_0(), "q8_0": GGUFQ8_0(), "int4": Int4Block(), "int4_asym": Int4Block(symmetric=False),
           "int8": Int8PerChannel(), "f32": None}


def _linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _fake_quant_copy(model, formats):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if name in formats:
                module.weight.copy_(formats[name].fake_quant(module.weight))
    return ref


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    model = load_tiny_teacher(tiny_model_dir)
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for key, fmt in FORMATS.items():
        formats = {n: fmt for n in _linears(model)} if fmt is not None else {}
        if key == "int4_asym":  # the tied head + embedding stay float: asymmetric gathers are refused
            formats.pop("lm_head")
        report = export_onnx(model, root / f"{key}.onnx", formats)
        out[key] = (report, _fake_quant_copy(model, formats), formats)
    return out


def _basic_session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("key", list(FORMATS))
def test_onnxruntime_matches_pytorch_fake_quant(exported, key):
    report, reference, _ = exported[key]
    ids = torch.arange(3 * 21).reshape(3, 21) * 7 % reference.config.vocab_size  # batch and length not traced
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.numpy()
    got = _basic_session(report.path).run(["logits"], {"input_ids": ids.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    default = onnx_logits(report.path, ids[0])  # onnxruntime's default optimizations
    assert (default.argmax(-1) == expected[0].argmax(-1)).mean() >= 0.99


def test_quantized_weights_leave_the_file(exported):
    """Bytes really shrink: no float copy of a quantized weight is left, and the tied table is stored once."""
    import onnx
    from onnx import numpy_helper

    sizes = {k: exported[k][0].file_bytes for k in FORMATS}
    assert sizes["q4_0"] < 0.7 * sizes["f32"] and sizes["int4"] < 0.7 * sizes["f32"]
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f32"]
    report, reference, _ = exported["q4_0"]
    assert report.float_matmuls == 0
    vocab, hidden = reference.get_input_embeddings().weight.shape
    proto = onnx.load(str(report.path))
    float_tables = [i.name for i in proto.graph.initializer
                    if numpy_helper.to_array(i).dtype == np.float32 and numpy_helper.to_array(i).size >= vocab * hidden // 4]
    assert float_tables == []
    ops = {n.op_type for n in proto.graph.node}
    assert "MatMulNBits" in ops and "MatMul" in ops  # MatMul remains only for attention scores
    assert set(report.formats) >= set(_linears(reference)) | {"model.embed_tokens"}


def test_q4_0_bytes_are_the_gguf_codes(exported):
    """MatMulNBits holds exactly Q4_0's 4-bit codes and fp16-valued scales, repacked."""
    import onnx
    from onnx import numpy_helper

    report, reference, _ = exported["q4_0"]
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(report.path)).graph.initializer}
    w = reference.model.layers[0].mlp.down_proj.weight.detach()  # (N, K), already Q4_0 values
    packed, scales = inits["model_layers_0_mlp_down_proj_B"], inits["model_layers_0_mlp_down_proj_scales"]
    n, k = w.shape
    assert packed.shape == (n, k // 32, 16) and packed.dtype == np.uint8
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, k // 32, 32).astype(np.float32)
    assert np.array_equal(scales.astype(np.float16).astype(np.float32), scales)
    np.testing.assert_array_equal(((codes - 8) * scales.reshape(n, -1, 1)).reshape(n, k), w.numpy())


def test_formats_without_an_onnx_op_are_refused(tiny_model_dir, tmp_path):
    model = load_tiny_teacher(tiny_model_dir)
    with pytest.raises(EdgestillError, match="no exact ONNX operator"):
        export_onnx(model, tmp_path / "m.onnx", {"model.layers.0.mlp.up_proj": GGUFQ4_1()})
    with pytest.raises(EdgestillError, match="not a Linear"):
        export_onnx(model, tmp_path / "m.onnx", {"model.layers.0.mlp": GGUFQ4_0()})
    assert not (tmp_path / "m.onnx").exists()


def test_corrupt_and_truncated_onnx_are_rejected(exported, tmp_path):
    good = exported["q4_0"][0].path.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(good[: len(good) // 2])
    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    for name in ("truncated.onnx", "random.onnx"):
        with pytest.raises(EdgestillError, match="not a valid ONNX model"):
            onnx_session(tmp_path / name)
    with pytest.raises(EdgestillError, match="not found"):
        check_onnx(tmp_path / "missing.onnx")


def test_cli_exports_a_qat_run_with_its_trained_formats(tiny_model_dir, tiny_corpus, tmp_path, capsys):
    import json

    out = tmp_path / "run"
    assert main(["shrink", *tiny_overrides(tiny_model_dir, tiny_corpus, out, steps=2), "quant.format=q4_0",
                 "quant.plan={lm_head: q8_0}"]) == 0
    assert main(["export", str(out), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime vs PyTorch" in printed
    result = json.loads((out / "onnx" / "export_report.json").read_text())
    assert result["formats"]["lm_head"].startswith("GGUFQ8_0") and result["formats"]["model.embed_tokens"].endswith("(tied)")
    assert result["formats"]["model.layers.0.mlp.down_proj"].startswith("GGUFQ4_0")
    assert result["parity_vs_pytorch"]["top1_agreement"] >= 0.99
    assert (out / "onnx" / "tokenizer.json").is_file()
    # --type on a float export; a GGUF-only format is refused with the ones that work
    assert main(["export", str(out), "--format", "onnx", "--type", "q4_1"]) == 2
    assert "choose one of f32, q8_0, q4_0, int8, int4" in capsys.readouterr().err  # the registry's ONNX formats
