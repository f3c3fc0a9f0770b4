"""quantize_: STE gradients, prepare/convert parity on toy models, `re:` plans, fallbacks, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from torch import nn

from edgestill.errors import EdgestillError
from edgestill.quant import (
    GGUFF16,
    GGUFQ2_K,
    GGUFQ3_K,
    GGUFQ4_0,
    GGUFQ4_K,
    GGUFQ5_0,
    GGUFQ8_0,
    FakeQuantEmbedding,
    FakeQuantLinear,
    Int4Block,
    Int8PerChannel,
    QuantConfig,
    fake_quant_ste,
    gguf_quantize,
    quantize_,
    total_weight_bytes,
)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


@pytest.mark.parametrize("fmt", [GGUFQ4_0(), GGUFQ8_0(), GGUFQ4_K(), GGUFQ3_K(), GGUFQ2_K(), Int8PerChannel(),
                                 Int4Block()], ids=repr)
def test_ste_forward_is_fake_quant_and_gradient_is_identity(fmt):
    torch.manual_seed(0)
    w = torch.randn(8, 256, requires_grad=True)
    upstream = torch.randn(8, 256)
    w_hat = fake_quant_ste(w, fmt)
    assert bits_equal(w_hat, fmt.fake_quant(w)) and not torch.equal(w_hat, w)
    (w_hat * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_fake_quant_linear_uses_the_live_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    fq = FakeQuantLinear(linear, GGUFQ4_0())
    assert fq.weight is linear.weight and fq.bias is linear.bias  # same Parameters: ties and optimizers work
    x = torch.randn(3, 64)
    assert torch.equal(fq(x), nn.functional.linear(x, GGUFQ4_0().fake_quant(linear.weight), linear.bias))
    with torch.no_grad():
        linear.weight.mul_(3)
    assert torch.equal(fq(x), nn.functional.linear(x, GGUFQ4_0().fake_quant(linear.weight), linear.bias))
    assert set(dict(fq.named_parameters())) == {"weight", "bias"}


def test_prepare_train_convert_on_a_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    config = QuantConfig(default=GGUFQ4_K(), plan={"2": GGUFQ8_0()}, skip=["re:4$"])
    report = quantize_(model, config, step="prepare")
    assert [(r.name, r.fmt, r.fallback) for r in report] == [("0", GGUFQ4_K(), None), ("2", GGUFQ8_0(), None)]
    assert [type(m) for m in model] == [FakeQuantLinear, nn.ReLU, FakeQuantLinear, nn.ReLU, nn.Linear]
    assert [r.weight_bytes for r in report] == [64 * 144, 32 * 2 * 34]
    assert total_weight_bytes(report) == 64 * 144 + 32 * 2 * 34

    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # QAT: the float weights move, fake-quant follows
    x = torch.randn(16, 256)
    before = model[0].weight.detach().clone()
    model(x).square().mean().backward()
    opt.step()
    assert not torch.equal(before, model[0].weight)
    last_float = model[4].weight.detach().clone()

    live = {name: model[i].weight.detach().clone() for i, name in ((0, "Q4_K"), (2, "Q8_0"))}
    with torch.no_grad():
        prepared = model(x)
    quantize_(model, config, step="convert")
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    with torch.no_grad():
        assert torch.equal(model(x), prepared)
    for i, name in ((0, "Q4_K"), (2, "Q8_0")):  # frozen = what a GGUF file of the live weights decodes to
        fmt = GGUFQ4_K() if name == "Q4_K" else GGUFQ8_0()
        data, qtype = gguf_quantize(live[name], fmt)
        assert bits_equal(model[i].weight.detach(), torch.from_numpy(quants.dequantize(data, qtype)))
    assert torch.equal(model[4].weight, last_float)  # skipped


@pytest.mark.parametrize("fmt", [GGUFQ3_K(), GGUFQ2_K()], ids=repr)
def test_converted_below_4_bit_weights_are_exported_as_they_are(fmt):
    """QAT under 4 bits: the export re-encodes the converted weights, and must store exactly those values (llama.cpp's
    own quantizer would refit many of these blocks; see quant/q3_k.py, q2_k.py)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 64))
    with torch.no_grad():
        model[0].weight.view(-1)[::97] *= 30  # outliers, as real layers have
    config = QuantConfig(default=fmt)
    quantize_(model, config, step="prepare")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(16, 512)).square().mean().backward()
    opt.step()
    live = model[0].weight.detach().clone()
    quantize_(model, config, step="convert")
    trained = model[0].weight.detach()
    assert bits_equal(trained, fmt.fake_quant(live))
    data, qtype = gguf_quantize(trained, fmt)  # what `edgestill export` does with the saved student
    assert bits_equal(torch.from_numpy(quants.dequantize(data, qtype)), trained)


