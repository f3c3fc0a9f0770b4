"""Open-vocabulary (zero-shot) classification: an image's class is the class-name prompt whose text embedding is
nearest (cosine) to its image embedding; nothing is trained for the classes being scored.

- seen: test images of the classes the teacher was aligned on, classified among the seen prompts;
- held-out: images of classes no model trained on, classified among the held-out prompts only;
- all: every test image among all prompts (generalized zero-shot: seen classes compete with held-out ones).
Chance is 1 / (number of candidate prompts) for each.
"""

from __future__ import annotations

import numpy as np


def zero_shot_predict(image_emb: np.ndarray, text_emb: np.ndarray, candidates: list[int]) -> np.ndarray:
    """Class indices (into text_emb's rows) among `candidates` for each image embedding."""
    sims = image_emb @ text_emb[candidates].T
    return np.asarray(candidates)[sims.argmax(1)]


def zero_shot_scores(emb_seen: np.ndarray, y_seen: np.ndarray, emb_held: np.ndarray, y_held: np.ndarray,
                     text_emb: np.ndarray, seen: list[int], heldout: list[int]) -> dict:
    """Accuracies (seen, held-out, all) of image embeddings of the seen-class test images and the held-out
    images; y_* index text_emb's rows."""
    everything = sorted([*seen, *heldout])
    acc_seen = float(np.mean(zero_shot_predict(emb_seen, text_emb, seen) == y_seen))
    acc_held = float(np.mean(zero_shot_predict(emb_held, text_emb, heldout) == y_held)) if len(heldout) else None
    both, y_both = np.concatenate([emb_seen, emb_held]), np.concatenate([y_seen, y_held])
    acc_all = float(np.mean(zero_shot_predict(both, text_emb, everything) == y_both))
    return {"seen": acc_seen, "heldout": acc_held, "all": acc_all,
            "chance": {"seen": 1 / len(seen), "heldout": 1 / len(heldout) if heldout else None,
                       "all": 1 / len(everything)},
            "n": {"seen": int(len(y_seen)), "heldout": int(len(y_held))}}
