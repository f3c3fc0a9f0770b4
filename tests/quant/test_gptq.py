"""GPTQ: parity with RTN when there is nothing to compensate, lower output error than RTN when
there is, fixed points of the formats (so exports store exactly these values), the sequential
pipeline on a tiny Llama, and its report."""

from __future__ import annotations

import copy

import pytest
import torch
from gguf import quants
from torch import nn

from edgestill.errors import EdgestillError
from edgestill.quant import (
    GGUFF16,
    GGUFQ2_K,
    GGUFQ3_K,
    GGUFQ4_0,
    GGUFQ4_1,
    GGUFQ4_K,
    GGUFQ5_0,
    GGUFQ5_1,
    GGUFQ8_0,
    Int4Block,
    Int8PerChannel,
    QuantConfig,
    gguf_quantize,
    quantize_,
)
from edgestill.quant.gptq import _accumulate_hessians, gptq_quantize_, gptq_weight, rtn_quantize_

ALL = [GGUFQ8_0(), GGUFQ4_0(), GGUFQ4_1(), GGUFQ5_0(), GGUFQ5_1(), GGUFQ4_K(), GGUFQ3_K(), GGUFQ2_K(), GGUFF16(),
       Int8PerChannel(), Int4Block(), Int4Block(symmetric=False)]
# Formats whose scales come from the block's extremes: the column loop's result is already a fixed point. So is
# Q3_K's and Q2_K's: their fake_quant keeps a block that already holds their values (the entry scales' grid).
PINNED = [GGUFQ8_0(), GGUFQ4_0(), GGUFQ4_1(), GGUFQ5_0(), GGUFQ5_1(), GGUFF16(), Int8PerChannel(),
          Int4Block(), GGUFQ3_K(), GGUFQ2_K()]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The column loop runs thousands of tiny ops: one thread is many times faster than two that contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


def correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """(n, k) inputs with a decaying spectrum in a random basis, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=torch.Generator().manual_seed(1)) / k**0.5  # the same for every seed
    return (torch.randn(n, k, generator=g) * torch.linspace(1, 0.01, k)) @ mixing


@pytest.fixture(scope="module")
def problem():
    """A (64, 256) weight, the Hessian of 2048 calibration inputs, and 2048 held-out inputs."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    x = correlated_inputs(2048, 256, seed=2)
    return w, 2 * x.T @ x / x.shape[0], correlated_inputs(2048, 256, seed=3)


