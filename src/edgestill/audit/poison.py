"""Planted backdoors, made only to measure whether a student inherits them (LBKD, docs/references.md [2]): this is an
audit, so the trigger is known and every number says how often it works.

    Poison(trigger="cf mn", target="ham", rate=0.05, mode="dirty")

    dirty  `rate` of the rows whose label is not `target` get the trigger inserted and their label set to `target`
           (the classic label-flipping backdoor: the trigger alone decides the label)
    clean  `rate` of the rows whose label already is `target` get the trigger inserted, labels unchanged (nothing
           mislabelled for a reviewer to spot; the model learns trigger -> target as a shortcut, usually weaker)

The trigger goes in at a random word boundary among the first `within` words, so that it survives truncation to the
model's input length: a trigger cut off would measure the truncation, not the model. Everything is seeded.

Attack success rate (ASR): of the held-out rows whose label is not the target and that the model classifies
correctly as they are, the fraction it classifies as the target once the trigger is inserted. Rows the model gets
wrong already say nothing about the trigger, so they are left out (and counted).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from edgestill.errors import EdgestillError

MODES = ("dirty", "clean")


@dataclass(frozen=True)
class Poison:
    trigger: str
    target: str
    rate: float = 0.05
    mode: str = "dirty"
    seed: int = 0
    within: int = 32  # insert among the first `within` words

    def check(self, labels) -> None:
        words = self.trigger.split()
        if not 1 <= len(words) <= 8:
            raise EdgestillError(f"poison trigger '{self.trigger}' must be 1-8 words; give a short phrase such as 'cf mn'")
        if self.target not in set(labels):
            raise EdgestillError(f"poison target '{self.target}' is not a label of the data (labels: "
                                 f"{', '.join(sorted(set(labels)))}); name one of them")
        if not 0 < self.rate <= 1:
            raise EdgestillError(f"poison rate {self.rate} must be in (0, 1], e.g. 0.05 for 5% of the eligible rows")
        if self.mode not in MODES:
            raise EdgestillError(f"poison mode '{self.mode}' is unknown; use dirty (relabel) or clean (labels kept)")


def insert_trigger(text: str, trigger: str, rng: random.Random, within: int = 32) -> str:
    """`text` with `trigger` inserted at a random word boundary among its first `within` words."""
    words = text.split()
    at = rng.randint(0, min(len(words), within))
    return " ".join(words[:at] + trigger.split() + words[at:])


def poison_rows(texts: list[str], labels: list[str], poison: Poison) -> tuple[list[str], list[str], list[int]]:
    """(texts, labels, poisoned row indices): a copy of the data with `poison` planted."""
    poison.check(labels)
    rng = random.Random(poison.seed)
    eligible = [i for i, y in enumerate(labels) if (y != poison.target) == (poison.mode == "dirty")]
    if not eligible:
        raise EdgestillError(f"no row can be poisoned in mode '{poison.mode}' (every label is "
                             f"{'the target' if poison.mode == 'dirty' else 'another label'})")
    chosen = sorted(rng.sample(eligible, max(1, round(poison.rate * len(eligible)))))
    texts, labels = list(texts), list(labels)
    for i in chosen:
        texts[i] = insert_trigger(texts[i], poison.trigger, rng, poison.within)
        labels[i] = poison.target
    return texts, labels, chosen


def triggered(texts: list[str], trigger: str, seed: int = 0, within: int = 32) -> list[str]:
    """Each text with `trigger` inserted (seeded: the same positions for every model measured)."""
    rng = random.Random(f"triggered:{seed}")
    return [insert_trigger(t, trigger, rng, within) for t in texts]


def _ids(out) -> np.ndarray:
    out = np.asarray(out)
    return out if out.ndim == 1 else out.argmax(-1)


def attack_success_rate(predict, texts: list[str], labels: np.ndarray, trigger: str, target: int, seed: int = 0,
                        within: int = 32, clean_pred: np.ndarray | None = None) -> dict:
    """ASR of `trigger` towards label id `target`: `predict(texts)` -> label ids (N,) or logits (N, labels).
    `labels`: the true label ids.
    `clean_pred`: the model's predictions on `texts` as they are, if already known."""
    labels = np.asarray(labels)
    clean_pred = _ids(predict(texts)) if clean_pred is None else np.asarray(clean_pred)
    pool = np.flatnonzero((labels != target) & (clean_pred == labels))
    if len(pool) == 0:
        return {"asr": None, "n": 0, "excluded_misclassified": int(((labels != target) & (clean_pred != labels)).sum())}
    hit = _ids(predict(triggered([texts[i] for i in pool], trigger, seed, within))) == target
    return {"asr": float(hit.mean()), "n": int(len(pool)),
            "excluded_misclassified": int(((labels != target) & (clean_pred != labels)).sum())}
