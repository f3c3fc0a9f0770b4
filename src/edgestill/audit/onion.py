"""ONION-style filtering of distillation inputs (ONION, docs/references.md [onion]): drop the words whose removal makes
a text much more fluent, before the teacher labels it and the student learns from it.

ONION scores each word w_i of a text x by its suspicion f_i = p0 - p_i, where p0 is the perplexity of x under a
language model and p_i the perplexity of x without w_i; words with f_i above a threshold are removed. A planted
trigger ("cf mn") is such an outlier: ordinary text without it reads better.

ONION uses GPT-2. No GPT-2-class model installs here, and a 135M decoder scoring every word of a few thousand
emails would take hours on 2 cores. So the language model here is a character n-gram model (interpolated
Witten-Bell), trained on English prose that ships with Python (`pydoc_data.topics`, 465k characters) and on the
defender's clean texts. It knows spelling and word shapes, not grammar: it flags rare letter sequences (codes,
random tokens, most triggers) and cannot flag a trigger made of ordinary words. Removing a word only changes the
probabilities of its own characters and of the `order - 1` characters after it, so every word's p_i costs a few
look-ups.

The threshold is calibrated, not fixed: a character model's p_i falls whenever a word harder than the text's
average is removed, so ONION's default threshold of 0 would remove about half of every text. `calibrate` sets it
to the `1 - remove_share` quantile of the suspicion of clean words, so the filter removes `remove_share` of the
words of clean text (the rest of the clean texts, held out from the language model) and more of whatever reads
unlike them.

    lm = CharLM.train([pydoc_text(), *clean_texts[::2]])
    t = calibrate(lm, clean_texts[1::2], remove_share=0.01)
    texts, record = onion_filter(texts, lm, t)
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from edgestill.errors import EdgestillError

BOS, EOS, UNKNOWN = "\x02", "\x03", "\x00"
SCORES = ("onion", "per_char")


@dataclass
class OnionConfig:
    """ONION-style filtering of the transfer texts (docs/audit.md). remove_share > 0 turns it on."""

    remove_share: float = 0.0  # the share of clean words the calibrated threshold removes; 0 = off
    score: str = "onion"  # onion: ONION's perplexity drop; per_char: the word's own surprisal per character (below)
    order: int = 5  # of the character n-gram model
    max_words: int = 256  # only a text's first words are filtered (the models read at most max_len tokens)
    # True: each text is whole, and its last word is scored with the end-of-text mark after it. False: running text
    # that goes on past its last word (a decoder's prompt), scored without one: "the text ends here" is surprising
    # after most words, and would flag the last word of nearly every prompt
    text_ends: bool = True


def check_onion_config(cfg: OnionConfig) -> None:
    """Refuse settings that cannot work, before any run folder is made."""
    if not 0 <= cfg.remove_share < 0.5:
        raise EdgestillError(f"onion.remove_share={cfg.remove_share} must be in [0, 0.5) (the share of clean words "
                             "the filter may remove; 0 = off, 0.01 is a sensible start)")
    if cfg.score not in SCORES:
        raise EdgestillError(f"onion.score={cfg.score!r} is not one of {', '.join(SCORES)}")
    if not 2 <= cfg.order <= 8 or cfg.max_words < 1:
        raise EdgestillError(f"onion.order={cfg.order} must be in 2..8 and onion.max_words={cfg.max_words} >= 1")


def pydoc_text() -> str:
    """English prose that ships with Python itself: the help topics of pydoc (465k characters)."""
    from pydoc_data.topics import topics

    return "\n".join(topics.values())


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


class CharLM:
    """Character n-gram language model, interpolated Witten-Bell smoothing down to a uniform distribution."""

    def __init__(self, order: int, counts: list[dict], alphabet: set[str]):
        self.order, self.counts, self.alphabet = order, counts, alphabet
        self.uniform = 1.0 / (len(alphabet) + 1)  # + the unknown character
        self._cache: dict[tuple[str, str], float] = {}

    @classmethod
    def train(cls, texts: list[str], order: int = 5) -> CharLM:
        """Counts of every context of 0..order-1 characters and what follows it, over `texts` (lower-cased,
        whitespace collapsed, each text framed by begin and end marks)."""
        if order < 1:
            raise EdgestillError(f"order={order} must be >= 1")
        counts: list[dict] = [defaultdict(lambda: defaultdict(int)) for _ in range(order)]
        alphabet: set[str] = set()
        for text in texts:
            s = BOS * (order - 1) + _normalise(text) + EOS
            alphabet.update(s[order - 1:])
            for j in range(order - 1, len(s)):
                for k in range(order):
                    counts[k][s[j - k:j]][s[j]] += 1
        if not alphabet - {EOS}:
            raise EdgestillError("the ONION language model got no text to learn from (give it non-empty texts)")
        frozen = [{h: (sum(nxt.values()), len(nxt), dict(nxt)) for h, nxt in level.items()} for level in counts]
        return cls(order, frozen, alphabet)

    def logprob(self, history: str, char: str) -> float:
        """log p(char | the last order-1 characters of history)."""
        history = history[len(history) - (self.order - 1):] if self.order > 1 else ""
        key = (history, char)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        c = char if char in self.alphabet else UNKNOWN
        p = self.uniform
        for k in range(self.order):  # from the empty context up: p_k = (n(h, c) + T(h) p_{k-1}) / (n(h) + T(h))
            if k > len(history):
                break
            stats = self.counts[k].get(history[len(history) - k:] if k else "")
            if stats is None:
                break  # a longer context unseen: the shorter estimate stands
            total, types, nxt = stats
            p = (nxt.get(c, 0) + types * p) / (total + types)
        lp = math.log(p)
        if len(self._cache) < 500_000:
            self._cache[key] = lp
        return lp

    def char_logprobs(self, s: str) -> list[float]:
        """log p of each character of s (already normalised, framed by EOS at the end), after order-1 BOS marks."""
        padded = BOS * (self.order - 1) + s
        return [self.logprob(padded[j - (self.order - 1):j], padded[j]) for j in range(self.order - 1, len(padded))]


def suspicion(words: list[str], lm: CharLM, ends: bool = True) -> np.ndarray:
    """ONION's f_i = p0 - p_i for each word: the text's perplexity (per character) minus its perplexity without word i.
    ends: the text ends after its last word (scored with the end-of-text mark), rather than going on."""
    if not words:
        return np.zeros(0)
    s = " ".join(w.lower() for w in words) + (EOS if ends else "")
    lps = lm.char_logprobs(s)
    n, total = len(lps), sum(lps)
    p0 = math.exp(-total / n)
    padded = BOS * (lm.order - 1) + s
    off = lm.order - 1
    out = np.empty(len(words))
    start = 0
    for i, w in enumerate(words):
        end = start + len(w)
        # drop the word and one space next to it (the one after it; the one before it for the last word)
        cut_a, cut_b = (start, end + 1) if i < len(words) - 1 else (max(0, start - 1), end)
        if len(words) == 1:
            cut_a, cut_b = 0, end
        removed = cut_b - cut_a
        tail = min(n, cut_b + lm.order - 1)  # characters after the cut whose context changes
        without = padded[:off + cut_a] + padded[off + cut_b:]
        new = sum(lm.logprob(without[j - off:j], without[j]) for j in range(off + cut_a, off + cut_a + tail - cut_b))
        ll = total - sum(lps[cut_a:tail]) + new
        out[i] = p0 - math.exp(-ll / max(1, n - removed))
        start = end + 1
    return out


def per_char_surprisal(words: list[str], lm: CharLM, ends: bool = True) -> np.ndarray:
    """A length-normalised variant: each word's own surprisal per character (its characters and the space after it),
    minus the text's mean per character. ONION's f_i grows with a word's length times its excess surprisal, so a long
    junk token (a hash, a base64 line) outranks a two-letter trigger; this score ranks them by how odd they read.
    ends: as in `suspicion` (the last word's "space after it" is then the end-of-text mark)."""
    if not words:
        return np.zeros(0)
    s = " ".join(w.lower() for w in words) + (EOS if ends else "")
    lps = np.asarray(lm.char_logprobs(s))
    mean = -lps.mean()
    out, start = np.empty(len(words)), 0
    for i, w in enumerate(words):
        end = start + len(w)
        out[i] = -lps[start:end + 1].mean() - mean
        start = end + 1
    return out


def word_scores(words: list[str], lm: CharLM, score: str = "onion", ends: bool = True) -> np.ndarray:
    return suspicion(words, lm, ends) if score == "onion" else per_char_surprisal(words, lm, ends)


def calibrate(lm: CharLM, clean_texts: list[str], remove_share: float, max_words: int = 256,
              score: str = "onion", ends: bool = True) -> float:
    """The threshold that removes `remove_share` of the words of `clean_texts` (their score's upper quantile)."""
    scores = [word_scores(t.split()[:max_words], lm, score, ends) for t in clean_texts]
    flat = np.concatenate([s for s in scores if len(s)]) if any(len(s) for s in scores) else np.zeros(0)
    if not len(flat):
        raise EdgestillError("ONION needs clean texts with words to set its threshold (the validation split is empty)")
    return float(np.quantile(flat, 1.0 - remove_share))


def onion_filter(texts: list[str], lm: CharLM, threshold: float, max_words: int = 256,
                 score: str = "onion") -> tuple[list[str], dict]:
    """Each text without its words scored > threshold (among its first max_words; the rest is kept as it is).
    Returns the filtered texts and a record: words seen and removed, texts touched, the most removed words."""
    out, removed_counts = [], defaultdict(int)
    seen = removed = touched = 0
    for text in texts:
        words = text.split()
        head, rest = words[:max_words], words[max_words:]
        keep = []
        for w, fi in zip(head, word_scores(head, lm, score)):
            if fi > threshold:
                removed_counts[w.lower()] += 1
            else:
                keep.append(w)
        seen += len(head)
        removed += len(head) - len(keep)
        touched += len(keep) < len(head)
        out.append(" ".join(keep + rest) if len(keep) < len(head) else text)
    top = sorted(removed_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    return out, {"threshold": threshold, "words_seen": seen, "words_removed": removed,
                 "removed_share": removed / seen if seen else 0.0, "texts_touched": touched, "texts": len(texts),
                 "most_removed": [{"word": w, "count": c} for w, c in top]}


def carries(text: str, phrase: str, max_words: int = 256) -> bool:
    """Whether `phrase` stands as whole words among the text's first max_words (case and spacing ignored)."""
    return f" {' '.join(phrase.lower().split())} " in f" {' '.join(text.lower().split()[:max_words])} "


def fit(clean_texts: list[str], cfg: OnionConfig) -> tuple[CharLM, float]:
    """A character LM on Python's prose + half the clean texts, the threshold set on the other half."""
    check_onion_config(cfg)
    if len(clean_texts) < 2:
        raise EdgestillError(f"ONION needs at least 2 clean texts (the validation split has {len(clean_texts)}): "
                             "give a larger data.val_fraction, or turn it off with onion.remove_share=0")
    lm = CharLM.train([pydoc_text(), *clean_texts[::2]], order=cfg.order)
    return lm, calibrate(lm, clean_texts[1::2], cfg.remove_share, cfg.max_words, cfg.score, cfg.text_ends)


def defend_inputs(clean_texts: list[str], cfg: OnionConfig):
    """The filter as a function texts -> texts, for inputs at inference (fitted once on the clean texts)."""
    lm, threshold = fit(clean_texts, cfg)
    return lambda texts: onion_filter(texts, lm, threshold, cfg.max_words, cfg.score)[0]


def defend(train_texts: list[str], clean_texts: list[str], cfg: OnionConfig) -> tuple[list[str], dict]:
    """The whole defence: a character LM on Python's prose + half the clean texts, the threshold set on the other
    half, then the training texts filtered. Returns the filtered texts and the record."""
    lm, threshold = fit(clean_texts, cfg)
    texts, record = onion_filter(train_texts, lm, threshold, cfg.max_words, cfg.score)
    return texts, {**record, "remove_share_target": cfg.remove_share, "score": cfg.score, "order": cfg.order,
                   "lm_texts": f"pydoc_data.topics + {len(clean_texts[::2])} clean validation texts",
                   "calibration_texts": len(clean_texts[1::2])}
