"""audit/cache.py: a model's predictions kept by text, asked again only for texts not seen."""

from __future__ import annotations

import numpy as np

from edgestill.audit.cache import PredictionCache


class Counting:
    def __init__(self):
        self.asked: list[str] = []

    def __call__(self, texts):
        self.asked += list(texts)
        return np.array([[len(t), -len(t)] for t in texts], np.float32)


def test_only_unseen_texts_are_asked_and_answers_keep_their_order(tmp_path):
    model = Counting()
    cache = PredictionCache(tmp_path / "c.npz", "k")
    f = cache.wrap(model)
    assert f(["ab", "a", "ab"]).tolist() == [[2, -2], [1, -1], [2, -2]]
    assert model.asked == ["ab", "a"]  # a repeated text is asked once
    assert f(["a", "abc"]).tolist() == [[1, -1], [3, -3]] and model.asked == ["ab", "a", "abc"]
    assert (cache.hits, cache.misses) == (0, 3)  # nothing came from a file; three texts were asked


def test_a_saved_cache_answers_a_later_audit_and_another_key_does_not(tmp_path):
    path = tmp_path / "sub" / "c.npz"
    first = PredictionCache(path, "k")
    first.wrap(Counting())(["one", "three"])
    first.save()
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))  # written atomically, no litter
    model = Counting()
    later = PredictionCache(path, "k")
    assert later.wrap(model)(["three", "one"]).tolist() == [[5, -5], [3, -3]] and model.asked == []
    assert (later.hits, later.misses) == (2, 0)
    other = Counting()
    PredictionCache(path, "another model").wrap(other)(["one"])
    assert other.asked == ["one"]


def test_an_unreadable_cache_is_ignored_and_no_folder_means_no_file(tmp_path, caplog):
    path = tmp_path / "c.npz"
    path.write_bytes(b"not a numpy file")
    cache = PredictionCache(path, "k")
    assert cache.table == {} and "unreadable audit cache" in caplog.text
    cache.wrap(Counting())(["x"])
    cache.save()
    assert PredictionCache(path, "k").table  # replaced by a good one
    none = PredictionCache(None)
    none.wrap(Counting())(["x"])
    none.save()  # nothing to write to, no error


def test_digests_ending_in_zero_bytes_survive_a_save(tmp_path):
    # numpy's fixed-width byte strings drop trailing NULs; about one text in 256 has a digest that ends in one
    import hashlib

    texts = [f"t{i}" for i in range(2000)]
    assert any(hashlib.sha256(t.encode()).digest().endswith(b"\0") for t in texts)
    cache = PredictionCache(tmp_path / "c.npz", "k")
    cache.wrap(Counting())(texts)
    cache.save()
    model = Counting()
    PredictionCache(tmp_path / "c.npz", "k").wrap(model)(texts)
    assert model.asked == []
