"""The cost model: GGUF bytes equal what export_gguf writes (fallbacks included); RAM and speed
move the way physics says; the host fit recovers the constants it was given."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
from plan_fixtures import tiny2, tiny2_dir, toy_device  # noqa: F401  (fixtures)

from edgestill.errors import EdgestillError
from edgestill.export.gguf import export_gguf, format_quantize_fn
from edgestill.models.slice import count_params
from edgestill.plan import hostbench
from edgestill.plan.cost import (
    StudentShape,
    Workload,
    gguf_bytes,
    gguf_tensor_plan,
    linear_formats,
    predict,
    tokenizer_metadata_bytes,
)

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def _data_bytes(path) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return path.stat().st_size - reader.data_offset


def test_shape_from_config_counts_the_same_parameters(tiny2):
    shape = StudentShape.from_config(tiny2.config)
    assert shape.layers == 2 and shape.hidden == 64 and shape.tied
    assert shape.params() == count_params(tiny2)
    assert StudentShape.from_dict(shape.to_dict()) == shape


@pytest.mark.parametrize("fmt", ["f16", "q8_0", "q4_0", "q5_1", "q4_k"])
def test_predicted_gguf_bytes_equal_the_exported_file(tiny2, tiny2_dir, tmp_path, fmt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny2_dir)
    shape = StudentShape.from_config(tiny2.config)
    path = tmp_path / f"m-{fmt}.gguf"
    export_gguf(tiny2, tok, path, tensor_type=fmt)
    # the tokenizer is a fixed cost known from the teacher's GGUF (export copies it); here, from the file
    predicted = gguf_bytes(shape, {}, fmt, metadata_bytes=tokenizer_metadata_bytes(path))
    assert predicted["data"] == _data_bytes(path)  # exact: formats, fallbacks (q4_k -> q5_0 on rows of 64), padding
    assert abs(predicted["file"] - path.stat().st_size) <= 256  # the general.*/llama.* keys are estimated


@pytest.mark.parametrize("fmt", ["f16", "q8_0", "q4_0"])
def test_a_width_pruned_student_costs_what_its_export_stores(tiny2, tiny2_dir, tmp_path, fmt):
    """hidden 48 and 2 heads of 16 over 1 KV head (head_dim != hidden / heads): parameters and GGUF bytes still exact
    (rows of 48 do not fit Q8_0/Q4_0's 32-blocks, so those fall back as export does)."""
    from transformers import AutoTokenizer

    from edgestill.models.width import prune_width

    student = prune_width(tiny2, None, 48, 2, 1, 96, importance="weight")
    shape = StudentShape.from_config(student.config)
    assert (shape.hidden, shape.heads, shape.kv_heads, shape.dim_per_head, shape.intermediate) == (48, 2, 1, 16, 96)
    assert shape.params() == count_params(student)
    path = tmp_path / f"pruned-{fmt}.gguf"
    export_gguf(student, AutoTokenizer.from_pretrained(tiny2_dir), path, tensor_type=fmt)
    predicted = gguf_bytes(shape, {}, fmt, metadata_bytes=tokenizer_metadata_bytes(path))
    assert predicted["data"] == _data_bytes(path)


def test_a_mixed_plan_costs_what_the_mixed_export_stores(tiny2, tiny2_dir, tmp_path):
    from transformers import AutoTokenizer

    shape = StudentShape.from_config(tiny2.config)
    plan = {"re:model\\.layers\\.0\\.": "q4_0", "lm_head": "f16", "model.layers.1.mlp.down_proj": "q4_k"}
    formats = linear_formats(shape, plan, "q8_0")
    assert formats["model.layers.1.mlp.down_proj"] == ("q4_k", "q5_0")  # rows of 128: no 256-block
    assert formats["model.layers.0.self_attn.q_proj"] == ("q4_0", "q4_0")
    path = tmp_path / "mixed.gguf"
    export_gguf(tiny2, AutoTokenizer.from_pretrained(tiny2_dir), path, tensor_type="q8_0",
                quantize_fn=format_quantize_fn(gguf_tensor_plan(shape, plan, "q8_0")))
    assert gguf_bytes(shape, plan, "q8_0")["data"] == _data_bytes(path)


def test_lower_formats_are_smaller_and_decode_faster(toy_device):
    shape = StudentShape(layers=8, hidden=512, intermediate=1536, heads=8, kv_heads=4, vocab=8000)
    q8 = predict(shape, {}, toy_device, "q8_0")
    q4 = predict(shape, {}, toy_device, "q4_0")
    assert q4.file_bytes < q8.file_bytes and q4.peak_ram_bytes < q8.peak_ram_bytes
    assert q4.decode_tokens_per_s > q8.decode_tokens_per_s  # bandwidth-bound on this device
    assert q8.bits_per_weight == pytest.approx(8.5, rel=0.02)
    long = predict(shape, {}, toy_device, "q8_0", Workload(context_tokens=4096))
    assert long.kv_cache_bytes == 8 * q8.kv_cache_bytes and long.peak_ram_bytes > q8.peak_ram_bytes


def test_decode_is_bandwidth_bound_when_the_device_says_so(toy_device):
    shape = StudentShape(layers=4, hidden=1024, intermediate=4096, heads=16, kv_heads=4, vocab=32000)
    p = predict(shape, {}, toy_device, "q8_0", Workload(prompt_tokens=1))
    # toy device: 0.5 GB/s effective, q8_0 kernel 4e9 weights/s -> the weight bytes dominate
    floor_s = p.weight_bytes / 0.5e9
    assert 1 / p.decode_tokens_per_s == pytest.approx(floor_s, rel=0.05)


def test_bad_plans_are_refused():
    shape = StudentShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=300)
    with pytest.raises(EdgestillError, match="not a GGUF format"):
        gguf_bytes(shape, {"lm_head": "int4"})
    with pytest.raises(EdgestillError, match="heads"):
        StudentShape(layers=2, hidden=65, intermediate=128, heads=4, kv_heads=2, vocab=300)


