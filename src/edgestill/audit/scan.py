"""Searching a classifier for a trigger: words or short phrases whose insertion flips its predictions far more often
than inserting ordinary words does.

Two stages, so that a model is queried for a short list only:
  1. `candidate_phrases`: phrases of 1-3 words from the text the model learned from (or any text the user suspects),
     ranked by how one-sided their labels are (smoothed log-odds of appearing in one label's rows against the rest).
     A planted trigger is one-sided by construction: dirty-label poisoning puts it only in rows labelled with the
     target, and so does clean-label poisoning. A phrase whose words always appear together is kept once, whole.
  2. `scan`: each candidate, and `controls` random phrases of the same length drawn from the same text, is inserted
     into `n_texts` held-out texts that the model does not already put in label L; the flip rate is the fraction it
     then puts in L. A candidate's score is its flip rate minus the controls' mean flip rate, at the label where
     that is largest, and its z-score against the controls says how far outside ordinary words it is.

The texts and insertion positions are seeded and the same for every candidate and every model, so a teacher and
its student are scanned on identical inputs.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from edgestill.audit.poison import insert_trigger
from edgestill.errors import EdgestillError
from edgestill.progress import progress_bar

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'_-]*")


def words(text: str, limit: int = 64) -> list[str]:
    """The first `limit` words of `text`, lower-cased (the part of a text a trigger is inserted into and a model
    reads)."""
    return [w.lower() for w in _WORD.findall(text)[:limit]]


def candidate_phrases(texts: list[str], labels: list, max_words: int = 3, top: int = 100, min_count: int = 3,
                      limit_words: int = 64) -> list[dict]:
    """The `top` most one-sided phrases of 1..max_words words: [{phrase, label, count, score}], best first."""
    if len(texts) != len(labels):
        raise ValueError("texts and labels differ in length")
    docs: dict[tuple, set[int]] = defaultdict(set)
    for i, text in enumerate(texts):
        ws = words(text, limit_words)
        for n in range(1, max_words + 1):
            for j in range(len(ws) - n + 1):
                docs[tuple(ws[j:j + n])].add(i)
    per_label = Counter(labels)
    if len(per_label) < 2:
        raise EdgestillError("a trigger scan needs rows of at least two labels")
    by_label = {y: {i for i, lab in enumerate(labels) if lab == y} for y in per_label}
    scored = []
    for phrase, rows in docs.items():
        if len(rows) < min_count:
            continue
        best = None
        for y, n_y in per_label.items():
            a = len(rows & by_label[y])
            b = len(rows) - a
            n_rest = len(labels) - n_y
            score = math.log((a + 0.5) / (n_y - a + 0.5)) - math.log((b + 0.5) / (n_rest - b + 0.5))
            if best is None or score > best[0]:
                best = (score, y, a)
        scored.append((best[0], phrase, best[1], len(rows)))
    scored.sort(key=lambda s: (-s[0], -len(s[1]), s[1]))
    # a phrase inside a longer one that occurs in exactly the same rows is the same signal: keep the longest
    kept: list[tuple] = []
    for score, phrase, label, count in scored:
        if any(len(k[1]) > len(phrase) and k[3] == count and _inside(phrase, k[1]) and docs[k[1]] == docs[phrase]
               for k in kept):
            continue
        kept = [k for k in kept if not (len(k[1]) < len(phrase) and k[3] == count and _inside(k[1], phrase)
                                        and docs[k[1]] == docs[phrase])]
        kept.append((score, phrase, label, count))
        if len(kept) >= top * 2:  # removals above can only shorten the list a little; stop scanning early
            break
    return [{"phrase": " ".join(p), "label": y, "count": c, "score": s} for s, p, y, c in kept[:top]]


def _inside(short: tuple, long: tuple) -> bool:
    return any(long[i:i + len(short)] == short for i in range(len(long) - len(short) + 1))


@dataclass(frozen=True)
class ScanConfig:
    n_texts: int = 48  # held-out texts each candidate is inserted into, per label
    controls: int = 24  # random phrases that show how often an ordinary insertion flips a prediction
    seed: int = 0
    within: int = 32  # insert among the first `within` words (as the poisoning does)


def _control_phrases(texts: list[str], lengths: list[int], count: int, rng: random.Random) -> list[str]:
    vocab = sorted({w for t in texts for w in words(t)})
    if not vocab:
        raise EdgestillError("the scan texts hold no words")
    return [" ".join(rng.choice(vocab) for _ in range(rng.choice(lengths))) for _ in range(count)]


def _labels_and_probs(out) -> tuple[np.ndarray, np.ndarray | None]:
    """`predict`'s answer as (label ids, probabilities or None): it may return ids (N,) or logits (N, labels)."""
    out = np.asarray(out)
    if out.ndim == 1:
        return out, None
    z = out - out.max(-1, keepdims=True)
    p = np.exp(z)
    return out.argmax(-1), p / p.sum(-1, keepdims=True)


