"""Slicing a student out of the tiny Llama teacher: layer choice, width, exactness, sizes."""

from __future__ import annotations

import copy

import pytest

from conftest import load_tiny_teacher
import torch
from torch import nn

from edgestill.errors import EdgestillError
from edgestill.models.slice import block_influence, choose_layers, count_params, decoder_layers, slice_decoder


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return load_tiny_teacher(tiny_model_dir)


@pytest.fixture(scope="module")
def input_ids(teacher):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, teacher.config.vocab_size, (2, 16), generator=g)


# --- choose_layers --------------------------------------------------------------------------------------

def test_choose_layers_uniform_examples():
    assert choose_layers(12, 4) == [0, 4, 7, 11]
    assert choose_layers(4, 2) == [0, 3]
    assert choose_layers(4, 3) == [0, 2, 3]
    assert choose_layers(30, 10)[0] == 0 and choose_layers(30, 10)[-1] == 29


@pytest.mark.parametrize("n", [2, 3, 4, 7, 12, 30])
def test_choose_layers_uniform_properties(n):
    for m in range(2, n):
        got = choose_layers(n, m)
        assert len(got) == m, (n, m, got)
        assert got == sorted(set(got))
        assert got[0] == 0 and got[-1] == n - 1
        assert all(0 <= i < n for i in got)


def test_choose_layers_edge_counts():
    assert choose_layers(6, 6) == list(range(6))
    assert choose_layers(6, 9) == list(range(6))
    assert choose_layers(6, 1) == [5]
    assert choose_layers(6, 1, scores=[9, 0, 0, 0, 0, 0]) == [5]


def test_choose_layers_by_score_keeps_top_and_ends():
    scores = [0.0, 0.1, 0.9, 0.2, 0.8, 0.05, 0.3, 0.0]
    assert choose_layers(8, 4, scores) == [0, 2, 4, 7]  # ends (low scores) + the two most influential
    assert choose_layers(8, 5, scores) == [0, 2, 4, 6, 7]
    assert choose_layers(8, 2, scores) == [0, 7]


@pytest.mark.parametrize("m", [2, 3, 4, 5, 6])
def test_choose_layers_by_score_properties(m):
    g = torch.Generator().manual_seed(m)
    scores = torch.rand(10, generator=g).tolist()
    got = choose_layers(10, m, scores)
    assert len(got) == m and got == sorted(set(got))
    assert 0 in got and 9 in got
    middle = [i for i in got if i not in (0, 9)]
    dropped = [i for i in range(1, 9) if i not in got]
    if middle and dropped:
        assert min(scores[i] for i in middle) >= max(scores[i] for i in dropped)


# --- block_influence / count_params -----------------------------------------------------------------------

def test_block_influence_one_nonnegative_score_per_layer(teacher, input_ids):
    scores = block_influence(teacher, [input_ids, input_ids[:1, :8]])
    assert len(scores) == teacher.config.num_hidden_layers
    assert all(isinstance(s, float) for s in scores)
    assert all(s >= -1e-6 for s in scores)
    assert all(s <= 2.0 for s in scores)  # 1 - cos lies in [0, 2]
    assert any(s > 1e-4 for s in scores)  # random layers do change the residual stream
    assert scores == pytest.approx(block_influence(teacher, [input_ids, input_ids[:1, :8]]))  # deterministic


def test_count_params_counts_tied_weights_once(teacher, tmp_path):
    from transformers import LlamaForCausalLM

    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight  # the fixture model is tied
    by_name = {k: v.numel() for k, v in teacher.state_dict().items()}
    expected = sum(n for k, n in by_name.items() if k != "lm_head.weight")
    assert count_params(teacher) == expected

    cfg = copy.deepcopy(teacher.config)
    cfg.tie_word_embeddings = False
    untied = LlamaForCausalLM(cfg)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert count_params(untied) == expected + untied.lm_head.weight.numel()


def test_count_params_module_with_shared_parameter():
    a = nn.Linear(3, 4, bias=False)
    m = nn.Sequential(a, nn.ReLU(), nn.Linear(4, 3, bias=False))
    m[2].weight = nn.Parameter(torch.zeros(3, 4))
    m.shared = a  # the same module (and parameter) twice
    assert count_params(m) == 12 + 12


# --- slice_decoder ---------------------------------------------------------------------------------------

def _manual_forward_skipping(teacher, layers, input_ids):
    """The teacher run with only `layers` (same weights), built without slice_decoder."""
    ref = copy.deepcopy(teacher)
    kept = nn.ModuleList(copy.deepcopy(decoder_layers(teacher)[i]) for i in layers)
    for new_idx, block in enumerate(kept):
        block.self_attn.layer_idx = new_idx
    ref.model.layers = kept
    ref.config.num_hidden_layers = len(layers)
    with torch.no_grad():
        return ref(input_ids=input_ids, use_cache=False).logits


