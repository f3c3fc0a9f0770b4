"""On-policy distillation pieces: sampling without gradient (KV-cached greedy equals HF generate), the
seeded lambda coin, DistiLLM's adaptive schedule and the replay buffer."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import load_tiny_teacher  # tests/ is on sys.path
from edgestill.distill.on_policy import (AdaptiveFraction, OnPolicyBatches, OnPolicyConfig, ReplayBuffer,
                                         sample_sequences)
from edgestill.errors import EdgestillError


class CountingLM(torch.nn.Module):
    """A stand-in causal LM: fixed random next-token logits per last token; counts forward calls."""

    def __init__(self, vocab: int = 20):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))
        self.calls = 0

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        self.calls += 1
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=None)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_tiny_teacher(tiny_model_dir)
    prompts = torch.randint(3, model.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    return model, prompts


def test_greedy_sampling_matches_hf_generate_and_full_recompute(tiny):
    model, prompts = tiny
    ours = sample_sequences(model, prompts, 12, temperature=0.0)
    ref = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=8,
                         min_new_tokens=8)
    assert torch.equal(ours, ref)
    # and the KV cache changes nothing: recompute the whole prefix at every step
    seqs = prompts
    with torch.no_grad():
        while seqs.shape[1] < 12:
            seqs = torch.cat([seqs, model(input_ids=seqs).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(ours, seqs)


def test_sampling_is_seeded_gradient_free_and_restores_mode(tiny):
    model, prompts = tiny
    model.train()
    a = sample_sequences(model, prompts, 16, 1.0, torch.Generator().manual_seed(1))
    b = sample_sequences(model, prompts, 16, 1.0, torch.Generator().manual_seed(1))
    c = sample_sequences(model, prompts, 16, 1.0, torch.Generator().manual_seed(2))
    assert model.training  # mode restored
    model.eval()
    assert a.shape == (2, 16) and torch.equal(a[:, :4], prompts)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not a.requires_grad and all(p.grad is None for p in model.parameters())


def test_sampling_follows_the_model_distribution():
    """One step from a fixed distribution: empirical frequencies match softmax(logits / T)."""
    lm = CountingLM(vocab=5)
    prompts = torch.zeros(4000, 1, dtype=torch.long)
    for temperature in (1.0, 3.0):
        seqs = sample_sequences(lm, prompts, 2, temperature, torch.Generator().manual_seed(0))
        freq = torch.bincount(seqs[:, 1], minlength=5).float() / 4000
        torch.testing.assert_close(freq, torch.softmax(lm.table[0].detach() / temperature, -1), atol=0.03, rtol=0)


def test_fraction_decides_how_often_batches_are_replaced():
    lm = CountingLM()
    ids = torch.randint(0, 20, (3, 10), generator=torch.Generator().manual_seed(0))
    for fraction, lo, hi in [(0.0, 0, 0), (1.0, 200, 200), (0.3, 40, 80)]:
        batches = OnPolicyBatches(OnPolicyConfig(fraction=fraction, prompt_tokens=4, replay_capacity=0))
        replaced = 0
        for step in range(200):
            out, mask = batches.draw(step, ids, lm)
            if mask is not None:
                replaced += 1
                assert out.shape == ids.shape and torch.equal(out[:, :4], ids[:, :4])
                assert mask.shape == (3, 9) and not mask[:, :3].any() and mask[:, 3:].all()
            else:
                assert out is ids
        assert lo <= replaced <= hi, (fraction, replaced)


def test_draws_are_a_pure_function_of_seed_step_and_rank():
    ids = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    cfg = OnPolicyConfig(fraction=0.5, prompt_tokens=2, replay_capacity=0, seed=7)
    runs = []
    for _ in range(2):
        batches = OnPolicyBatches(cfg)
        runs.append([batches.draw(s, ids, CountingLM())[0] for s in range(20)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    other_rank = [OnPolicyBatches(cfg).draw(s, ids, CountingLM(), rank=1)[0] for s in range(20)]
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], other_rank))


def test_replay_buffer_is_reused_instead_of_sampling():
    lm = CountingLM()
    ids = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))
    batches = OnPolicyBatches(OnPolicyConfig(fraction=1.0, prompt_tokens=2, replay_capacity=4, replay_ratio=1.0))
    first, _ = batches.draw(0, ids, lm)
    calls = lm.calls
    assert calls == 6 and len(batches.buffer) == 2  # one prefill + 5 decode steps; both rows stored
    second, mask = batches.draw(1, ids, lm)
    assert lm.calls == calls and mask is not None  # from the buffer, no generation
    assert {tuple(r.tolist()) for r in second} <= {tuple(r.tolist()) for r in first}


def test_replay_buffer_capacity_fifo_and_state():
    buf = ReplayBuffer(capacity=3)
    buf.add(torch.arange(8).view(4, 2))  # rows 0..3; row 0 is dropped
    assert len(buf) == 3 and buf.items[0].tolist() == [2, 3]
    buf.add(torch.tensor([[8, 9]]))
    assert [r.tolist() for r in buf.items] == [[4, 5], [6, 7], [8, 9]]
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    assert torch.equal(buf.sample(2, rng_a), buf.sample(2, rng_b))
    assert len({tuple(r.tolist()) for r in buf.sample(3, np.random.default_rng(1))}) == 3  # no repeats
    copy = ReplayBuffer(0)
    copy.load_state_dict(buf.state_dict())
    assert copy.capacity == 3 and all(torch.equal(a, b) for a, b in zip(copy.items, buf.items))
    with pytest.raises(EdgestillError, match="empty"):
        ReplayBuffer(2).sample(1, rng_a)


def test_adaptive_fraction_rises_when_validation_stalls():
    sched = AdaptiveFraction(OnPolicyConfig(fraction=0.2, adaptive=True, fraction_step=0.25, patience=2))
    assert [sched.update(v) for v in (3.0, 2.5, 2.0)] == [0.2, 0.2, 0.2]  # improving: unchanged
    assert sched.update(2.1) == 0.2  # one stall: within patience
    assert sched.update(2.05) == pytest.approx(0.45)  # two: rises
    assert [sched.update(2.2) for _ in range(6)][-1] == 1.0  # capped at max_fraction
    fixed = AdaptiveFraction(OnPolicyConfig(fraction=0.2, adaptive=False))
    assert [fixed.update(v) for v in (2.0, 3.0, 4.0, 5.0)] == [0.2] * 4


def test_bad_configs():
    with pytest.raises(EdgestillError, match="fraction"):
        OnPolicyConfig(fraction=1.5)
    with pytest.raises(EdgestillError, match="prompt_tokens"):
        OnPolicyBatches(OnPolicyConfig(fraction=1.0, prompt_tokens=8)).draw(0, torch.zeros(1, 8, dtype=torch.long),
                                                                            CountingLM())
