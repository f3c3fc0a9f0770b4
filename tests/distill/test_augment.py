from edgestill.distill.augment import AugmentConfig, augment_texts

TEXTS = ["the film is a quiet triumph", "a dull and lifeless sequel", "funny"]


def test_copies_are_ordered_deterministic_and_made_of_the_texts_words():
    out = augment_texts(TEXTS, 4, "[MASK]", seed=3)
    assert len(out) == 4 * len(TEXTS)
    assert out == augment_texts(TEXTS, 4, "[MASK]", seed=3)
    assert out != augment_texts(TEXTS, 4, "[MASK]", seed=4)
    words = {w for t in TEXTS for w in t.split()} | {"[MASK]"}
    assert all(set(t.split()) <= words for t in out)
    assert all(len(t.split()) == 1 for t in out[8:])  # "funny": one word stays one word (masked, swapped or kept)


def test_each_perturbation_alone():
    masked = augment_texts(TEXTS[:1], 50, "[MASK]", cfg=AugmentConfig(p_mask=1.0, p_swap=0.0, p_ngram=0.0))
    assert set(masked) == {" ".join(["[MASK]"] * 6)}
    kept = augment_texts(TEXTS[:1], 20, "[MASK]", cfg=AugmentConfig(p_mask=0.0, p_swap=0.0, p_ngram=0.0))
    assert set(kept) == {TEXTS[0]}
    grams = augment_texts(TEXTS[:1], 200, "[MASK]", cfg=AugmentConfig(p_mask=0.0, p_swap=0.0, p_ngram=1.0, max_ngram=3))
    assert all(1 <= len(g.split()) <= 3 and g in TEXTS[0] for g in grams)
    assert {len(g.split()) for g in grams} == {1, 2, 3}
    swapped = augment_texts(TEXTS[:1], 50, "[MASK]", cfg=AugmentConfig(p_mask=0.0, p_swap=1.0, p_ngram=0.0))
    assert any(s != TEXTS[0] for s in swapped) and all(len(s.split()) == 6 for s in swapped)
