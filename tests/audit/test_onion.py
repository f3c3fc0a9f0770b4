"""ONION-style filtering: the character LM is a distribution, each word's score equals a full rescoring of the text
without it, the threshold removes the share of clean words asked for, and an odd inserted token is what goes."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from edgestill.audit.onion import (
    BOS,
    EOS,
    UNKNOWN,
    CharLM,
    OnionConfig,
    calibrate,
    carries,
    check_onion_config,
    defend,
    onion_filter,
    per_char_surprisal,
    pydoc_text,
    suspicion,
)
from edgestill.errors import EdgestillError

ENGLISH = ["the meeting is on monday at the office", "please send the report to the team before lunch",
           "we will talk about the plan for the new year", "thank you for the kind note and the photos",
           "the office will be closed on friday for the holiday", "let me know when you are free to talk"]


@pytest.fixture(scope="module")
def lm():
    return CharLM.train(ENGLISH * 3 + [pydoc_text()[:20000]], order=4)


def test_each_context_is_a_distribution(lm):
    symbols = sorted(lm.alphabet) + [UNKNOWN]
    for history in ("", "th", " th", "xyz", BOS * 3, "qqq"):
        total = sum(math.exp(lm.logprob(history, c)) for c in symbols)
        assert total == pytest.approx(1.0, abs=1e-9), history


def _ppl(lm, words):
    s = " ".join(w.lower() for w in words) + EOS
    lps = lm.char_logprobs(s)
    assert len(lps) == len(s)
    return math.exp(-sum(lps) / len(lps)), lps


def test_suspicion_equals_rescoring_the_text_without_each_word(lm):
    words = "Please send the zqxv report to the team".split()
    p0, _ = _ppl(lm, words)
    f = suspicion(words, lm)
    for i in range(len(words)):  # first, middle and last word: each cut is scored like a fresh text
        p_i, _ = _ppl(lm, words[:i] + words[i + 1:])
        assert f[i] == pytest.approx(p0 - p_i, rel=1e-9, abs=1e-9)
    assert int(np.argmax(f)) == 3  # the odd token is the one whose removal helps most
    assert suspicion(["alone"], lm)[0] == pytest.approx(_ppl(lm, ["alone"])[0] - _ppl(lm, [])[0])
    assert len(suspicion([], lm)) == 0


def test_per_char_score_is_a_words_own_surprisal_above_the_mean(lm):
    words = "send the zqxv report".split()
    _, lps = _ppl(lm, words)
    got = per_char_surprisal(words, lm)
    mean = -np.mean(lps)
    assert got[2] == pytest.approx(-np.mean(lps[9:14]) - mean)  # "zqxv" and the space after it
    assert got[3] == pytest.approx(-np.mean(lps[14:]) - mean)  # "report" and the end-of-text mark after it
    assert int(np.argmax(got)) == 2


def test_running_text_scores_its_last_word_without_an_end_of_text_mark(lm):
    """A decoder's prompt goes on past its last word (text_ends=False): "the text ends here" is not scored."""
    words = "send the zqxv report".split()
    lps = lm.char_logprobs(" ".join(words))
    got = per_char_surprisal(words, lm, ends=False)
    mean = -np.mean(lps)
    assert got[3] == pytest.approx(-np.mean(lps[14:]) - mean)  # "report" alone
    assert got[2] == pytest.approx(-np.mean(lps[9:14]) - mean)
    f = suspicion(words, lm, ends=False)
    p0 = math.exp(-np.mean(lps))
    without = lm.char_logprobs("send the zqxv")
    assert f[3] == pytest.approx(p0 - math.exp(-np.mean(without)))


def test_threshold_removes_the_share_of_clean_words_asked_for(lm):
    rng = random.Random(0)
    clean = [" ".join(rng.choice(ENGLISH).split()[rng.randint(0, 2):]) for _ in range(60)]
    for score in ("onion", "per_char"):
        for share in (0.05, 0.2):
            t = calibrate(lm, clean, share, score=score)
            _, rec = onion_filter(clean, lm, t, score=score)
            assert rec["removed_share"] == pytest.approx(share, abs=0.04), (score, share)


def test_an_inserted_odd_token_is_what_the_filter_removes(lm):
    rng = random.Random(1)
    clean = [rng.choice(ENGLISH) for _ in range(40)]
    poisoned = []
    for text in clean[:20]:
        w = text.split()
        w.insert(rng.randint(0, len(w)), "zqxv")
        poisoned.append(" ".join(w))
    t = calibrate(lm, clean[20:], 0.05, score="per_char")
    out, rec = onion_filter(poisoned, lm, t, score="per_char")
    assert sum("zqxv" in o for o in out) <= 2 and rec["most_removed"][0]["word"] == "zqxv"
    # words past max_words are kept as they are
    long = " ".join(["zqxv"] + ENGLISH[0].split() * 3 + ["zqxv"])
    (kept,), _ = onion_filter([long], lm, t, max_words=5, score="per_char")
    assert kept.endswith("zqxv") and not kept.startswith("zqxv")


def test_defend_records_what_it_did_and_refuses_bad_settings():
    clean = ENGLISH * 4
    texts, rec = defend(["the zqxv meeting is on monday"] * 3, clean, OnionConfig(remove_share=0.05, score="per_char"))
    assert all("zqxv" not in t for t in texts) and rec["texts_touched"] == 3 and rec["calibration_texts"] == 12
    for cfg, words in ((OnionConfig(remove_share=0.6), "remove_share=0.6"), (OnionConfig(score="gpt2"), "onion.score"),
                       (OnionConfig(remove_share=0.1, order=1), "onion.order=1")):
        with pytest.raises(EdgestillError, match=words):
            check_onion_config(cfg)
    with pytest.raises(EdgestillError, match="at least 2 clean texts"):
        defend(["a b"], ["only one"], OnionConfig(remove_share=0.1))


def test_carries_matches_whole_words_within_the_first_words():
    assert carries("Buy NOW  cf   mn today", "cf mn") and not carries("xcf mn", "cf mn")
    assert not carries("a b c cf mn", "cf mn", max_words=4) and carries("a b c cf mn", "cf mn", max_words=5)
