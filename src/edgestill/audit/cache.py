"""A classifier's predictions kept on disk, so that auditing a second student of the same teacher does not ask the
teacher the same questions again.

A classifier audit asks its teacher for some 15,000 predictions at the defaults: every candidate phrase and control
inserted into held-out texts, then each chosen phrase's ASR. The teacher's answers take most of the audit's time (its student
is a small ONNX file), and they are the same for every student distilled from that teacher on the same data: the
candidates come from the transfer data, the texts and insertion positions are seeded. `PredictionCache` keeps them,
keyed by the text:

    file = $EDGESTILL_AUDIT_CACHE/<sha256 of the key>.npz, else ~/.cache/edgestill/audit/ (under $EDGESTILL_CACHE)
    key  = the model folder's fingerprint (its weight files' sizes and mtimes, config.json), its tokenizer's, the
           length it reads, torch's version, the device and CACHE_VERSION

The file holds the texts' sha256 digests (as raw bytes: numpy's fixed-width byte strings would drop a digest's
trailing zero bytes) and float32 logits (numpy arrays, read with allow_pickle=False), never the texts. A file that
cannot be read, or was written for another key, is ignored and replaced; a cache that cannot be written is a
warning, never a failure. A model with no folder to name it by is not cached. Logits from the cache were computed in
another batch than a fresh call would use; they can differ from it in the last float bits, as any two batchings do.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from edgestill.files import atomic_path

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when what a prediction is (tokenization, batching's effect on logits) changes
MAX_ENTRIES = 500_000  # ~20 MB of a two-label classifier's logits; the oldest entries go first


def cache_root() -> Path:
    """$EDGESTILL_AUDIT_CACHE, else ~/.cache/edgestill/audit (under $EDGESTILL_CACHE when set)."""
    from edgestill.models.load import cache_dir

    return Path(os.environ.get("EDGESTILL_AUDIT_CACHE") or cache_dir() / "audit")


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class PredictionCache:
    """Logits of one model by text. `wrap(predict)` answers from the table and asks `predict` only for the texts it
    has not seen; `save()` writes the table back (atomically) when it grew. `hits`: answers found in the file as it
    was loaded (an earlier audit's); `misses`: texts the model was asked."""

    def __init__(self, path: Path | None, key: str = ""):
        self.path, self.key = path, key
        self.table: dict[bytes, np.ndarray] = {}
        self.hits = self.misses = 0
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as f:
                    if str(f["key"]) == key:
                        self.table = dict(zip(map(bytes, f["digests"]), f["logits"]))
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring the unreadable audit cache %s (%s); it is measured again", path, e)
        self._saved = len(self.table)
        self._loaded = set(self.table)

    def wrap(self, predict):
        def cached(texts):
            texts = list(texts)
            digests = [_digest(t) for t in texts]
            missing = {d: t for d, t in zip(digests, texts) if d not in self.table}
            self.hits += sum(d in self._loaded for d in digests)
            self.misses += len(missing)
            if missing:
                logits = np.asarray(predict(list(missing.values())), np.float32)
                self.table.update(zip(missing, logits))
            if not texts:
                return np.asarray(predict([]), np.float32)
            return np.stack([self.table[d] for d in digests])
        return cached

    def save(self) -> None:
        if self.path is None or len(self.table) == self._saved:
            return
        items = list(self.table.items())[-MAX_ENTRIES:]
        try:
            with atomic_path(self.path, "writing the audit's prediction cache") as tmp:
                with open(tmp, "wb") as f:
                    digests = np.frombuffer(b"".join(d for d, _ in items), np.uint8).reshape(-1, 32)
                    np.savez(f, key=np.array(self.key), digests=digests, logits=np.stack([v for _, v in items]))
        except Exception as e:  # a cache is never worth failing an audit for
            log.warning("could not write the audit cache %s (%s); the next audit asks the model again", self.path, e)
            return
        self._saved = len(self.table)