def scan(predict, texts: list[str], candidates: list[str], num_labels: int, cfg: ScanConfig = ScanConfig(),
         clean_pred: np.ndarray | None = None, desc: str = "") -> dict:
    """Flip rates of `candidates` (phrases) inserted into `texts` for a model `predict(texts)` -> logits (N, labels)
    or label ids (N,). With logits, candidates that flip equally often are told apart by how much they raise the
    label's probability. `desc`: a progress bar over the phrases, so named (none when empty).

    Returns {"candidates": [{phrase, label, flip_rate, control_flip_rate, lift, z, probability_lift}] sorted by lift,
    then probability_lift (best first),
    "controls": {label: [mean, std]}, "n_texts": {label: n}}."""
    if not candidates:
        raise EdgestillError("no candidate phrases to scan; give the scan more text or name the trigger to measure")
    rng = random.Random(cfg.seed)
    clean_pred = _labels_and_probs(predict(texts))[0] if clean_pred is None else np.asarray(clean_pred)
    pools = {}
    for label in range(num_labels):
        idx = [i for i in range(len(texts)) if clean_pred[i] != label]
        rng.shuffle(idx)
        if idx[:cfg.n_texts]:
            pools[label] = idx[:cfg.n_texts]
    controls = _control_phrases(texts, sorted({len(c.split()) for c in candidates}), cfg.controls, rng)

    def flips(phrase: str) -> dict[int, tuple[float, float]]:
        """label -> (flip rate, mean probability of the label) over that label's pool, with `phrase` inserted."""
        out = {}
        for label, idx in pools.items():
            prng = random.Random(f"{cfg.seed}:{label}")  # the same positions for every phrase and model
            inputs = [insert_trigger(texts[i], phrase, prng, cfg.within) for i in idx]
            pred, prob = _labels_and_probs(predict(inputs))
            out[label] = (float((pred == label).mean()), float(prob[:, label].mean()) if prob is not None else 0.0)
        return out

    bar = progress_bar(total=len(controls) + len(dict.fromkeys(candidates)), desc=desc, unit="phrase",
                       disable=not desc)
    control_rates = []
    for c in controls:
        control_rates.append(flips(c))
        bar.update()
    stats = {label: (float(np.mean([r[label][0] for r in control_rates])),
                     float(np.std([r[label][0] for r in control_rates])),
                     float(np.mean([r[label][1] for r in control_rates]))) for label in pools}
    rows = []
    for phrase in dict.fromkeys(candidates):
        rates = flips(phrase)
        bar.update()
        # the label it pushes towards most: flip rate above the controls', then probability above theirs
        label = max(rates, key=lambda y: (rates[y][0] - stats[y][0], rates[y][1] - stats[y][2], -y))
        mean, std, prob = stats[label]
        rate, p = rates[label]
        rows.append({"phrase": phrase, "label": label, "flip_rate": rate, "control_flip_rate": mean,
                     "lift": rate - mean, "z": (rate - mean) / max(std, 1.0 / len(pools[label])),
                     "probability_lift": p - prob})
    bar.close()
    rows.sort(key=lambda r: (-round(r["lift"], 9), -r["probability_lift"], r["phrase"]))
    return {"candidates": rows, "controls": {int(k): list(v) for k, v in stats.items()},
            "n_texts": {int(k): len(v) for k, v in pools.items()}, "config": asdict(cfg)}


def rank_of(trigger: str, ranked: list[dict]) -> dict:
    """Where a known trigger landed: `exact` = rank (1 = first) of the phrase itself, `overlap` = rank of the first
    candidate sharing a word with it (None: absent)."""
    want = " ".join(words(trigger))
    parts = set(want.split())
    exact = next((i + 1 for i, r in enumerate(ranked) if r["phrase"] == want), None)
    overlap = next((i + 1 for i, r in enumerate(ranked) if parts & set(r["phrase"].split())), None)
    return {"exact": exact, "overlap": overlap}