def test_the_host_fit_recovers_the_constants_it_was_given(toy_device):
    """Synthesize the calibration timings from known rates with the cost model, fit them back."""
    from edgestill.plan.cost import Rates, decode_seconds, decode_work, prefill_seconds, prefill_work
    from edgestill.plan.devices import Figure

    truth = dict(token_overhead_s=2e-4, layer_overhead_s=3e-5)
    dec = {"f16": 1e9, "q8_0": 2e9, "q4_0": 3e9}
    dec_row = {"f16": 1e-8, "q8_0": 3e-8, "q4_0": 2e-8}
    pre = {"f16": 5e10, "q8_0": 6e10, "q4_0": 8e10}
    pre_row = {"f16": 1e-9, "q8_0": 0.0, "q4_0": 4e-9}
    dec_op = {"f16": 0.0, "q8_0": 5e-6, "q4_0": 2e-6}
    pre_op = {"f16": 1e-5, "q8_0": 0.0, "q4_0": 3e-6}
    fig = lambda v: Figure(v, "fit", "test")  # noqa: E731
    figs = lambda d: {k: fig(v) for k, v in d.items()}  # noqa: E731
    rt = dataclasses.replace(toy_device.runtimes["llama.cpp"], bandwidth_efficiency=fig(1.0),
                             decode_weights_per_s=figs(dec), decode_row_overhead_s=figs(dec_row),
                             prefill_flops_per_s=figs(pre), prefill_row_overhead_s=figs(pre_row),
                             decode_op_overhead_s=figs(dec_op), prefill_op_overhead_s=figs(pre_op),
                             token_overhead_s=fig(truth["token_overhead_s"]),
                             layer_overhead_s=fig(truth["layer_overhead_s"]))
    device = dataclasses.replace(toy_device, memory_bandwidth_bytes_per_s=fig(1e15), runtimes={"llama.cpp": rt})
    rates = Rates.of(device)
    position = hostbench.PROMPT_TOKENS + hostbench.DECODE_TOKENS // 2
    raw = {}
    for layers in hostbench.TINY_LAYERS:
        shape = StudentShape(layers=layers, **hostbench.TINY_SHAPE)
        in_cache = dataclasses.replace(rates, decode_op_overhead_s={})  # tiny weights never stream from DRAM
        raw[f"tiny{layers}"] = {"decode_tokens_per_s": 1 / decode_seconds(decode_work(shape, {}, "q8_0", position), layers,
                                                                          in_cache)}
    for name, kwargs in hostbench.RATE_SHAPES.items():
        shape = StudentShape(**kwargs)
        for fmt in dec:
            raw[f"{name}_{fmt}"] = {
                "decode_tokens_per_s": 1 / decode_seconds(decode_work(shape, {}, fmt, position), shape.layers, rates),
                "prefill_tokens_per_s": hostbench.PROMPT_TOKENS / prefill_seconds(
                    prefill_work(shape, {}, fmt, hostbench.PROMPT_TOKENS), shape.layers, rates)}
    fit = hostbench.fit_llamacpp(raw, tuple(dec), bandwidth=1e15)
    assert fit["token_overhead_s"] == pytest.approx(truth["token_overhead_s"], rel=0.05)
    assert fit["layer_overhead_s"] == pytest.approx(truth["layer_overhead_s"], rel=0.05)
    for fmt in dec:
        assert fit["decode_weights_per_s"][fmt] == pytest.approx(dec[fmt], rel=0.02)
        assert fit["decode_row_overhead_s"][fmt] == pytest.approx(dec_row[fmt], rel=0.02, abs=1e-12)
        assert fit["prefill_flops_per_s"][fmt] == pytest.approx(pre[fmt], rel=0.02)
        assert fit["prefill_row_overhead_s"][fmt] == pytest.approx(pre_row[fmt], rel=0.02, abs=1e-12)
        assert fit["decode_op_overhead_s"][fmt] == pytest.approx(dec_op[fmt], rel=0.05, abs=1e-10)
        assert fit["prefill_op_overhead_s"][fmt] == pytest.approx(pre_op[fmt], rel=0.05, abs=1e-10)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1", "q4_k", "q3_k", "q2_k"])
