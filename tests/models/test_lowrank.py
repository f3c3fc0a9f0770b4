import os

import pytest
import torch
from torch import nn

from edgestill.errors import EdgestillError
from edgestill.models.lowrank import (
    FactorizedEmbedding,
    LowRankConfig,
    LowRankLinear,
    choose_ranks,
    factorize_,
    load_factorized,
    max_useful_rank,
    reconstruction_error,
    stored_bytes,
    stored_params,
    svd_factors,
)


def tiny_bert(seed=0, vocab=120):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def test_full_rank_reproduces_the_linear_layer_exactly():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    low = LowRankLinear.from_linear(lin, rank=24)
    x = torch.randn(5, 7, 24)
    assert low.rank == 24 and low.U.shape == (40, 24) and low.V.shape == (24, 24)
    torch.testing.assert_close(low(x), lin(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(low.bias, lin.bias, atol=0, rtol=0)


def test_svd_init_is_u_sqrt_sigma_and_sqrt_sigma_v():
    torch.manual_seed(1)
    w = torch.randn(30, 20, dtype=torch.float64)
    A, B = svd_factors(w, 5)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(A, U[:, :5] * S[:5].sqrt())
    torch.testing.assert_close(B, S[:5].sqrt()[:, None] * Vh[:5])
    # the truncated SVD is the best rank-5 approximation: error equals the dropped singular values
    torch.testing.assert_close((w - A @ B).norm(), S[5:].norm())


def test_truncated_rank_error_matches_dropped_singular_values():
    torch.manual_seed(2)
    lin = nn.Linear(32, 48, bias=False)
    low = LowRankLinear.from_linear(lin, rank=8)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    expected = float(s[8:].norm() / s.norm())
    assert reconstruction_error(lin.weight, low) == pytest.approx(expected, rel=1e-4)
    assert low.bias is None


def test_factorized_embedding_full_rank_is_exact_and_low_rank_is_smaller():
    torch.manual_seed(3)
    emb = nn.Embedding(100, 16, padding_idx=0)
    ids = torch.randint(0, 100, (3, 9))
    full = FactorizedEmbedding.from_embedding(emb, 16)
    torch.testing.assert_close(full(ids), emb(ids), atol=1e-6, rtol=1e-6)
    small = FactorizedEmbedding.from_embedding(emb, 4)
    assert stored_params(small) == 100 * 4 + 4 * 16 < stored_params(emb)


def test_full_rank_model_reproduces_logits():
    model = tiny_bert()
    ids = torch.randint(0, 120, (2, 11))
    ref = model(input_ids=ids).logits
    plan = {n: 10_000 for n, m in model.named_modules() if isinstance(m, nn.Linear) and "classifier" not in n}
    plan["bert.embeddings.word_embeddings"] = 10_000
    factorize_(model, LowRankConfig(ranks=plan))
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, LowRankLinear)
    assert isinstance(model.bert.embeddings.word_embeddings, FactorizedEmbedding)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["global", "energy"])
def test_budget_is_met_and_the_model_really_shrinks(strategy, tmp_path):
    from safetensors.torch import save_file

    model = tiny_bert()
    before_params, before_bytes = stored_params(model), stored_bytes(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "dense.safetensors")
    target = int(before_params * 0.5)
    plan = factorize_(model, LowRankConfig(target_params=target, strategy=strategy))
    after = stored_params(model)
    assert after <= target
    assert after >= 0.8 * target  # the budget is used, not wasted
    assert plan["linear"] and plan["embedding"]
    assert stored_bytes(model) < before_bytes
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "low.safetensors")
    low_size, dense_size = (tmp_path / "low.safetensors").stat().st_size, (tmp_path / "dense.safetensors").stat().st_size
    assert low_size < 0.6 * dense_size
    # stored_bytes is the payload that reaches disk (plus a small JSON header)
    assert abs(low_size - stored_bytes(model)) < 16_384


def test_byte_budget_and_rank_rounding():
    model = tiny_bert()
    budget = int(stored_bytes(model) * 0.6)
    ranks = choose_ranks(model, LowRankConfig(target_bytes=budget, multiple_of=4))
    plan = factorize_(model, LowRankConfig(target_bytes=budget, multiple_of=4))
    assert plan["linear"] == {k: r for k, r in ranks.items() if k in plan["linear"]}
    assert stored_bytes(model) <= budget + 4096  # buffers are outside the parameter budget
    assert stored_params(model) * 4 <= budget
    assert ranks and all(r % 4 == 0 or r == 1 for r in ranks.values())  # min_rank=1 wins over rounding


def test_global_budget_prefers_matrices_with_concentrated_energy():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():  # layer 0 is rank-2 plus noise; layer 1 is full-rank noise
        model[0].weight.copy_(torch.randn(64, 2) @ torch.randn(2, 64) * 3 + 0.01 * torch.randn(64, 64))
    fixed = 64 * 2
    ranks = choose_ranks(model, LowRankConfig(target_params=fixed + 20 * 128))
    assert ranks["0"] <= 4 < ranks["1"]
    assert sum(r * 128 for r in ranks.values()) <= 20 * 128


def test_budget_too_small_is_a_clear_error():
    model = tiny_bert()
    with pytest.raises(EdgestillError, match="budget of 100 params is below what the model needs"):
        choose_ranks(model, LowRankConfig(target_params=100))
    with pytest.raises(EdgestillError, match="give LowRankConfig.ranks"):
        choose_ranks(model, LowRankConfig())
    with pytest.raises(EdgestillError, match="no layer matched"):
        choose_ranks(model, LowRankConfig(targets=("nothing",), embeddings=(), target_params=10**6))


def test_generous_budget_keeps_matrices_dense():
    model = tiny_bert()
    plan = factorize_(model, LowRankConfig(target_params=stored_params(model)))
    assert plan == {"linear": {}, "embedding": {}}
    assert max_useful_rank(64, 32) == 21  # 21*(96) = 2016 < 2048, 22*96 = 2112 > 2048


def test_save_and_load_factorized_round_trip(tmp_path):
    from transformers import BertForSequenceClassification

    model = tiny_bert()
    factorize_(model, LowRankConfig(target_params=int(stored_params(model) * 0.5)))
    ids = torch.randint(0, 120, (2, 9))
    ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    again = load_factorized(tmp_path / "m", BertForSequenceClassification)
    assert stored_params(again) == stored_params(model)
    torch.testing.assert_close(again(input_ids=ids).logits, ref, atol=0, rtol=0)
