"""Width pruning (Minitron) of the tiny Llama teacher (hidden 64, 4 heads over 2 KV heads of 16, FFN 128):
importance finds planted units, cuts have the requested shapes and compute what the teacher computes with the
dropped units silenced, nothing pruned is the teacher exactly, bad widths fail with the key to fix, and a
width-pruned student saves, reloads and runs in llama.cpp as in transformers."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from conftest import load_tiny_teacher, make_text, one_line_error

from edgestill.config import StudentConfig
from edgestill.errors import EdgestillError
from edgestill.models.slice import build_student, count_params, decoder_layers, slice_decoder, slice_student
from edgestill.models.width import (
    WidthKeep,
    activation_scores,
    check_widths,
    choose_heads,
    cut_width,
    prune_width,
    resolve_importance,
    weight_scores,
    width_keep,
)

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return load_tiny_teacher(tiny_model_dir)


@pytest.fixture(scope="module")
def calibration(teacher):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, teacher.config.vocab_size, (2, 16), generator=g) for _ in range(2)]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# --- importance ----------------------------------------------------------------------------------------------

def test_scores_have_one_entry_per_unit(teacher, calibration):
    for scores in (activation_scores(teacher, calibration), weight_scores(teacher)):
        assert scores.hidden.shape == (64,) and (scores.hidden > 0).all()
        assert [s.shape for s in scores.heads] == [(4,)] * 4 and [s.shape for s in scores.ffn] == [(128,)] * 4
    again = activation_scores(teacher, calibration)
    assert torch.equal(again.hidden, activation_scores(teacher, calibration).hidden)  # deterministic, hooks removed
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())


def test_activation_aggregate_is_mean_over_sequences_of_l2_over_positions(teacher, calibration):
    """The FFN score of unit j equals mean_b sqrt(sum_t a[b, t, j]^2) of down_proj's input, computed by hand."""
    mlp = decoder_layers(teacher)[2].mlp
    seen = []
    hook = mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()) and None)
    try:
        logits(teacher, torch.cat(calibration))
    finally:
        hook.remove()
    want = seen[0].double().norm(dim=1).mean(dim=0)  # (B, T, F) -> L2 over T -> mean over B
    torch.testing.assert_close(activation_scores(teacher, calibration).ffn[2], want)


@pytest.mark.parametrize("importance", ["activation", "weight"])
def test_planted_ffn_unit_ranks_first_and_survives(teacher, calibration, importance):
    planted = copy.deepcopy(teacher)
    with torch.no_grad():
        decoder_layers(planted)[1].mlp.up_proj.weight[77] *= 30
    scores = activation_scores(planted, calibration) if importance == "activation" else weight_scores(planted)
    assert int(scores.ffn[1].argmax()) == 77
    student = prune_width(planted, calibration, intermediate_size=8, importance=importance)
    up = decoder_layers(planted)[1].mlp.up_proj.weight[77]
    assert (decoder_layers(student)[1].mlp.up_proj.weight == up).all(dim=1).any()


@pytest.mark.parametrize("importance", ["activation", "weight"])
def test_planted_kv_group_ranks_first_and_survives(teacher, calibration, importance):
    """KV head 1 (serving query heads 2 and 3) made loud in layer 0: a 1-KV-head student keeps that group."""
    planted = copy.deepcopy(teacher)
    with torch.no_grad():
        decoder_layers(planted)[0].self_attn.v_proj.weight[16:32] *= 30
    scores = activation_scores(planted, calibration) if importance == "activation" else weight_scores(planted)
    assert set(scores.heads[0].topk(2).indices.tolist()) == {2, 3}
    keep = width_keep(scores, planted.config, num_key_value_heads=1)  # heads unset: 2 per KV head, as the teacher
    assert keep.kv_heads[0].tolist() == [1] and keep.heads[0].tolist() == [2, 3]


@pytest.mark.parametrize("importance", ["activation", "weight"])
def test_planted_hidden_channel_ranks_first_and_survives(teacher, calibration, importance):
    planted = copy.deepcopy(teacher)
    with torch.no_grad():
        for name, p in planted.named_parameters():
            if name.endswith("norm.weight"):
                p[37] = 30.0
    scores = activation_scores(planted, calibration) if importance == "activation" else weight_scores(planted)
    assert int(scores.hidden.argmax()) == 37
    student = prune_width(planted, calibration, hidden_size=8, importance=importance)
    embedding = planted.model.embed_tokens.weight[:, 37]
    assert (student.model.embed_tokens.weight == embedding[:, None]).all(dim=0).any()


