"""Feature and relation transfer: hidden-state MSE with a layer map, MiniLMv2 Q/K/V relations between
tiny Llamas of different widths and head counts, hooks on Llama and BERT modules, RKD."""

from __future__ import annotations

import pytest
import torch

from conftest import load_tiny_teacher  # tests/ is on sys.path
from edgestill.distill.features import (CaptureQKV, HiddenStateMSE, attention_relations, minilm_relation_loss,
                                        relation_kl, rkd_angle_loss, rkd_distance_loss, sliced_layer_map,
                                        uniform_layer_map)
from edgestill.errors import EdgestillError

R = 4  # relation heads: divides 64 and 32 (teacher Q and K/V) and 48 and 16 (student)


def _narrow_student(vocab_size: int, seed: int = 1, initializer_range: float = 0.02):
    """A 2-layer Llama of width 48 with 3 query heads and 1 key/value head (the teacher: 64, 4 and 2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64,
                      initializer_range=initializer_range)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    teacher = load_tiny_teacher(tiny_model_dir)
    student = _narrow_student(teacher.config.vocab_size)
    ids = torch.randint(3, teacher.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return teacher, student, ids


def _qkv(model, ids, grad: bool):
    with CaptureQKV(model) as cap, torch.set_grad_enabled(grad):
        out = model(input_ids=ids, output_hidden_states=True)
    return cap.outputs, out.hidden_states


def test_capture_llama_qkv_shapes_and_hooks_removed(models):
    teacher, student, ids = models
    t_qkv, _ = _qkv(teacher, ids, grad=False)
    s_qkv, _ = _qkv(student, ids, grad=True)
    assert {k: tuple(v.shape) for k, v in t_qkv.items()} == {"query": (2, 12, 64), "key": (2, 12, 32), "value": (2, 12, 32)}
    assert {k: tuple(v.shape) for k, v in s_qkv.items()} == {"query": (2, 12, 48), "key": (2, 12, 16), "value": (2, 12, 16)}
    assert s_qkv["query"].requires_grad
    # it captured the last layer's projection
    cap = CaptureQKV(teacher)
    assert cap.modules["query"] is teacher.model.layers[-1].self_attn.q_proj
    assert CaptureQKV(teacher, layer=0).modules["key"] is teacher.model.layers[0].self_attn.k_proj
    # and the hooks are gone after the with-block
    assert not teacher.model.layers[-1].self_attn.q_proj._forward_hooks


def test_capture_bert_style_modules():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32))
    with CaptureQKV(bert) as cap:
        bert(input_ids=torch.randint(0, 50, (2, 7)))
    assert set(cap.outputs) == {"query", "key", "value"}
    assert cap.outputs["value"].shape == (2, 7, 32)
    assert cap.modules["query"] is bert.encoder.layer[-1].attention.self.query


def test_capture_rejects_models_without_attention_projections():
    with pytest.raises(EdgestillError, match="q_proj"):
        CaptureQKV(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_relation_loss_across_widths_and_head_counts_trains(models):
    """Teacher 64 wide / 4 heads / 2 KV heads, student 48 / 3 / 1: the relation loss is defined, and a few
    steps on the student's attention projections lower it."""
    teacher, student, ids = models
    # a private copy to train, with larger weights than the teacher so the relations clearly differ
    student = _narrow_student(teacher.config.vocab_size, initializer_range=0.2)
    t_qkv, _ = _qkv(teacher, ids, grad=False)
    attn = student.model.layers[-1].self_attn
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(15):
        s_qkv, _ = _qkv(student, ids, grad=True)
        loss = minilm_relation_loss(s_qkv, t_qkv, num_relation_heads=R, causal=True)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.01
    assert losses[-1] < 0.7 * losses[0], losses


def test_relation_kl_zero_for_identical_inputs_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 32, generator=g)
    assert relation_kl(x, x, num_relation_heads=4, causal=True).abs().item() < 1e-6
    assert relation_kl(x, torch.randn(2, 6, 32, generator=g), num_relation_heads=4).item() > 0.01
    # A wider teacher whose relation heads carry the same vectors twice has the same relations, up to the
    # sqrt(d_r) scale: x.x doubles and sqrt(d_r) grows by sqrt(2), so dividing the vectors by 2^(1/4) gives zero.
    wide = torch.cat([x.view(2, 6, 4, 8)] * 2, dim=-1).view(2, 6, 64) / 2**0.25
    assert relation_kl(x, wide, num_relation_heads=4).abs().item() < 1e-5


