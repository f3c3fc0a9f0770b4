"""Measured once: the reference side of "what broke", cached as one JSON file per key.

Every run (and every point of `edgestill sweep`) measures, besides its student, things that depend only on the
original teacher and the reference (the corrected teacher): the original's perplexity in and out of domain, the
zero-shot scores of both, the original's greedy chat answers and the reference's scores on them. Those are the
same for every student of one teacher, data and settings, so `what_broke` keeps them here, keyed by everything
the numbers depend on (`measured_key`), and measures them again only when the key changes.

    key   = models (fingerprints of their folders: weight files' sizes and mtimes, config.json), tokenizer,
            sha256 of the test blocks, the out-of-domain blocks and the zero-shot items, chat prompts and answer
            length, batch size, torch and transformers versions, device, threads, MEASURE_VERSION
    file  = $EDGESTILL_MEASURED_CACHE/<sha256 of the key>.json, else ~/.cache/edgestill/measured/ (under
            $EDGESTILL_CACHE when set): {"key", "measured" (UTC date), "result"}

A file holds numbers and token ids only, never logits. A file that cannot be read, or was written for another
key, is ignored (measured again and rewritten); a cache that cannot be written is a warning, never a failure.
A model without a folder (built in memory, or a hub id) has no fingerprint: nothing is cached for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgestill.errors import EdgestillError
from edgestill.files import write_text_atomic

log = logging.getLogger("edgestill")

# Bump whenever the measuring code (what_broke's reference side, chat, zero-shot, token_nll) changes its numbers.
MEASURE_VERSION = 1


def measured_root() -> Path:
    """$EDGESTILL_MEASURED_CACHE, else ~/.cache/edgestill/measured (under $EDGESTILL_CACHE when set)."""
    from edgestill.models.load import cache_dir

    return Path(os.environ.get("EDGESTILL_MEASURED_CACHE") or cache_dir() / "measured")


def sha256_of(value) -> str | None:
    """sha256 of token blocks (an array: its dtype, shape and bytes) or of JSON-able data; None stays None."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        h = hashlib.sha256(f"{value.dtype.str}:{value.shape}:".encode())
        h.update(np.ascontiguousarray(value).tobytes())
        return h.hexdigest()
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what turns text into ids and back: the tokenizer's full definition (a fast tokenizer's JSON, else
    its vocabulary), its chat template and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {name: getattr(tokenizer, name, None) for name in
               ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    return sha256_of([type(tokenizer).__name__, sha256_of(definition), getattr(tokenizer, "chat_template", None),
                      special])


def _device(model) -> str:
    import torch

    from edgestill.evaluate.environment import cpu_model

    param = next(model.parameters())
    if param.device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(param.device)}:{param.dtype}"
    return f"{param.device.type}:{cpu_model()}:{param.dtype}"


def measured_key(original_path, reference_path, original, reference, tokenizer, **inputs) -> dict | None:
    """The cache key of one reference-side measurement, or None when a model has no folder to fingerprint.

    original_path / reference_path: the folders the models were loaded from (the reference's is ignored when
    `reference` is `original`). inputs: the measured data and settings, already JSON-able (hashes, lists, numbers).
    """
    import torch
    import transformers

    from edgestill.models.load import model_fingerprint

    original_fp = model_fingerprint(original_path)
    reference_fp = "original" if reference is original else model_fingerprint(reference_path)
    if original_fp is None or reference_fp is None:
        return None
    return {"measure_version": MEASURE_VERSION, "original": original_fp, "reference": reference_fp,
            "tokenizer": tokenizer_fingerprint(tokenizer), **inputs,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "device": [_device(original), _device(reference)], "threads": torch.get_num_threads()}


def cache_file(root: Path, key: dict) -> Path:
    return Path(root) / f"{sha256_of(key)[:32]}.json"


def load_measured(root: Path, key: dict, fields: tuple[str, ...] = ()) -> dict | None:
    """{"measured", "result"} stored under `key`, or None (none stored, unreadable, written for another key, or a
    result without all of `fields`)."""
    path = cache_file(root, key)
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored["key"] != key or not isinstance(stored["measured"], str) or not isinstance(stored["result"], dict) \
                or not set(fields) <= set(stored["result"]):
            raise ValueError("written for another key, or incomplete")
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.debug("measured cache %s ignored (%s: %s); measuring again", path, type(e).__name__, e)
        return None
    return {"measured": stored["measured"], "result": stored["result"]}


def store_measured(root: Path, key: dict, result: dict) -> dict:
    """Write `result` under `key` (atomically); returns {"measured", "cache_file"} (cache_file None: not written)."""
    measured = datetime.now(timezone.utc).isoformat(timespec="seconds")
    path = cache_file(root, key)
    try:
        write_text_atomic(path, json.dumps({"key": key, "measured": measured, "result": result}, indent=1),
                          "caching the reference-side measurements")
    except (EdgestillError, OSError) as e:
        log.warning("the reference-side measurements were not cached (%s); they are measured again next time", e)
        return {"measured": measured, "cache_file": None}
    return {"measured": measured, "cache_file": str(path)}