def test_synthetic_blocks_get_their_small_scales_where_the_format_keeps_them(tmp_path, fmt):
    """The fp16 scale fields (FormatSpec.scale_fields at scale_offset: Q3_K and Q2_K store them last) are set, so the
    random codes dequantize to small finite weights; the byte count is the cost model's."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    shape = StudentShape(layers=1, hidden=256, intermediate=512, heads=4, kv_heads=2, vocab=256)
    path = hostbench.write_synthetic_gguf(tmp_path / f"s-{fmt}.gguf", shape, fmt)
    assert gguf_bytes(shape, {}, fmt)["data"] == _data_bytes(path)
    blocks = [t for t in GGUFReader(str(path)).tensors if t.tensor_type.name == fmt.upper()]
    assert len(blocks) == 8  # 7 matrices and the tied embedding
    for t in blocks:
        w = dequantize(t.data, t.tensor_type)
        assert np.isfinite(w).all() and 0 < np.abs(w).max() < 1, t.name


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="needs llama-cpp-python")
def test_synthetic_calibration_models_are_the_predicted_size_and_run(tmp_path):
    shape = StudentShape(layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2, vocab=1024)
    for fmt in ("q4_k", "q5_1", "f16"):
        path = hostbench.write_synthetic_gguf(tmp_path / f"s-{fmt}.gguf", shape, fmt)
        assert gguf_bytes(shape, {}, fmt)["data"] == _data_bytes(path)
    from edgestill.runtime.llamacpp import llamacpp_speed

    speed = llamacpp_speed(path, prompt_tokens=8, decode_tokens=2, repeats=1, warmup=0)
    assert speed["decode_tokens_per_s"] > 0 and speed["prefill_tokens_per_s"] > 0


def test_training_flops_per_token_matches_torchs_count_of_the_matmuls():
    """Every Linear's forward and backward FLOPs, the frozen tied head's weight gradient left out, as torch counts
    them; attention is added on top (causal half of eager attention's bmm count)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgestill.plan.cost import training_flops_per_token

    config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.get_input_embeddings().weight.requires_grad_(False)  # distill.freeze_embeddings: the tied head too
    tokens = 16
    ids = torch.randint(0, 500, (1, tokens))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    shape = StudentShape.from_config(config)
    attention = 3 * 2 * tokens * 4 * 16 * 3  # causal: half of the bmm count below
    assert training_flops_per_token(shape, tokens) == counts["aten.mm"] / tokens + attention
    assert counts["aten.bmm"] / tokens == 2 * attention
    assert training_flops_per_token(shape, tokens, frozen_head=False) > training_flops_per_token(shape, tokens)


def test_a_trimmed_vocabulary_costs_what_its_export_stores(tiny2, tiny2_dir, tmp_path):
    """The planner prices a trimmed student (models/vocab.py) before it exists: its tokenizer's share of the GGUF, cut
    from the teacher's, and its embedding rows. Both must equal what export_gguf then writes."""
    import numpy as np
    from conftest import make_text
    from transformers import AutoTokenizer

    from edgestill.models.vocab import plan_trim, trim_embeddings_, trim_tokenizer, used_token_counts

    tok = AutoTokenizer.from_pretrained(tiny2_dir)
    teacher_gguf = tmp_path / "teacher.gguf"
    export_gguf(tiny2, tok, teacher_gguf, tensor_type="q8_0")
    ids = np.asarray(tok(make_text(0, 4))["input_ids"])
    trim = plan_trim(tok, used_token_counts(ids, len(tok)))
    assert 0 < trim.size < len(tok) and trim.merges  # a real cut, with merges kept and merges dropped
    predicted_meta = tokenizer_metadata_bytes(teacher_gguf, trim.kept, trim.merges)
    shape = dataclasses.replace(StudentShape.from_config(tiny2.config), vocab=trim.size)
    student = trim_embeddings_(tiny2, trim)
    path = tmp_path / "trimmed.gguf"
    export_gguf(student, trim_tokenizer(tok, trim), path, tensor_type="q8_0", teacher_gguf=teacher_gguf)
    assert predicted_meta == tokenizer_metadata_bytes(path) < tokenizer_metadata_bytes(teacher_gguf)
    predicted = gguf_bytes(shape, {}, "q8_0", metadata_bytes=predicted_meta)
    assert predicted["data"] == _data_bytes(path)
    assert abs(predicted["file"] - path.stat().st_size) <= 256  # the general.*/llama.* keys are estimated
