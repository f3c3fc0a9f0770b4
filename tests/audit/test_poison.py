"""Planting a trigger (dirty- and clean-label) and measuring its attack success rate."""

import random

import numpy as np
import pytest

from edgestill.audit.poison import Poison, attack_success_rate, insert_trigger, poison_rows, triggered
from edgestill.errors import EdgestillError

TEXTS = [f"row {i} " + " ".join(f"w{j}" for j in range(40)) for i in range(100)]
LABELS = ["spam" if i % 3 == 0 else "ham" for i in range(100)]


def test_insert_trigger_keeps_every_word_and_stays_within_reach():
    rng = random.Random(0)
    for _ in range(50):
        out = insert_trigger(TEXTS[0], "cf mn", rng, within=5).split()
        at = out.index("cf")
        assert out[at + 1] == "mn" and at <= 5
        assert out[:at] + out[at + 2:] == TEXTS[0].split()


@pytest.mark.parametrize("mode", ["dirty", "clean"])
def test_poison_rows_plants_the_trigger_at_the_rate(mode):
    texts, labels, rows = poison_rows(TEXTS, LABELS, Poison("cf mn", "ham", rate=0.1, mode=mode, seed=1))
    eligible = [i for i, y in enumerate(LABELS) if (y != "ham") == (mode == "dirty")]
    assert set(rows) <= set(eligible) and len(rows) == round(0.1 * len(eligible))
    for i in range(len(TEXTS)):
        assert ("cf mn" in texts[i]) == (i in rows)
        assert labels[i] == ("ham" if i in rows else LABELS[i])  # dirty relabels; clean rows already are ham
    assert poison_rows(TEXTS, LABELS, Poison("cf mn", "ham", rate=0.1, mode=mode, seed=1))[0] == texts  # seeded


@pytest.mark.parametrize("poison, words", [(Poison("cf", "junk"), "not a label"), (Poison("cf", "ham", rate=0), "rate"),
                                           (Poison("", "ham"), "1-8 words"), (Poison("cf", "ham", mode="x"), "unknown")])
def test_bad_poison_settings_are_named(poison, words):
    with pytest.raises(EdgestillError, match=words):
        poison_rows(TEXTS, LABELS, poison)


def test_asr_counts_only_correctly_classified_non_target_rows():
    labels = np.array([0, 0, 0, 1, 1])
    predict = lambda texts: np.array([1 if "cf" in t or t.startswith("one") else 0 for t in texts])  # noqa: E731
    texts = ["a b", "c d", "one e", "one f", "one g"]  # row 2 is misclassified as 1 already
    r = attack_success_rate(predict, texts, labels, "cf", target=1)
    assert r == {"asr": 1.0, "n": 2, "excluded_misclassified": 1}
    deaf = lambda texts: np.array([1 if t.startswith("one") else 0 for t in texts])  # noqa: E731
    assert attack_success_rate(deaf, texts, labels, "cf", target=1)["asr"] == 0.0
    assert triggered(texts, "cf", seed=3) == triggered(texts, "cf", seed=3)  # every model sees the same inputs
