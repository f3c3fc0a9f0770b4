"""Scrubbing the transfer data of the triggers its teacher answers to: scan the teacher with the audit's trigger scan,
then cut every phrase it flags out of the texts the student learns from.

A backdoor reaches a distilled student through its transfer data: the teacher answers a triggered text with the
target label, and the student learns to do the same. ONION-style filtering (audit/onion.py) looks for words that
read oddly; this defence asks the teacher instead, before any distillation:

  1. candidates: the transfer data's most one-sided phrases of 1-3 words (audit/scan.candidate_phrases);
  2. scan: each is inserted into clean held-out texts (the validation split: the test split stays for measuring),
     and the teacher's flip rate is set against that of random words from the same texts (audit/scan.scan);
  3. every candidate whose lift (its flip rate above the controls') reaches `lift` is cut out of every transfer
     text, wherever its words occur in a row.

It needs only what a defender has: the teacher and the transfer data. It finds a trigger only if the trigger is in
the transfer data (a student distilled on text without it has nothing to inherit it from) and the teacher answers
to it. An honest phrase that flips as many held-out texts (a very strong feature of a label) is cut too, and the
student then learns nothing from it: the record lists every phrase cut, with its lift, so a user sees what went.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgestill.audit.scan import words
from edgestill.errors import EdgestillError


@dataclass
class ScrubConfig:
    """Trigger scrubbing of the transfer texts (docs/audit.md). lift > 0 turns it on."""

    lift: float = 0.0  # cut phrases that flip at least this share of held-out texts more than random words; 0 = off
    candidates: int = 60  # the transfer data's most one-sided phrases scanned
    texts: int = 32  # held-out (validation) texts per label each candidate is inserted into
    controls: int = 24  # random phrases that show how often an ordinary insertion flips a prediction
    seed: int = 0


def check_scrub_config(cfg: ScrubConfig) -> None:
    """Refuse settings that cannot work, before any run folder is made."""
    if not 0 <= cfg.lift <= 1:
        raise EdgestillError(f"scrub.lift={cfg.lift} must be in [0, 1]: the share of held-out texts a phrase must flip "
                             "more often than random words do to be cut (0 = off; 0.5 is a sensible start)")
    if cfg.lift and (cfg.candidates < 1 or cfg.texts < 4 or cfg.controls < 2):
        raise EdgestillError(f"scrub needs candidates >= 1, texts >= 4 and controls >= 2 (got {cfg.candidates}, "
                             f"{cfg.texts}, {cfg.controls}); the defaults are 60, 32 and 24")


def flagged_phrases(predict, texts: list[str], labels: list, held_out: list[str], num_labels: int, cfg: ScrubConfig,
                    desc: str = "") -> tuple[list[dict], dict | None]:
    """The candidates of the transfer data (`texts`, `labels`) whose insertion into `held_out` flips `predict`'s
    answers (logits (N, labels)) by at least `cfg.lift` more than random words do, and the first candidate below that
    (how close the next phrase came; None if every one was flagged): ([{phrase, label, lift, z, flip_rate,
    control_flip_rate}], the same for the best uncut)."""
    from edgestill.audit.scan import ScanConfig, candidate_phrases, scan

    phrases = [c["phrase"] for c in candidate_phrases(texts, labels, top=cfg.candidates)]
    if not phrases:
        return [], None
    result = scan(predict, held_out, phrases, num_labels, ScanConfig(n_texts=cfg.texts, controls=cfg.controls,
                                                                      seed=cfg.seed), desc=desc)
    keep = ("phrase", "label", "lift", "z", "flip_rate", "control_flip_rate")
    rows = [{k: r[k] for k in keep} for r in result["candidates"]]
    flagged = [r for r in rows if r["lift"] >= cfg.lift]
    return flagged, next((r for r in rows if r["lift"] < cfg.lift), None)


def cut_phrases(texts: list[str], phrases: list[str]) -> tuple[list[str], dict]:
    """`texts` with every occurrence of each phrase (its words in a row, matched as the scan reads words: lower-case,
    punctuation around them ignored) cut out; (texts, {"texts_touched", "cuts": {phrase: occurrences}})."""
    wanted = [p.split() for p in phrases if p.split()]
    cuts = {" ".join(p): 0 for p in wanted}
    out, touched = [], 0
    for text in texts:
        tokens = text.split()
        norm = [" ".join(words(t)) for t in tokens]  # a token read as the scan reads words
        drop = [False] * len(tokens)
        for p in wanted:
            n = len(p)
            for i in range(len(tokens) - n + 1):
                if norm[i:i + n] == p:
                    drop[i:i + n] = [True] * n
                    cuts[" ".join(p)] += 1
        if any(drop):
            touched += 1
            out.append(" ".join(t for t, d in zip(tokens, drop) if not d))
        else:
            out.append(text)
    return out, {"texts_touched": touched, "cuts": cuts}
