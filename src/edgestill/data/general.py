"""General English held out from everything: out-of-domain perplexity blocks and LAMBADA-style passages.

A student distilled on one domain (Shakespeare by default) can keep its in-domain perplexity and
still lose general English; these texts measure that. Nothing trains or calibrates on them.

The default source is the Lee news corpus (300 Australian news articles, one per line, ~360 KB),
which ships inside the `gensim` wheel. gensim is installed data-only
(`pip install --no-deps gensim==4.4.0`) and never imported: its compiled modules need dependencies
we do not install. The first half of the documents gives the perplexity blocks, the second half the
last-word passages, so the two never share text.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

from edgestill.data.corpus import Document, tokenize_blocks
from edgestill.data.textcheck import read_text
from edgestill.errors import EdgestillError

GENERAL_ENGLISH = "general-english"
LEE_FILE = Path("test") / "test_data" / "lee_background.cor"
INSTALL_FIX = "run `pip install --no-deps gensim==4.4.0` (or `make venv`)"
FIX_NOT_TEXT = "give 'general-english' or a UTF-8 .txt file of documents separated by blank lines"

MIN_PASSAGE_WORDS = 50  # LAMBADA's passages are a few sentences; its targets need that much context
MIN_TARGET_LETTERS = 3
# A period after these is no sentence end ("Mr. Howard"); single capitals ("J. Smith") and dotted
# acronyms ("U.S.") are caught by rule in _sentence_ends.
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "lt", "col", "sgt", "capt", "cmdr",
                 "sen", "rep", "gov", "rev", "hon", "vs", "etc", "inc", "ltd", "co", "corp", "jan", "feb",
                 "mar", "apr", "aug", "sep", "sept", "oct", "nov", "dec", "mt", "ft", "approx", "dept"}
# A candidate sentence end: . ! or ? (closing quotes/brackets may follow), whitespace, then an upper-case
# letter, a digit or an opening quote/bracket.
SENTENCE_END = re.compile(r"""[.!?]["')\]]*\s+(?=["'(\[]?[A-Z0-9])""")


def general_english_documents() -> list[str]:
    """The 300 articles of the Lee news corpus (one string each), in file order."""
    path = _lee_path()
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _lee_path() -> Path:
    """Where gensim's wheel put the Lee corpus (found without importing gensim), or a one-line error."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise EdgestillError(f"the general-English corpus ships in the package gensim, which is not installed; {INSTALL_FIX}")
    path = Path(list(spec.submodule_search_locations)[0]) / LEE_FILE
    if not path.is_file():
        raise EdgestillError(f"the gensim package has no {LEE_FILE} (looked in {path.parent}); "
                             "reinstall it: pip install --no-deps --force-reinstall gensim==4.4.0")
    return path


def _documents(source: str) -> list[str]:
    """The built-in corpus, or a user's .txt file cut at blank lines; at least two documents (one per half)."""
    if source == GENERAL_ENGLISH:
        return general_english_documents()
    path = Path(source).expanduser()
    if not path.is_file():
        raise EdgestillError(f"out-of-domain text '{source}' not found: {FIX_NOT_TEXT}")
    docs = [d.strip() for d in re.split(r"\n\s*\n", read_text(path, FIX_NOT_TEXT)) if d.strip()]
    if len(docs) < 2:
        raise EdgestillError(f"out-of-domain text '{source}' holds {len(docs)} document(s); it needs at least 2 "
                             "separated by a blank line (the first half gives perplexity blocks, the second last-word passages)")
    return docs


def check_source(source: str | None) -> None:
    """Refuse a missing or unusable out-of-domain source before any training (None: nothing is measured)."""
    if source == GENERAL_ENGLISH:
        _lee_path()  # found, not read: this runs at every config load
    elif source is not None:
        _documents(source)


def out_of_domain_blocks(tokenizer, seq_len: int, max_tokens: int, source: str = GENERAL_ENGLISH) -> np.ndarray:
    """(N, seq_len) int32 token blocks of the first half of the documents (EOS between them), at most `max_tokens`.

    Blocks are cut as the in-domain ones are (data.corpus.tokenize_blocks): a short tail is dropped and a
    small budget keeps a seeded random subset of whole blocks, so it still samples every document.
    """
    docs = _documents(source)
    first_half = [Document(f"{source}:{i}", text) for i, text in enumerate(docs[: len(docs) // 2])]
    blocks = tokenize_blocks(first_half, tokenizer, seq_len, max_tokens)
    if len(blocks) == 0:
        raise EdgestillError(f"out-of-domain text '{source}' is too short for one block of {seq_len} tokens "
                             "(its first half is what is scored); add text or lower seq_len")
    return blocks


def _sentence_ends(text: str) -> list[int]:
    """Offsets just after each sentence's final punctuation (the last one: the end of `text`)."""
    ends = []
    for match in SENTENCE_END.finditer(text):
        word = text[: match.start() + 1].rsplit(None, 1)[-1].lstrip("\"'([")  # "Mr." / "U.S." / "J."
        stem = word.rstrip(".!?")
        if word.endswith(".") and (stem.lower() in ABBREVIATIONS or "." in stem or (len(stem) == 1 and stem.isupper())):
            continue
        ends.append(match.end())
    return ends + [len(text)]


def _sentences(text: str) -> list[str]:
    """`text` cut into sentences, each with its whitespace runs made single spaces."""
    starts = [0] + _sentence_ends(text)
    return [" ".join(text[a:b].split()) for a, b in zip(starts, starts[1:]) if text[a:b].strip()]


def _passage_item(sentences: list[str]) -> tuple[str, str] | None:
    """(context, target) as lm-eval's lambada cuts its text, or None when the last word is no plain word."""
    text = " ".join(sentences)
    text = re.sub(r"[^A-Za-z0-9]+$", "", text)  # final punctuation (and closing quotes) dropped
    if " " not in text:
        return None
    context, target = text.rsplit(" ", 1)
    if not (target.isascii() and target.isalpha() and len(target) >= MIN_TARGET_LETTERS):
        return None
    return context, target


def lambada_passages(n: int, source: str = GENERAL_ENGLISH) -> list[tuple[str, str]]:
    """Up to `n` LAMBADA-style (context, target_word) items from the second half of the documents.

    Each document is cut into sentences and then into non-overlapping passages of consecutive sentences
    of at least MIN_PASSAGE_WORDS words (a short tail is dropped); the target is the passage's last word,
    kept when it is alphabetic with at least MIN_TARGET_LETTERS letters. As in lm-eval's lambada_openai the
    context ends without a trailing space and is scored with the continuation " " + target.

    Unlike LAMBADA (Paperno et al. 2016, https://arxiv.org/abs/1606.06031) nothing is filtered by humans for
    needing the broad context, so accuracy is lower; it serves to compare models, not to quote as LAMBADA.
    Deterministic: the same source always gives the same items in the same order.
    """
    docs = _documents(source)
    items = []
    for doc in docs[len(docs) // 2 :]:
        passage: list[str] = []
        for sentence in _sentences(doc):
            passage.append(sentence)
            if sum(len(s.split()) for s in passage) >= MIN_PASSAGE_WORDS:
                item = _passage_item(passage)
                if item is not None:
                    items.append(item)
                    if len(items) == n:
                        return items
                passage = []
    return items