def test_choose_heads_keeps_best_groups_then_best_heads_inside():
    scores = torch.tensor([1.0, 9, 1, 5, 6, 4, 0, 0, 7])  # 9 heads over 3 KV heads (SmolLM2's shape); group sums 11, 15, 7
    cases = {(9, 3): (list(range(9)), [0, 1, 2]),  # everything, in order
             (6, 2): ([0, 1, 2, 3, 4, 5], [0, 1]),  # whole groups: the weakest (KV head 2) goes
             (3, 3): ([1, 4, 8], [0, 1, 2]),  # heads inside groups: the best of each group stays
             (2, 2): ([1, 4], [0, 1]),
             (2, 1): ([3, 4], [1])}
    for (heads, kv), (want_q, want_kv) in cases.items():
        q, groups = choose_heads(scores, 3, heads, kv)
        assert (q.tolist(), groups.tolist()) == (want_q, want_kv), (heads, kv)


def test_auto_importance_is_activation_only_for_hidden_or_head_cuts():
    assert resolve_importance("auto") == "activation"  # any cut, FFN-only too (levers benchmark)
    assert resolve_importance("weight") == "weight"
    with pytest.raises(EdgestillError, match="width_importance"):
        resolve_importance("random")


# --- the cut -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("importance", ["activation", "weight"])
def test_pruning_nothing_is_the_teacher_exactly(teacher, calibration, importance):
    student = prune_width(teacher, calibration, 64, 4, 2, 128, importance=importance)
    assert student is not teacher and type(student) is type(teacher)
    assert student.state_dict().keys() == teacher.state_dict().keys()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())
    assert torch.equal(logits(student, calibration[0]), logits(teacher, calibration[0]))
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied


@pytest.mark.parametrize("widths", [
    dict(hidden_size=48, num_attention_heads=2, num_key_value_heads=1, intermediate_size=96),
    dict(hidden_size=40),  # 4 heads of 16 no longer span the hidden size: head_dim must be explicit
    dict(num_attention_heads=2),  # KV heads kept (2): one query head per group
    dict(num_key_value_heads=1),  # heads per group kept (2): one whole group goes
    dict(hidden_size=32, intermediate_size=16),
])
def test_pruned_tensors_and_config_have_the_requested_widths(teacher, calibration, widths):
    student = prune_width(teacher, calibration, **widths)
    c = student.config
    hidden = widths.get("hidden_size", 64)
    kv = widths.get("num_key_value_heads", 2)
    heads = widths.get("num_attention_heads", kv * 2)
    ffn = widths.get("intermediate_size", 128)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (
        hidden, heads, kv, 16, ffn)
    v = teacher.config.vocab_size
    assert student.model.embed_tokens.weight.shape == (v, hidden) and student.model.norm.weight.shape == (hidden,)
    for block in decoder_layers(student):
        a, m = block.self_attn, block.mlp
        assert a.q_proj.weight.shape == (heads * 16, hidden) and a.o_proj.weight.shape == (hidden, heads * 16)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (kv * 16, hidden)
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (ffn, hidden)
        assert m.down_proj.weight.shape == (hidden, ffn)
        assert block.input_layernorm.weight.shape == block.post_attention_layernorm.weight.shape == (hidden,)
    assert count_params(student) < count_params(teacher)
    assert torch.isfinite(logits(student, calibration[0])).all()


@pytest.mark.parametrize("heads, kv", [(2, 1), (2, 2), (2, None), (None, 1), (3, None)])
def test_head_cut_is_the_teacher_with_dropped_heads_silenced(teacher, calibration, heads, kv):
    """Dropping heads (or whole KV groups) computes exactly what the teacher computes with the dropped heads'
    o_proj columns zeroed: the right query heads stay paired with the right KV heads."""
    if heads == 3:
        with pytest.raises(EdgestillError, match="multiple"):  # 3 heads cannot share 2 KV heads evenly
            prune_width(teacher, calibration, num_attention_heads=heads, num_key_value_heads=kv)
        return
    scores = activation_scores(teacher, calibration)
    keep = width_keep(scores, teacher.config, num_attention_heads=heads, num_key_value_heads=kv)
    student = cut_width(teacher, keep)
    silenced = copy.deepcopy(teacher)
    with torch.no_grad():
        for block, kept in zip(decoder_layers(silenced), keep.heads):
            dropped = [h for h in range(4) if h not in kept.tolist()]
            for h in dropped:
                block.self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
    torch.testing.assert_close(logits(student, calibration[0]), logits(silenced, calibration[0]), atol=1e-6, rtol=1e-5)