@pytest.mark.parametrize("layers", [[0, 3], [0, 1, 3], [2], [3, 0]])
def test_sliced_logits_equal_teacher_skipping_dropped_layers(teacher, input_ids, layers):
    student = slice_decoder(teacher, layers)  # [3, 0]: blocks run in the order given
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == len(layers)
    assert not student.training
    with torch.no_grad():
        got = student(input_ids=input_ids, use_cache=False).logits
    want = _manual_forward_skipping(teacher, layers, input_ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        full = teacher(input_ids=input_ids, use_cache=False).logits
    assert not torch.allclose(got, full, atol=1e-3)  # dropping layers changed something


def test_sliced_student_generates_with_kv_cache(teacher, input_ids):
    """layer_idx is renumbered, so a KV-cached decode matches a full forward."""
    student = slice_decoder(teacher, [1, 3])
    assert [b.self_attn.layer_idx for b in decoder_layers(student)] == [0, 1]
    with torch.no_grad():
        out = student.generate(input_ids[:1, :6], max_new_tokens=4, do_sample=False, use_cache=True,
                               pad_token_id=2)
        no_cache = student.generate(input_ids[:1, :6], max_new_tokens=4, do_sample=False, use_cache=False,
                                    pad_token_id=2)
    assert torch.equal(out, no_cache)


def test_slice_keeps_layer_weights_identical(teacher):
    layers = [0, 2, 3]
    student = slice_decoder(teacher, layers)
    t_layers, s_layers = decoder_layers(teacher), decoder_layers(student)
    assert len(s_layers) == 3
    for new_idx, old_idx in enumerate(layers):
        t_sd, s_sd = t_layers[old_idx].state_dict(), s_layers[new_idx].state_dict()
        assert t_sd.keys() == s_sd.keys()
        for k in t_sd:
            assert torch.equal(t_sd[k], s_sd[k]), (old_idx, k)
        # a copy, not the same tensor: training the student must not touch the teacher
        assert s_layers[new_idx].mlp.up_proj.weight.data_ptr() != t_layers[old_idx].mlp.up_proj.weight.data_ptr()
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    assert len(decoder_layers(teacher)) == 4  # the teacher is untouched


def test_slice_is_smaller_in_params_and_bytes(teacher, tiny_model_dir, tmp_path):
    student = slice_decoder(teacher, [0, 3])
    assert count_params(student) < count_params(teacher)
    per_layer = count_params(decoder_layers(teacher)[0])
    assert count_params(teacher) - count_params(student) == 2 * per_layer
    student.save_pretrained(tmp_path / "s")
    s_bytes = (tmp_path / "s" / "model.safetensors").stat().st_size
    t_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    assert s_bytes < t_bytes
    assert t_bytes - s_bytes >= 2 * per_layer * 4 * 0.99  # two fp32 layers' worth of bytes gone


def test_all_layers_narrower_ffn_is_smaller(teacher, input_ids, tmp_path, tiny_model_dir):
    student = slice_decoder(teacher, [0, 1, 2, 3], intermediate_size=48)
    assert student.config.intermediate_size == 48
    assert student.config.num_hidden_layers == 4
    for block in decoder_layers(student):
        assert block.mlp.gate_proj.weight.shape == (48, 64)
        assert block.mlp.up_proj.weight.shape == (48, 64)
        assert block.mlp.down_proj.weight.shape == (64, 48)
    assert count_params(student) < count_params(teacher)
    student.save_pretrained(tmp_path / "s")
    assert (tmp_path / "s" / "model.safetensors").stat().st_size < (tiny_model_dir / "model.safetensors").stat().st_size
    # the saved narrow student reloads with its own config
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=input_ids).logits, student(input_ids=input_ids).logits)


def test_narrowed_ffn_equals_teacher_ffn_with_dropped_units_zeroed(teacher):
    student = slice_decoder(teacher, [0, 1, 2, 3], intermediate_size=32)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    for t_block, s_block in zip(decoder_layers(teacher), decoder_layers(student)):
        t_mlp = copy.deepcopy(t_block.mlp)
        # which teacher units survived: match rows of up_proj
        kept = [int((t_mlp.up_proj.weight == row).all(dim=1).nonzero()[0]) for row in s_block.mlp.up_proj.weight]
        assert len(set(kept)) == 32 and kept == sorted(kept)
        dropped = [j for j in range(128) if j not in kept]
        score = (t_mlp.gate_proj.weight.norm(dim=1) * t_mlp.up_proj.weight.norm(dim=1)
                 * t_mlp.down_proj.weight.norm(dim=0))
        assert score[kept].min() >= score[dropped].max()  # the largest units were kept
        with torch.no_grad():
            t_mlp.down_proj.weight[:, dropped] = 0
            torch.testing.assert_close(s_block.mlp(x), t_mlp(x), atol=1e-5, rtol=1e-5)


def test_slice_all_layers_full_width_raises(teacher):
    with pytest.raises(EdgestillError, match="nothing to shrink"):
        slice_decoder(teacher, [0, 1, 2, 3])
    with pytest.raises(EdgestillError, match="nothing to shrink"):
        slice_decoder(teacher, [0, 1, 2, 3], intermediate_size=128)  # == the teacher's width


@pytest.mark.parametrize("layers", [[], [0, 0], [0, 4], [-1, 2]])
def test_slice_bad_layer_indices_raise(teacher, layers):
    with pytest.raises(EdgestillError, match="distinct indices"):
        slice_decoder(teacher, layers)


@pytest.mark.parametrize("size", [0, 129])
def test_slice_bad_intermediate_size_raises(teacher, size):
    with pytest.raises(EdgestillError, match="intermediate_size"):
        slice_decoder(teacher, [0, 3], intermediate_size=size)


def test_decoder_layers_rejects_non_llama():
    with pytest.raises(EdgestillError, match="Llama-style"):
        decoder_layers(nn.Linear(2, 2))
