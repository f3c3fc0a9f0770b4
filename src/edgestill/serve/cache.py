"""An exact response cache for deterministic requests (Edge-LLM's cache, docs/references.md [5], its simplest part).

A request is deterministic when it is greedy (`temperature` 0) or names a `seed`: the same model, prompt and
parameters give the same tokens (with prefix reuse, up to the rare greedy tie that other evaluation batch sizes can
flip; the cache then keeps answering with the first). Its answer is kept (least
recently used first out, `capacity` entries) under a key made of everything that decides the output: the kind
(completion or chat), every generation parameter and whether it streams; a repeat is answered from the cache without
queueing. Sampled requests (temperature > 0 without a seed) are never cached.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict


def deterministic(kwargs: dict) -> bool:
    return kwargs.get("temperature", 1.0) == 0.0 or kwargs.get("seed") is not None


class ResponseCache:
    """Thread-safe LRU of finished responses (a JSON object, or the list of a stream's chunks)."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._items: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(model: str, kind: str, kwargs: dict, stream: bool) -> str | None:
        """The cache key of a request, or None when its output is not deterministic."""
        if not deterministic(kwargs):
            return None
        return json.dumps({"model": model, "kind": kind, "stream": stream, **kwargs}, sort_keys=True)

    def get(self, key: str | None):
        if key is None or self.capacity < 1:
            return None
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key: str | None, response) -> None:
        if key is None or self.capacity < 1:
            return
        with self._lock:
            self._items[key] = response
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