def test_hidden_cut_is_the_teacher_with_dropped_channels_empty(teacher, calibration):
    """A teacher whose dropped channels are never written (embedding columns, o_proj and down_proj rows zero) keeps
    them zero in the residual stream; cut out, it computes the same logits once each RMSNorm weight makes up for
    the mean over fewer channels (x sqrt(C / C'); eps 0 so the norm is exactly proportional)."""
    keep_hidden = torch.tensor(sorted(set(range(0, 64, 3)) | {1, 2, 50}))
    dropped = [c for c in range(64) if c not in keep_hidden.tolist()]
    ref = copy.deepcopy(teacher)
    ref.config.rms_norm_eps = 0.0
    with torch.no_grad():
        ref.model.embed_tokens.weight[:, dropped] = 0
        for block in decoder_layers(ref):
            block.self_attn.o_proj.weight[dropped] = 0
            block.mlp.down_proj.weight[dropped] = 0
    for module in ref.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.0
    full = [torch.arange(n) for n in (4, 2, 128)]
    keep = WidthKeep(hidden=keep_hidden, heads=[full[0]] * 4, kv_heads=[full[1]] * 4, ffn=[full[2]] * 4)
    student = cut_width(ref, keep)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("norm.weight"):
                p.mul_(math.sqrt(64 / len(keep_hidden)))
    torch.testing.assert_close(logits(student, calibration[0]), logits(ref, calibration[0]), atol=1e-6, rtol=1e-5)


def test_ffn_only_weight_cut_is_slice_decoders(teacher, calibration):
    """The old FFN narrowing and the width pruner pick the same units by weight norms (old runs reproduce)."""
    old = slice_decoder(teacher, [0, 1, 2, 3], intermediate_size=48)
    new = prune_width(teacher, None, intermediate_size=48, importance="weight")
    assert old.state_dict().keys() == new.state_dict().keys()
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())


@pytest.mark.parametrize("widths, needle", [
    (dict(hidden_size=65), "student.hidden_size=65 must be between 1 and the teacher's 64"),
    (dict(hidden_size=0), "student.hidden_size=0"),
    (dict(num_attention_heads=5), "student.num_attention_heads=5 must be between 1 and the teacher's 4"),
    (dict(num_key_value_heads=3), "student.num_key_value_heads=3 must be between 1 and the teacher's 2"),
    (dict(num_attention_heads=3), "not a multiple of student.num_key_value_heads=2"),
    (dict(num_attention_heads=4, num_key_value_heads=1), "4 query heads per KV head, more than the teacher's 2"),
    (dict(intermediate_size=129), "student.intermediate_size=129 must be between 1 and the teacher's 128"),
    # transformers refuses hidden % heads != 0 even with head_dim set: refused before any training, not at save
    (dict(hidden_size=34), "student.hidden_size=34 is not a multiple of the student's 4 attention heads"),
    (dict(hidden_size=36, num_attention_heads=2, num_key_value_heads=1), None),
])
def test_bad_widths_name_the_key_to_fix(teacher, widths, needle):
    if needle is None:  # a good size: check_widths lets it through
        assert check_widths(teacher.config, **widths)[0] == widths["hidden_size"]
        return
    assert needle in one_line_error(prune_width, teacher, None, **widths)


def test_activation_importance_needs_calibration(teacher):
    assert "width_importance=weight" in one_line_error(prune_width, teacher, [], hidden_size=32)


# --- through the student builder, saved and reloaded -----------------------------------------------------------

