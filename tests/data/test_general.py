"""General-English held-out text: the Lee corpus from the gensim wheel, OOD blocks, LAMBADA-style passages."""

from __future__ import annotations

import importlib.util
import types

import numpy as np
import pytest

from conftest import one_line_error
from edgestill.data import general
from edgestill.data.general import GENERAL_ENGLISH, general_english_documents, lambada_passages, out_of_domain_blocks

needs_gensim = pytest.mark.skipif(importlib.util.find_spec("gensim") is None,
                                  reason="pip install --no-deps gensim==4.4.0 (make venv)")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _normalized(doc: str) -> str:
    return " ".join(doc.split())


# --- the built-in corpus -----------------------------------------------------------------------------

@needs_gensim
def test_lee_corpus_is_300_cased_news_articles():
    docs = general_english_documents()
    assert len(docs) == 300
    assert docs[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert all(d[0].isupper() or d[0] in "\"'" for d in docs)
    assert 300_000 < sum(map(len, docs)) < 400_000


def test_missing_gensim_names_the_install_line(monkeypatch):
    monkeypatch.setattr(general.importlib.util, "find_spec", lambda name: None)
    msg = one_line_error(general_english_documents)
    assert "pip install --no-deps gensim==4.4.0" in msg and "make venv" in msg


def test_gensim_without_the_file_says_reinstall(monkeypatch, tmp_path):
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(general.importlib.util, "find_spec", lambda name: spec)
    msg = one_line_error(general_english_documents)
    assert "lee_background.cor" in msg and "--force-reinstall gensim==4.4.0" in msg


# --- out-of-domain blocks ----------------------------------------------------------------------------

@needs_gensim
def test_blocks_come_from_the_first_half_only(tokenizer):
    docs = general_english_documents()
    blocks = out_of_domain_blocks(tokenizer, seq_len=64, max_tokens=10**9)
    assert blocks.dtype == np.int32 and blocks.shape[1] == 64
    text = tokenizer.decode(blocks.reshape(-1))
    assert docs[0][:200] in text and docs[149][:200] in text
    assert docs[150][:200] not in text and docs[299][:200] not in text
    assert (blocks == tokenizer.eos_token_id).sum() in (149, 150)  # one EOS after each document (last may be cut)


@needs_gensim
def test_blocks_respect_max_tokens_and_are_deterministic(tokenizer):
    a = out_of_domain_blocks(tokenizer, seq_len=32, max_tokens=32 * 5)
    b = out_of_domain_blocks(tokenizer, seq_len=32, max_tokens=32 * 5, source=GENERAL_ENGLISH)
    assert a.shape == (5, 32)
    np.testing.assert_array_equal(a, b)


def _write_docs(path, docs):
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return str(path)


def test_user_text_file_first_half_gives_blocks(tokenizer, tmp_path):
    source = _write_docs(tmp_path / "ood.txt", ["the king speaks. " * 40, "the queen hears. " * 40,
                                                 "noble lord. " * 40, "fair lady. " * 40])
    blocks = out_of_domain_blocks(tokenizer, seq_len=16, max_tokens=10**6, source=source)
    text = tokenizer.decode(blocks.reshape(-1))
    assert "king" in text and "queen" in text
    assert "lord" not in text and "lady" not in text


def test_user_text_file_errors(tokenizer, tmp_path):
    msg = one_line_error(out_of_domain_blocks, tokenizer, 16, 1000, source=str(tmp_path / "nope.txt"))
    assert "nope.txt" in msg and "not found" in msg and "general-english" in msg
    one_doc = _write_docs(tmp_path / "one.txt", ["the king speaks. " * 40])
    assert "at least 2" in one_line_error(out_of_domain_blocks, tokenizer, 16, 1000, source=one_doc)
    short = _write_docs(tmp_path / "short.txt", ["the king", "the queen"])
    msg = one_line_error(out_of_domain_blocks, tokenizer, 64, 1000, source=short)
    assert "too short for one block of 64 tokens" in msg and "lower seq_len" in msg


# --- LAMBADA-style passages --------------------------------------------------------------------------

@needs_gensim
def test_passages_from_the_second_half_in_order_without_overlap():
    docs = general_english_documents()
    items = lambada_passages(10**6)
    assert 400 <= len(items) <= 450  # 422 with gensim 4.4.0's file
    first_half = " ".join(_normalized(d) for d in docs[:150])
    second_half = " ".join(_normalized(d) for d in docs[150:])
    position = 0
    for context, target in items:
        assert not context.endswith(" ") and " " not in target
        assert target.isalpha() and len(target) >= 3
        assert len(context.split()) + 1 >= 50
        found = second_half.find(context + " " + target, position)
        assert found >= position, (context[-60:], target)  # in order, never overlapping the one before
        assert not second_half[found + len(context) + 1 + len(target)].isalnum()  # the whole last word
        position = found + len(context)
        assert context[:80] not in first_half


@needs_gensim
def test_passages_are_deterministic_and_first_n():
    assert lambada_passages(7) == lambada_passages(7) == lambada_passages(50)[:7]


def test_passages_cut_at_sentence_ends_not_abbreviations(tmp_path):
    filler = " ".join(["word"] * 28)
    s1 = f"Alpha {filler} one."  # 30 words
    # 29 words; a cut at "Mrs." (word 50 of the passage), "J." or "U.S." would end the passage there
    s2 = f"Then {' '.join(['word'] * 17)} met Mrs. Brown and J. Smith of the U.S. army today."
    quoted = f'He said "{filler} three words here."'  # 33 words
    s4 = f"Short {' '.join(['word'] * 48)} up."  # 50 words ending in a two-letter word: skipped
    s5 = f"Last {filler} final!"  # 30 words
    source = _write_docs(tmp_path / "ood.txt", ["First half only.", f"{s1} {s2} {quoted}", f"{s4} {s5} {quoted}"])
    assert lambada_passages(10, source=source) == [
        (f"{s1} {s2.removesuffix(' today.')}", "today"),  # the 33-word tail of that document is dropped
        (f'{s5} He said "{filler} three words', "here"),  # closing punctuation and quote dropped
    ]
    assert lambada_passages(1, source=source) == lambada_passages(10, source=source)[:1]