def test_convert_without_prepare_is_post_training_quantization():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8))
    original = model[0].weight.detach().clone()
    report = quantize_(model, QuantConfig(default=Int4Block(block_size=32)), step="convert")
    assert report[0].fmt == Int4Block() and type(model[0]) is nn.Linear
    assert bits_equal(model[0].weight.detach(), Int4Block().fake_quant(original))


def test_48_columns_with_q4_0_fall_back_to_f16_reported_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 16), nn.Linear(16, 64))  # 16 columns: Q8_0 falls back too
    original = model[0].weight.detach().clone()
    config = QuantConfig(default=GGUFQ4_0(), plan={"1": GGUFQ8_0()})
    report = quantize_(model, config, step="prepare")
    assert report[0].requested == GGUFQ4_0() and report[0].fmt == GGUFF16()
    assert "48" in report[0].fallback and "32" in report[0].fallback
    assert report[1].fmt == GGUFF16() and report[0].weight_bytes == 16 * 48 * 2
    x = torch.randn(4, 48)
    with torch.no_grad():
        prepared = model(x)
    quantize_(model, config, step="convert")
    f16 = GGMLQuantizationType.F16
    reference = quants.dequantize(quants.quantize(original.numpy(), f16), f16)
    assert bits_equal(model[0].weight.detach(), torch.from_numpy(reference))
    with torch.no_grad():
        assert torch.equal(model(x), prepared)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_prepare_convert_tiny_llama_with_a_regex_plan():
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    original = {name: m.weight.detach().clone()
                for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    config = QuantConfig(
        default=GGUFQ4_K(),
        plan={r"re:.*mlp\.down_proj": GGUFQ8_0(), r"re:.*self_attn\.[qk]_proj": GGUFQ4_0(),
              "lm_head": Int8PerChannel()},
        skip=[r"re:.*v_proj$"],
    )
    report = {r.name: r for r in quantize_(model, config, step="prepare")}

    assert len(report) == 2 * 6 + 1 and not any("v_proj" in name for name in report)
    assert report["model.layers.0.self_attn.q_proj"].fmt == GGUFQ4_0()
    assert report["model.layers.1.mlp.down_proj"].fmt == GGUFQ8_0()
    o_proj = report["model.layers.0.self_attn.o_proj"]  # Q4_K on rows of 64: llama.cpp's Q5_0 fallback
    assert o_proj.requested == GGUFQ4_K() and o_proj.fmt == GGUFQ5_0()
    assert "llama_tensor_get_type" in o_proj.fallback
    assert report["lm_head"].fmt == Int8PerChannel() and report["lm_head"].tied == ("model.embed_tokens",)
    assert isinstance(model.model.embed_tokens, FakeQuantEmbedding)
    assert isinstance(model.model.layers[0].self_attn.q_proj, FakeQuantLinear)
    assert type(model.model.layers[0].self_attn.v_proj) is nn.Linear

    ids = torch.randint(0, 96, (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()  # gradients reach the float weights through the fake quantizers
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    prepared = out.logits.detach()

    quantize_(model, config, step="convert")
    assert not any(isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)) for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, quantized once
    assert bits_equal(model.lm_head.weight.detach(), Int8PerChannel().fake_quant(original["lm_head"]))
    down = "model.layers.0.mlp.down_proj"
    assert bits_equal(model.get_submodule(down).weight.detach(), GGUFQ8_0().fake_quant(original[down]))
    v_proj = "model.layers.1.self_attn.v_proj"
    assert torch.equal(model.get_submodule(v_proj).weight, original[v_proj])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, prepared)


def test_config_errors_are_one_line_edgestill_errors():
    model = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(EdgestillError, match="matches no nn.Linear"):
        quantize_(model, QuantConfig(plan={"re:.*down_proj": GGUFQ8_0()}))
    with pytest.raises(EdgestillError, match="matches no nn.Linear"):
        quantize_(model, QuantConfig(skip=["lm_head"]))
    with pytest.raises(EdgestillError, match="not a format"):
        QuantConfig(default="Q6_K")  # a ggml type edgestill has no format for
    with pytest.raises(EdgestillError, match="not a format"):
        QuantConfig(plan={"0": 4})
    with pytest.raises(EdgestillError, match="step"):
        quantize_(model, QuantConfig(), step="train")
    quantize_(model, QuantConfig(default=GGUFQ4_0()))
    with pytest.raises(EdgestillError, match="already prepared"):
        quantize_(model, QuantConfig(default=GGUFQ4_0()))
    with pytest.raises(EdgestillError, match="prepared as"):
        quantize_(model, QuantConfig(default=GGUFQ8_0()), step="convert")
    with pytest.raises(EdgestillError, match="skips it"):
        quantize_(model, QuantConfig(default=GGUFQ4_0(), skip=["0"]), step="convert")


def test_quant_config_round_trips_through_json():
    config = QuantConfig(default=None, plan={r"re:.*mlp\..*": Int4Block(block_size=64, symmetric=False),
                                             "lm_head": GGUFQ8_0()}, skip=["re:.*norm"])
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(EdgestillError, match="unknown quantization format"):
        QuantConfig.from_dict({"default": "Q6_K"})
    assert QuantConfig().format_for("anything") == GGUFQ8_0()
    assert QuantConfig(default=None).format_for("anything") is None


def test_format_bytes_add_up_on_a_model():
    model = nn.Sequential(nn.Linear(512, 10), nn.Linear(10, 96))
    report = quantize_(model, QuantConfig(default=GGUFQ4_K(), plan={"1": Int4Block()}), step="convert")
    assert report[0].weight_bytes == 10 * 2 * 144
    assert report[1].weight_bytes == 96 * 1 * (16 + 4)  # one partial block of 10 per row
    assert report[0].bits_per_weight == GGUFQ4_K().bits_per_weight == 4.5
    assert json.loads(json.dumps(report[1].to_dict()))["format"] == {"format": "Int4Block", "block_size": 32,
                                                                      "symmetric": True}
    np.testing.assert_equal(Int8PerChannel().weight_bytes((4, 100)), 4 * 100 + 16)


def test_quant_config_takes_the_recipes_format_names():
    """Short names (any case, as recipes write them) are formats wherever a format goes, and a recipe's
    `quant` section is read as it is, its `format` being the default."""
    named = QuantConfig(default="q4_0", plan={"lm_head": "Q8_0", r"re:.*mlp\..*": "int4"}, skip=["x"])
    assert named == QuantConfig(default=GGUFQ4_0(), plan={"lm_head": GGUFQ8_0(), r"re:.*mlp\..*": Int4Block()},
                                skip=["x"])
    assert QuantConfig(default="q4_k").default == GGUFQ4_K() and QuantConfig(default="GGUFQ4_K").default == GGUFQ4_K()
    assert QuantConfig(default="q2_k").default == GGUFQ2_K()
    assert QuantConfig.from_dict({"format": "Q3_K"}).default == GGUFQ3_K()
    section = {"format": "q4_0", "plan": {"lm_head": "q8_0"}, "skip": ["x"], "activations": "llama.cpp"}
    config = QuantConfig.from_dict(section)
    assert config == QuantConfig(default=GGUFQ4_0(), plan={"lm_head": GGUFQ8_0()}, skip=["x"], activations="llama.cpp")
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # to_dict's layout is unchanged
    assert config.to_dict()["default"] == {"format": "GGUFQ4_0"}
    assert QuantConfig.from_dict({"format": None}).default is None
    with pytest.raises(EdgestillError, match="not both"):
        QuantConfig.from_dict({"format": "q4_0", "default": "q8_0"})
    with pytest.raises(EdgestillError, match="unknown quantization format 'q6_k'"):
        QuantConfig.from_dict({"format": "q6_k"})
