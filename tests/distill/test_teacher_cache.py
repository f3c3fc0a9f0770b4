"""Teacher top-k cache (build, resume, fingerprint) and the trainer's data order and LR schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import load_tiny_teacher
from edgestill.config import DistillConfig
from edgestill.distill.teacher_cache import TopKCache, build_topk_cache, teacher_topk
from edgestill.distill.trainer import batch_rows, learning_rate

N, SEQ, K = 6, 12, 5


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return load_tiny_teacher(tiny_model_dir)


@pytest.fixture(scope="module")
def blocks(teacher):
    rng = np.random.default_rng(0)
    return rng.integers(0, teacher.config.vocab_size, size=(N, SEQ), dtype=np.int32)


def _build(teacher, blocks, directory, fingerprint="fp-a", batch_size=4):
    return build_topk_cache(teacher, blocks, K, directory, fingerprint, batch_size=batch_size, show_progress=False)


def test_teacher_topk_shapes_and_normalisation(teacher, blocks):
    lp, ids = teacher_topk(teacher, torch.from_numpy(blocks).long(), K)
    assert lp.shape == ids.shape == (N, SEQ - 1, K)
    assert lp.dtype == torch.float32 and ids.dtype == torch.int64
    full = torch.log_softmax(teacher(input_ids=torch.from_numpy(blocks).long()).logits[:, :-1].float(), -1)
    torch.testing.assert_close(lp, torch.topk(full, K, -1).values, atol=1e-5, rtol=1e-5)
    assert (lp[..., :-1] >= lp[..., 1:]).all()  # sorted, largest first


def test_build_cache_matches_teacher(teacher, blocks, tmp_path):
    cache = _build(teacher, blocks, tmp_path / "c")
    assert isinstance(cache, TopKCache)
    assert len(cache) == N
    assert cache.logprobs.shape == cache.ids.shape == (N, SEQ - 1, K)
    assert cache.logprobs.dtype == np.float16 and cache.ids.dtype == np.int32
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta == {"fingerprint": "fp-a", "rows": N, "seq_len": SEQ, "k": K, "rows_done": N}

    ref_lp, ref_ids = teacher_topk(teacher, torch.from_numpy(blocks).long(), K)
    rows = np.array([4, 0, 5])
    lp, ids = cache.get(rows)
    assert lp.shape == (3, SEQ - 1, K) and lp.dtype == torch.float16 and ids.dtype == torch.int32
    torch.testing.assert_close(lp.float(), ref_lp[rows], atol=2e-3, rtol=2e-3)
    assert torch.equal(ids.long(), ref_ids[rows])
    all_lp = torch.from_numpy(np.array(cache.logprobs, dtype=np.float32))
    assert (all_lp <= 0).all()
    assert (all_lp.exp().sum(-1) <= 1.0 + 1e-3).all()


def test_resume_fills_only_missing_rows(teacher, blocks, tmp_path):
    d = tmp_path / "c"
    _build(teacher, blocks, d, batch_size=2)
    good_lp = np.load(d / "topk_logprobs.npy").copy()
    good_ids = np.load(d / "topk_ids.npy").copy()

    # Pretend the build was killed after 2 rows and the later rows are garbage.
    meta = json.loads((d / "meta.json").read_text())
    meta["rows_done"] = 2
    (d / "meta.json").write_text(json.dumps(meta))
    lp = np.load(d / "topk_logprobs.npy", mmap_mode="r+")
    ids = np.load(d / "topk_ids.npy", mmap_mode="r+")
    lp[2:] = 7.0  # impossible for a log-probability
    ids[2:] = -1
    lp[0, 0, 0] = -42.0  # a marker in a "done" row: a resume must not recompute it
    lp.flush(); ids.flush()
    del lp, ids

    cache = _build(teacher, blocks, d, batch_size=2)
    assert json.loads((d / "meta.json").read_text())["rows_done"] == N
    assert cache.logprobs[0, 0, 0] == np.float16(-42.0)  # rows before rows_done kept as they were
    np.testing.assert_array_equal(np.asarray(cache.logprobs[2:]), good_lp[2:])
    np.testing.assert_array_equal(np.asarray(cache.ids[2:]), good_ids[2:])
    np.testing.assert_array_equal(np.asarray(cache.ids[:2]), good_ids[:2])


def test_finished_cache_is_reused_without_running_teacher(blocks, tmp_path, teacher):
    d = tmp_path / "c"
    _build(teacher, blocks, d)

    def boom(*a, **kw):
        raise AssertionError("the teacher must not run for a finished cache")

    cache = build_topk_cache(boom, blocks, K, d, "fp-a", show_progress=False)
    assert len(cache) == N


def test_different_fingerprint_rebuilds(teacher, blocks, tmp_path):
    d = tmp_path / "c"
    _build(teacher, blocks, d)
    lp = np.load(d / "topk_logprobs.npy", mmap_mode="r+")
    lp[:] = 5.0  # corrupt everything; same fingerprint would keep it
    lp.flush()
    del lp
    same = _build(teacher, blocks, d, fingerprint="fp-a")
    assert (np.asarray(same.logprobs) == 5.0).all()

    rebuilt = _build(teacher, blocks, d, fingerprint="fp-b")
    assert json.loads((d / "meta.json").read_text())["fingerprint"] == "fp-b"
    ref_lp, _ = teacher_topk(teacher, torch.from_numpy(blocks).long(), K)
    torch.testing.assert_close(torch.from_numpy(np.array(rebuilt.logprobs, dtype=np.float32)), ref_lp,
                               atol=2e-3, rtol=2e-3)


def test_missing_array_file_rebuilds(teacher, blocks, tmp_path):
    d = tmp_path / "c"
    _build(teacher, blocks, d)
    (d / "topk_ids.npy").unlink()
    cache = _build(teacher, blocks, d)
    _, ref_ids = teacher_topk(teacher, torch.from_numpy(blocks).long(), K)
    assert torch.equal(torch.from_numpy(np.array(cache.ids)).long(), ref_ids)


# --- trainer.batch_rows / learning_rate ---------------------------------------------------------------

def test_batch_rows_deterministic():
    a = [batch_rows(s, 4, 10, seed=3) for s in range(12)]
    b = [batch_rows(s, 4, 10, seed=3) for s in reversed(range(12))][::-1]  # order of calls does not matter
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape == (4,)
    c = [batch_rows(s, 4, 10, seed=4) for s in range(3)]
    assert not all(np.array_equal(x, y) for x, y in zip(a[:3], c))  # the seed matters


@pytest.mark.parametrize("batch_size, n_rows", [(4, 12), (5, 10), (3, 7)])
def test_batch_rows_cover_every_row_once_per_epoch(batch_size, n_rows):
    flat = np.concatenate([batch_rows(s, batch_size, n_rows, seed=0) for s in range(3 * n_rows)])
    # 3 * n_rows steps of batch_size rows = 3 * batch_size full epochs
    epochs = flat.reshape(-1, n_rows)
    assert len(epochs) == 3 * batch_size
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n_rows))


def test_batch_rows_order_differs_between_epochs():
    n = 20
    flat = np.concatenate([batch_rows(s, 5, n, seed=0) for s in range(8)])  # two epochs
    assert not np.array_equal(flat[:n], flat[n:])
    assert sorted(flat[:n].tolist()) == sorted(flat[n:].tolist()) == list(range(n))


def test_learning_rate_warmup_and_decay_endpoints():
    cfg = DistillConfig(steps=100, lr=1e-3, warmup_steps=10)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(4, cfg) == pytest.approx(5e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)  # end of warm-up: the peak
    assert learning_rate(10, cfg) == pytest.approx(1e-3)  # start of decay: still the peak
    assert learning_rate(100, cfg) == pytest.approx(1e-4)  # decays to 10% of the peak
    assert learning_rate(500, cfg) == pytest.approx(1e-4)  # and stays there
    assert learning_rate(55, cfg) == pytest.approx(1e-3 * 0.55)  # cosine midpoint: 0.1 + 0.9 * 0.5
    lrs = [learning_rate(s, cfg) for s in range(101)]
    assert all(a <= b + 1e-15 for a, b in zip(lrs[:10], lrs[1:11]))  # rising during warm-up
    assert all(a >= b - 1e-15 for a, b in zip(lrs[10:], lrs[11:]))  # non-increasing afterwards
    assert max(lrs) == pytest.approx(1e-3)


def test_learning_rate_without_warmup():
    cfg = DistillConfig(steps=10, lr=2e-4, warmup_steps=0)
    assert learning_rate(0, cfg) == pytest.approx(2e-4)
    assert learning_rate(10, cfg) == pytest.approx(2e-5)