def test_causal_relations_hide_the_future():
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0))
    rel = attention_relations(x, 2, causal=True).exp()  # (1, 2, 5, 5)
    assert torch.equal(torch.triu(rel, diagonal=1), torch.zeros_like(rel))
    torch.testing.assert_close(rel.sum(-1), torch.ones(1, 2, 5))
    assert torch.allclose(rel[..., 0, 0], torch.ones(1, 2))
    # the loss on a prefix does not see later positions
    y = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    y2 = y.clone()
    y2[:, -1] += 5.0
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    torch.testing.assert_close(relation_kl(y, x, 2, causal=True, mask=mask), relation_kl(y2, x, 2, causal=True, mask=mask))
    assert not torch.allclose(relation_kl(y, x, 2), relation_kl(y2, x, 2))  # without the mask it would


def test_padding_mask_hides_padded_keys():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])  # right and left padding
    rel = attention_relations(x, 2, mask=mask).exp()
    assert rel[0, :, :, 3:].abs().max() == 0 and rel[1, :, :, 0].abs()[..., 1:].max() == 0
    assert torch.isfinite(rel).all()
    torch.testing.assert_close(rel.sum(-1), torch.ones(2, 2, 5))


def test_relation_heads_must_divide_widths():
    with pytest.raises(EdgestillError, match="relation heads"):
        relation_kl(torch.randn(1, 3, 48), torch.randn(1, 3, 64), num_relation_heads=5)


def test_hidden_mse_across_widths_trains(models):
    teacher, _, ids = models
    student = _narrow_student(teacher.config.vocab_size)
    layer_map = uniform_layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    assert layer_map == {1: 2, 2: 4}
    mse = HiddenStateMSE(48, 64, layer_map)
    _, t_hidden = _qkv(teacher, ids, grad=False)
    opt = torch.optim.Adam(list(student.parameters()) + list(mse.parameters()), lr=3e-3)
    losses = []
    for _ in range(10):
        _, s_hidden = _qkv(student, ids, grad=True)
        loss = mse(s_hidden, t_hidden)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert mse.proj["1"].weight.grad.abs().sum() > 0  # the projection learns too
    assert losses[-1] < 0.8 * losses[0], losses


def test_hidden_mse_identity_init_and_mask(models):
    teacher, _, ids = models
    _, hidden = _qkv(teacher, ids, grad=False)
    mse = HiddenStateMSE(64, 64, {2: 2, 4: 4})
    assert mse(hidden, hidden).item() < 1e-10  # equal widths start as plain MSE
    shifted = list(hidden)
    shifted[2] = hidden[2].clone()
    shifted[2][:, -1] += 1.0
    mask = torch.ones(2, 12)
    mask[:, -1] = 0
    assert mse(shifted, hidden, mask).item() < 1e-10
    assert mse(shifted, hidden).item() > 0.01
    with pytest.raises(EdgestillError, match="layer map"):
        HiddenStateMSE(64, 64, {9: 2})(hidden, hidden)


def test_sliced_layer_map_pairs_each_kept_block_with_itself():
    # student block i is teacher block kept[i-1]: hidden state i (output of block i) <- teacher hidden kept[i-1] + 1
    assert sliced_layer_map([0, 1, 6, 29], 30) == {1: 1, 2: 2, 3: 7, 4: 30}
    assert sliced_layer_map([5, 0, 3], 8) == {1: 1, 2: 4, 3: 8}  # sorted; the last layers are always paired


def test_hidden_mse_normalized_is_scale_free(models):
    teacher, _, ids = models
    _, hidden = _qkv(teacher, ids, grad=False)
    g = torch.Generator().manual_seed(0)
    noisy = [h + 0.3 * h.std() * torch.randn(h.shape, generator=g) for h in hidden]
    norm, raw = HiddenStateMSE(64, 64, {2: 2, 4: 4}), HiddenStateMSE(64, 64, {2: 2, 4: 4}, normalize=False)
    scaled = lambda hs, k: [k * h for h in hs]  # noqa: E731
    # a residual stream 100x larger (deep pre-norm layers) leaves the normalised loss unchanged, the raw one x 1e4
    torch.testing.assert_close(norm(scaled(noisy, 100.0), scaled(hidden, 100.0)), norm(noisy, hidden))
    torch.testing.assert_close(raw(scaled(noisy, 100.0), scaled(hidden, 100.0)), 1e4 * raw(noisy, hidden))
    zeros = [torch.zeros_like(h) for h in hidden]
    assert norm(zeros, hidden).item() == pytest.approx(1.0)  # 1.0 = no better than predicting zeros


def test_rkd_invariant_to_rotation_scale_and_width():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    t = torch.cat([s, torch.zeros(6, 4)], dim=1) @ q * 3.0 + 1.0  # rotated, scaled, shifted, wider
    assert rkd_distance_loss(s, t).item() < 1e-6
    assert rkd_angle_loss(s, t).item() < 1e-6
    other = torch.randn(6, 12, generator=g)
    assert rkd_distance_loss(s, other).item() > 1e-3
    assert rkd_angle_loss(s, other).item() > 1e-3
    s = s.clone().requires_grad_()
    (rkd_distance_loss(s, other) + rkd_angle_loss(s, other)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