def test_build_student_width_prunes_a_full_depth_student(teacher, calibration):
    cfg = StudentConfig(num_layers=4, hidden_size=48, num_key_value_heads=1)
    student, layers = build_student(cfg, teacher, None, calibration)
    assert layers == [0, 1, 2, 3]
    assert (student.config.hidden_size, student.config.num_attention_heads, student.config.num_key_value_heads) == (48, 2, 1)
    same = slice_student(cfg, teacher, layers, calibration)  # what the untrained baseline is cut as
    assert torch.equal(logits(same, calibration[0]), logits(student, calibration[0]))
    msg = one_line_error(build_student, StudentConfig(num_layers=4), teacher, None, calibration)
    assert "student.hidden_size" in msg  # the full-size error names the width keys
    with pytest.raises(EdgestillError, match="not smaller"):
        slice_student(StudentConfig(num_layers=4, hidden_size=64), teacher, [0, 1, 2, 3], calibration)


def test_depth_and_width_together(teacher, calibration):
    student = slice_student(StudentConfig(num_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
                            teacher, [0, 3], calibration)
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 32
    assert [b.self_attn.layer_idx for b in decoder_layers(student)] == [0, 1]
    with torch.no_grad():
        cached = student.generate(calibration[0][:1, :6], max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=2)
        fresh = student.generate(calibration[0][:1, :6], max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=2)
    assert torch.equal(cached, fresh)


def test_pruned_student_saves_smaller_and_reloads_through_the_loader(teacher, calibration, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from edgestill.models.load import load_causal_lm, save_causal_lm

    student = prune_width(teacher, calibration, 40, 2, 1, 96)
    save_causal_lm(student, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "s")
    assert (tmp_path / "s" / "model.safetensors").stat().st_size < (tiny_model_dir / "model.safetensors").stat().st_size
    again = load_causal_lm(str(tmp_path / "s"))
    assert again.model.config.head_dim == 16 and again.model.config.hidden_size == 40
    assert torch.equal(logits(again.model, calibration[0]), logits(student, calibration[0]))


# --- GGUF: the keys llama.cpp reads, and llama.cpp's logits --------------------------------------------------------

@pytest.fixture(scope="module")
def pruned(teacher, calibration, tiny_model_dir):
    """hidden 48 with 2 heads of 16 over 1 KV head: head_dim (16) != hidden / heads (24)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(make_text(99, 40))["input_ids"][:128]
    return prune_width(teacher, calibration, 48, 2, 1, 96), tokenizer, ids


def test_gguf_of_a_pruned_student_has_its_widths_and_loads_back(pruned, tmp_path, monkeypatch):
    from gguf import GGUFReader

    from edgestill.export.gguf import export_gguf
    from edgestill.models.load import load_causal_lm

    model, tokenizer, ids = pruned
    path = tmp_path / "pruned.gguf"
    export_gguf(model, tokenizer, path, tensor_type="f32")
    fields = {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()}
    assert fields["llama.embedding_length"] == 48 and fields["llama.feed_forward_length"] == 96
    assert fields["llama.attention.head_count"] == 2 and fields["llama.attention.head_count_kv"] == 1
    assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == 16
    assert fields["llama.rope.dimension_count"] == 16
    monkeypatch.setenv("EDGESTILL_CACHE", str(tmp_path / "cache"))
    back = load_causal_lm(str(path))  # dequantized by transformers, as a GGUF teacher is
    assert back.model.config.head_dim == 16
    torch.testing.assert_close(logits(back.model, torch.tensor([ids])), logits(model, torch.tensor([ids])))


@needs_llama_cpp
@pytest.mark.parametrize("tensor_type, kv_type, max_rel_diff", [  # the tolerances of tests/export/test_gguf_export.py
    ("f32", "f32", 1e-5),
    ("f32", "f16", 1e-3),
    ("f16", "f16", 2e-3),
])
def test_llamacpp_runs_a_pruned_student_as_transformers_does(pruned, tmp_path, tensor_type, kv_type, max_rel_diff):
    from edgestill.evaluate.metrics import logit_parity
    from edgestill.export.gguf import export_gguf
    from edgestill.runtime.llamacpp import llamacpp_logits

    model, tokenizer, ids = pruned
    path = tmp_path / f"pruned-{tensor_type}.gguf"
    export_gguf(model, tokenizer, path, tensor_type=tensor_type)
    parity = logit_parity(logits(model, torch.tensor([ids]))[0].numpy(),
                          llamacpp_logits(path, ids, n_threads=1, kv_type=kv_type))
    print(f"width-pruned {tensor_type} (kv {kv_type}): {parity}")
    assert parity["top1_agreement"] >= 0.99
    assert parity["max_abs_diff"] < max_rel_diff * parity["logit_scale"]
