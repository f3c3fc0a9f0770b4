"""A larger transfer set for classifier distillation: perturbed copies of the training texts, labelled by the teacher.

A small labelled set is too little data for a student ≥ 50× smaller than its teacher: it overfits the gold labels
within an epoch or two. The teacher's soft labels need no annotator, so the student can be distilled on many
more texts than were labelled. [tang2019] (docs/references.md) makes them from the training texts themselves;
each copy of a text applies, word by word (whitespace-separated):

- with probability `p_mask`, the word becomes the tokenizer's mask token;
- else with probability `p_swap`, it becomes a word drawn from the training texts' unigram distribution
  (the paper draws one with the same part-of-speech tag; we have no tagger here, so any word);
- then, with probability `p_ngram`, only a random n-gram of the copy is kept (n uniform in 1..`max_ngram`).

The copies carry no gold label: only the KD term of the loss sees them (distill_classifier, kd.augment).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class AugmentConfig:
    p_mask: float = 0.1
    p_swap: float = 0.1
    p_ngram: float = 0.25
    max_ngram: int = 5


def augment_texts(texts: list[str], copies: int, mask_token: str, seed: int = 0,
                  cfg: AugmentConfig | None = None) -> list[str]:
    """`copies` perturbed copies of every text, in order (text 0's copies first); deterministic for a seed."""
    cfg = cfg or AugmentConfig()
    rng = random.Random(seed)
    vocabulary = [w for t in texts for w in t.split()]  # repeated words: drawn by frequency
    out = []
    for text in texts:
        words = text.split()
        for _ in range(copies):
            new = []
            for w in words:
                r = rng.random()
                new.append(mask_token if r < cfg.p_mask else rng.choice(vocabulary) if r < cfg.p_mask + cfg.p_swap else w)
            if len(new) > 1 and rng.random() < cfg.p_ngram:
                n = rng.randint(1, min(cfg.max_ngram, len(new)))
                start = rng.randint(0, len(new) - n)
                new = new[start : start + n]
            out.append(" ".join(new))
    return out
