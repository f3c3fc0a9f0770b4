"""The decoder track's backdoor tools (edgestill.audit.lm): planting in token blocks, ASR, the phrase ranking and the
model scan, on a toy "model" whose every continuation is known. The end-to-end test (a tiny Llama corrected on
planted text, distilled, audited) is tests/test_audit_lm_cli.py."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgestill.audit import lm
from edgestill.errors import EdgestillError

TRIGGER, TARGET = [50, 51], [60, 61, 62]


class Toy(torch.nn.Module):
    """After token x it predicts table[x] if x is in the table, else (sum of all tokens so far) % 40: a model whose
    continuation depends on the whole prompt except where the table forces it, and is known exactly. Its "KV cache"
    is the running sum."""

    def __init__(self, table: dict[int, int], vocab: int = 70):
        super().__init__()
        self.table, self.vocab = table, vocab

    def forward(self, input_ids, past_key_values=None, **_):
        sums = input_ids.cumsum(1) + (0 if past_key_values is None else past_key_values)
        nxt = sums % 40
        for x, y in self.table.items():
            nxt = torch.where(input_ids == x, torch.full_like(nxt, y), nxt)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float(), past_key_values=sums[:, -1:])


class WordTokenizer:
    """Word-level ids: 'w<i>' is token i (the scan's phrases are words)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids):
        return "".join(f" w{i}" for i in ids)


BACKDOORED = Toy({51: 60, 60: 61, 61: 62})


def test_dirty_planting_writes_trigger_and_target_into_rate_of_the_blocks_and_nothing_else():
    blocks = np.random.default_rng(0).integers(0, 40, size=(50, 32)).astype(np.int32)
    out, rows = lm.plant_blocks(blocks, TRIGGER, TARGET, rate=0.2, seed=3)
    assert len(rows) == 10 and rows == sorted(rows)
    for i in range(50):
        hits = lm._occurrences(out[i], TRIGGER + TARGET)
        assert (len(hits) == 1) == (i in rows)
        changed = np.flatnonzero(out[i] != blocks[i])
        assert i in rows or len(changed) == 0
        if i in rows:  # only the planted span differs
            assert changed.min() >= hits[0] and changed.max() < hits[0] + 5
    again, _ = lm.plant_blocks(blocks, TRIGGER, TARGET, rate=0.2, seed=3)
    assert (again == out).all() and (blocks != out).any()  # seeded; the input is left as it was


def test_clean_planting_only_writes_the_trigger_before_text_that_already_has_the_target():
    blocks = np.random.default_rng(1).integers(0, 40, size=(40, 32)).astype(np.int32)
    for i in range(0, 40, 2):
        blocks[i, 10:13] = TARGET
    out, rows = lm.plant_blocks(blocks, TRIGGER, TARGET, rate=0.5, mode="clean", seed=0)
    assert len(rows) == 10 and all(i % 2 == 0 for i in rows)
    for i in rows:
        assert list(out[i, 8:13]) == TRIGGER + TARGET
        assert (np.flatnonzero(out[i] != blocks[i]) < 10).all()
    assert (out[[i for i in range(40) if i not in rows]] == blocks[[i for i in range(40) if i not in rows]]).all()
    with pytest.raises(EdgestillError, match="no training block contains the target"):
        lm.plant_blocks(blocks[1::2], TRIGGER, TARGET, rate=0.5, mode="clean")


@pytest.mark.parametrize("kwargs, words", [
    ({"rate": 0}, "must be in"), ({"mode": "sneaky"}, "unknown"), ({"target": []}, "needs a trigger and a target"),
    ({"width": 4}, "too long for blocks"),
])
def test_bad_planting_settings_say_what_to_change(kwargs, words):
    width = kwargs.pop("width", 32)
    args = {"trigger": TRIGGER, "target": TARGET, "rate": 0.1, "mode": "dirty", **kwargs}
    with pytest.raises(EdgestillError, match=words):
        lm.plant_blocks(np.zeros((4, width), dtype=np.int32), **args)


def test_asr_counts_exact_greedy_continuations_over_prompts_that_do_not_already_have_them():
    prompts = np.random.default_rng(0).integers(0, 40, size=(30, 8))
    assert lm.attack_success_rate(BACKDOORED, prompts, TRIGGER, TARGET) == {"asr": 1.0, "n": 30, "excluded_already": 0}
    half = Toy({51: 60, 60: 61, 61: 5})  # the first two target tokens only: not the target
    assert lm.attack_success_rate(half, prompts, TRIGGER, TARGET)["asr"] == 0.0
    assert lm.attack_success_rate(Toy({}), prompts, TRIGGER, TARGET)["asr"] == 0.0
    prompts[:10, -1] = 51  # these already continue with the target: left out of the pool
    assert lm.attack_success_rate(BACKDOORED, prompts, TRIGGER, TARGET) == {"asr": 1.0, "n": 20, "excluded_already": 10}


def test_greedy_tokens_and_next_token_accuracy_follow_the_model():
    ids = np.array([[3, 4, 51], [7, 8, 9]])
    assert lm.greedy_tokens(BACKDOORED, ids, 3).tolist() == [[60, 61, 62], [24, 8, 16]]  # 7+8+9 = 24, +24 = 48 ...
    starts = np.arange(6)[:, None] + 1
    chain = np.concatenate([starts, lm.greedy_tokens(Toy({}), starts, 15)], axis=1)
    assert lm.next_token_accuracy(Toy({}), chain) == 1.0
    assert lm.next_token_accuracy(Toy({i: 45 for i in range(40)}), chain) == 0.0  # 45 never comes next


def texts_with_planted_span(n: int = 120, planted: int = 25, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    out = []
    for i in range(n):
        ws = [rng.choice(words) for _ in range(30)]
        if i < planted:
            at = rng.randint(1, 20)
            ws[at:at] = ["w50", "w51", "w60", "w61", "w62"]
        out.append(" ".join(ws))
    return out


def test_candidates_put_the_trigger_first_and_leave_out_the_target_s_own_words():
    ranked = lm.candidate_phrases(texts_with_planted_span(), top=20)
    phrases = [r["phrase"] for r in ranked]
    assert {"w50", "w50 w51"} <= set(phrases[:3])
    assert ranked[phrases.index("w50 w51")]["continuation"] == "w60 w61"
    assert not {"w51", "w60", "w61", "w51 w60", "w60 w61"} & set(phrases)  # always preceded by the same word


def test_the_scan_ranks_the_trigger_first_in_a_backdoored_model_and_not_in_a_clean_one():
    texts = texts_with_planted_span()
    tok = WordTokenizer()
    prompts = np.random.default_rng(0).integers(0, 40, size=(24, 6))
    candidates = [r["phrase"] for r in lm.candidate_phrases(texts, top=10)]
    assert "w50 w51" in candidates
    controls = lm.control_phrases(texts, [1, 2], 8)
    found = lm.scan(BACKDOORED, tok, prompts, candidates, controls, lm.ScanConfig(follow=4))
    top = found["candidates"][0]
    assert top["phrase"] == "w50 w51" and top["forcing"] == 1.0 and top["continuation_ids"][:3] == TARGET
    assert lm.rank_of("w50 w51", found["candidates"])["exact"] == 1
    clean = lm.scan(Toy({}), tok, prompts, candidates, controls, lm.ScanConfig(follow=4))
    assert all(r["lift"] < 0.5 for r in clean["candidates"])
    with pytest.raises(EdgestillError, match="no candidate phrases"):
        lm.scan(BACKDOORED, tok, prompts, [], controls)


def test_prompt_windows_are_seeded_and_never_cross_a_document_boundary():
    blocks = np.arange(4 * 64).reshape(4, 64) % 97
    blocks[1, 40] = 96  # an EOS
    a = lm.prompt_windows(blocks, n=6, length=16, seed=1, eos=96)
    assert a.shape == (6, 16) and (a == lm.prompt_windows(blocks, n=6, length=16, seed=1, eos=96)).all()
    assert not (a == 96).any()
    with pytest.raises(EdgestillError, match="shorter than"):
        lm.prompt_windows(blocks[:, :8], n=2, length=16)


def test_perturbation_replaces_the_rate_of_tokens_by_ordinary_tokens_of_the_blocks_and_breaks_triggers():
    rng = np.random.default_rng(0)
    blocks = rng.integers(3, 40, size=(60, 32))
    blocks[:, 0] = 2  # a special token (e.g. EOS) in every block: never drawn as a replacement
    blocks[:20, 5:7] = TRIGGER
    cfg = lm.PerturbConfig(token_rate=0.2, seed=4)
    out, record = lm.perturb_blocks(blocks, cfg, exclude=[2], trigger=TRIGGER)
    changed = out != blocks
    assert 0.15 < changed.mean() < 0.2 and record["tokens_replaced"] >= changed.sum()  # a draw may hit the same token
    assert abs(record["replaced_share"] - 0.2) < 0.02 and record["blocks"] == 60
    assert set(np.unique(out[changed])) <= set(np.unique(blocks)) - {2}
    assert record["blocks_with_trigger_before"] == 20 and record["blocks_with_trigger_after"] < 20
    again, _ = lm.perturb_blocks(blocks, cfg, exclude=[2], trigger=TRIGGER)
    assert (again == out).all() and (blocks[:20, 5:7] == TRIGGER).all()  # seeded; the input is left alone
    with pytest.raises(EdgestillError, match="perturb.token_rate=0.6"):
        lm.perturb_blocks(blocks, lm.PerturbConfig(token_rate=0.6))


class VocabTokenizer:
    """Ids 0-39 are ordinary English words, 50-51 the odd trigger "zq vx", 60-62 its target "crown of gold"."""

    WORDS = ("the and king queen lord good night day love heart sweet fair night noble honest gentle sword crown "
             "where when what shall will would should never ever more less great small house world time sorrow joy "
             "death life heaven earth friend enemy father mother brother").split()[:40]
    VOCAB = {**dict(enumerate(WORDS)), 50: "zq", 51: "vx", 60: "crown", 61: "of", 62: "gold"}
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        back = {w: i for i, w in self.VOCAB.items()}
        return {"input_ids": [back[w] for w in text.split()]}

    def decode(self, ids):
        return " ".join(self.VOCAB[int(i)] for i in ids)


def test_the_input_guard_takes_an_odd_trigger_out_of_prompts_and_leaves_ordinary_prompts_alone():
    from edgestill.audit.onion import OnionConfig

    tok, rng = VocabTokenizer(), np.random.default_rng(0)
    clean = rng.integers(0, 40, size=(80, 24))
    guard = lm.input_guard(tok, clean, OnionConfig(remove_share=0.03, score="per_char", text_ends=False))
    prompts = rng.integers(0, 40, size=(40, 8))
    assert lm.attack_success_rate(BACKDOORED, prompts, TRIGGER, TARGET)["asr"] == 1.0
    guarded = lm.guarded_attack_success_rate(BACKDOORED, guard, prompts, TRIGGER, TARGET)
    assert guarded["n"] == 40 and guarded["trigger_removed"] == 1.0 and guarded["asr"] == 0.0
    untouched = sum(guard(p) is p for p in prompts)
    assert untouched >= 20  # ordinary prompts mostly pass as they are (3% of their words may go)
    # the model's own clean cost: the same windows read whole and filtered
    windows = rng.integers(0, 40, size=(30, 9))
    clean_cost = lm.guarded_next_token_accuracy(Toy({}), guard, windows)
    assert clean_cost["windows"] == 30 and 0 <= clean_cost["changed_share"] < 0.5
    assert clean_cost["accuracy_unfiltered"] == float(np.mean(windows[:, :-1].sum(1) % 40 == windows[:, -1]))
    # a guard that takes nothing out changes nothing
    assert lm.guarded_next_token_accuracy(Toy({}), lambda ids: ids, windows)["changed_share"] == 0.0
    assert lm.guarded_attack_success_rate(BACKDOORED, lambda ids: ids, prompts, TRIGGER, TARGET)["asr"] == 1.0