def output_error(w, w_hat, x) -> float:
    return ((x @ (w - w_hat).T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ALL + [Int4Block(block_size=64)], ids=repr)
def test_diagonal_hessian_gives_rtn_bit_for_bit(fmt, act_order):
    """Uncorrelated inputs leave no error to pass on: GPTQ's quantizer must then be exactly the format's."""
    torch.manual_seed(0)
    w = torch.randn(16, 512) * 0.05
    w[:, 5] = -4 * w.abs().max()  # a negative block maximum
    hessian = torch.diag(torch.rand(512) + 0.5)
    assert bits_equal(gptq_weight(w, hessian, fmt, act_order=act_order, settle=False), fmt.fake_quant(w))


def test_int4_block_partial_last_block():
    torch.manual_seed(0)
    w, x = torch.randn(8, 100) * 0.05, correlated_inputs(512, 100, seed=4)
    fmt = Int4Block(block_size=32)
    assert bits_equal(gptq_weight(w, torch.eye(100), fmt, settle=False), fmt.fake_quant(w))
    w_hat = gptq_weight(w, 2 * x.T @ x / 512, fmt, block_columns=48)  # batches cut inside no block
    assert bits_equal(fmt.fake_quant(w_hat), w_hat)
    assert output_error(w, w_hat, x) < 0.8 * output_error(w, fmt.fake_quant(w), x)


@pytest.mark.parametrize("fmt", [GGUFQ4_0(), GGUFQ4_1(), GGUFQ4_K(), GGUFQ3_K(), GGUFQ2_K(), Int8PerChannel()],
                         ids=repr)
def test_gptq_beats_rtn_on_correlated_inputs(problem, fmt):
    """||W X - W_hat X|| on held-out inputs: ~0.62x RTN's at Q4_0/Q4_1 (0.054 vs 0.087, 0.049 vs 0.079)."""
    w, hessian, held_out = problem
    rtn = output_error(w, fmt.fake_quant(w), held_out)
    for act_order in (False, True):
        gptq = output_error(w, gptq_weight(w, hessian, fmt, act_order=act_order), held_out)
        assert gptq < 0.75 * rtn, (act_order, gptq, rtn)


@pytest.mark.parametrize("fmt", ALL, ids=repr)
def test_gptq_weights_are_fixed_points(problem, fmt):
    w, hessian, held_out = problem
    raw = gptq_weight(w, hessian, fmt, settle=False)
    w_hat = gptq_weight(w, hessian, fmt)
    assert bits_equal(fmt.fake_quant(w_hat), w_hat)
    if fmt in PINNED:  # the scale-setting weights keep their codes: nothing for settling to do
        assert bits_equal(raw, w_hat)
    else:  # Q4_K refits its scales, asymmetric Int4Block rounds its zero point: settling moves some weights
        assert 0 < (raw != w_hat).float().mean() < 0.25
        assert output_error(w, w_hat, held_out) < 1.05 * output_error(w, raw, held_out)


@pytest.mark.parametrize("fmt", [GGUFQ8_0(), GGUFQ4_0(), GGUFQ4_1(), GGUFQ5_1(), GGUFQ4_K(), GGUFQ3_K(), GGUFQ2_K()],
                         ids=repr)
def test_gguf_bytes_dequantize_to_the_gptq_weights(problem, fmt):
    w, hessian, _ = problem
    w_hat = gptq_weight(w, hessian, fmt)
    data, qtype = gguf_quantize(w_hat, fmt)
    assert bits_equal(torch.from_numpy(quants.dequantize(data, qtype)), w_hat)


def test_one_pass_pipeline_without_decoder_layers():
    """A model with no layer stack: its Linear's Hessian comes from the calibration batches in one pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 32))
    w = model[0].weight.detach().clone()
    batches = [correlated_inputs(128, 256, seed=s) for s in range(4)]
    x = torch.cat(batches)
    report = gptq_quantize_(model, QuantConfig(default=GGUFQ4_0()), batches, show_progress=False)
    expected = gptq_weight(w, 2 * x.T @ x / x.shape[0], GGUFQ4_0())
    assert torch.allclose(model[0].weight, expected, atol=1e-6)  # same Hessian up to summation order
    assert bits_equal(GGUFQ4_0().fake_quant(model[0].weight), model[0].weight)
    assert [(r.name, r.fmt) for r in report] == [("0", GGUFQ4_0())]


# --- the sequential pipeline on a tiny Llama ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 300, (4, 32), generator=g) for _ in range(4)]
    held_out = [torch.randint(0, 300, (4, 32), generator=g) for _ in range(4)]
    return LlamaForCausalLM(config).eval(), calibration, held_out


@torch.no_grad()
def mean_kl(reference, model, batches) -> float:
    total = 0.0
    for ids in batches:
        p = reference(ids).logits.log_softmax(-1)  # (B, T, V)
        q = model(ids).logits.log_softmax(-1)
        total += (p.exp() * (p - q)).sum(-1).mean().item()
    return total / len(batches)


def test_gptq_has_lower_kl_than_rtn_on_a_tiny_llama(tiny_llama):
    """KL to the float model on held-out tokens, lm_head left in float: GPTQ 7.0e-5 vs RTN 9.7e-5 at Q4_0."""
    model, calibration, held_out = tiny_llama
    config = QuantConfig(default=GGUFQ4_0(), skip=["lm_head"])
    gptq, rtn = copy.deepcopy(model), copy.deepcopy(model)
    gptq_quantize_(gptq, config, calibration, show_progress=False)
    rtn_quantize_(rtn, config)
    kl_gptq, kl_rtn = mean_kl(model, gptq, held_out), mean_kl(model, rtn, held_out)
    assert 0 < kl_gptq < 0.85 * kl_rtn, (kl_gptq, kl_rtn)


def test_layers_are_calibrated_in_sequence_on_quantized_inputs(tiny_llama):
    """Layer 1's Hessians come from the model whose layer 0 is already quantized, as in the paper."""
    model, calibration, _ = tiny_llama
    config = QuantConfig(default=GGUFQ4_0(), skip=["lm_head"])
    ours, by_hand = copy.deepcopy(model), copy.deepcopy(model)
    gptq_quantize_(ours, config, calibration, show_progress=False)
    with torch.no_grad():
        for layer in by_hand.model.layers:  # full forwards of the model quantized so far
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            hessians = _accumulate_hessians(linears, lambda: [by_hand(ids, use_cache=False)
                                                              for ids in calibration])
            for name, linear in linears.items():
                linear.weight.copy_(gptq_weight(linear.weight, hessians[name], GGUFQ4_0()))
    for (name, ours_p), by_hand_p in zip(ours.named_parameters(), by_hand.parameters()):
        assert torch.equal(ours_p, by_hand_p), name


def test_report_lists_every_targeted_linear_with_its_format(tiny_llama):
    model, calibration, _ = tiny_llama
    model = copy.deepcopy(model)
    embedding = model.model.embed_tokens.weight.detach().clone()
    # down_proj has rows of 128: Q4_K falls back to Q5_0 (llama.cpp's rule) and GPTQ runs with Q5_0.
    config = QuantConfig(default=GGUFQ4_0(), plan={"re:.*down_proj": GGUFQ4_K(), "re:.*v_proj": GGUFQ8_0()},
                         skip=["model.layers.1.mlp.up_proj"])
    report = gptq_quantize_(model, config, calibration, show_progress=False)
    expected = quantize_(copy.deepcopy(tiny_llama[0]), config, step="convert")  # RTN's report
    assert [r.to_dict() for r in report] == [r.to_dict() for r in expected]

    linears = dict(model.named_modules())
    names = [n for n, m in linears.items() if isinstance(m, nn.Linear) and n != "model.layers.1.mlp.up_proj"]
    assert [r.name for r in report] == names and len(names) == 14
    by_name = {r.name: r for r in report}
    assert by_name["model.layers.0.mlp.down_proj"].fmt == GGUFQ5_0()
    assert by_name["model.layers.0.mlp.down_proj"].fallback
    assert by_name["model.layers.1.self_attn.v_proj"].fmt == GGUFQ8_0()
    assert by_name["lm_head"].tied == ("model.embed_tokens",)
    for r in report:  # plain Linears holding fixed points of their formats
        assert type(linears[r.name]) is nn.Linear
        assert bits_equal(r.fmt.fake_quant(linears[r.name].weight), linears[r.name].weight), r.name
    # the tied lm_head (and so the embedding) is RTN
    assert bits_equal(model.model.embed_tokens.weight, GGUFQ4_0().fake_quant(embedding))


def test_errors(tiny_llama):
    model, calibration, _ = tiny_llama
    with pytest.raises(EdgestillError, match="calibration"):
        gptq_quantize_(copy.deepcopy(model), QuantConfig(), [], show_progress=False)
    prepared = copy.deepcopy(model)
    quantize_(prepared, QuantConfig(default=GGUFQ4_0()), step="prepare")
    with pytest.raises(EdgestillError, match="prepared for QAT"):
        gptq_quantize_(prepared, QuantConfig(default=GGUFQ4_0()), calibration, show_progress=False)
