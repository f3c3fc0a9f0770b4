"""Classifier quality: accuracy, macro-F1, retention, the TF-IDF + logistic-regression baseline, ONNX parity.

Definitions (docs/references.md#measurement-conventions): retention for a classifier = student score ÷
teacher score on the same held-out split, for accuracy and macro-F1. The baseline any student must be compared with is
TF-IDF + logistic regression on the same train split (C chosen on the val split), scored on test.
"""

from __future__ import annotations

import numpy as np
import torch

from edgestill.progress import progress_bar


def scores(y_true, y_pred, num_labels: int | None = None) -> dict:
    """accuracy and macro-F1 (every label of the map counts, also one never predicted)."""
    from sklearn.metrics import f1_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(num_labels)) if num_labels else None
    return {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "n": int(len(y_true)),
    }


def retention(student: dict, teacher: dict) -> dict:
    return {f"retention_{k}": student[k] / teacher[k] if teacher[k] else float("nan") for k in ("accuracy", "macro_f1")}


@torch.no_grad()
def predict_logits(model, enc: dict[str, np.ndarray], batch_size: int = 64, desc: str = "predicting") -> np.ndarray:
    """(N, num_labels) logits of an encoder classifier over pre-tokenized arrays."""
    from edgestill.models.encoder import batch_tensors

    model.eval()
    device = next(model.parameters()).device
    n = len(enc["input_ids"])
    out = []
    bar = progress_bar(total=n, desc=desc, unit="ex")
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        batch = {k: v.to(device) for k, v in batch_tensors(enc, idx).items()}
        out.append(model(**batch).logits.float().cpu().numpy())
        bar.update(len(idx))
    bar.close()
    return np.concatenate(out) if out else np.zeros((0, model.config.num_labels), np.float32)


def evaluate_classifier(model, enc: dict[str, np.ndarray], labels: np.ndarray, batch_size: int = 64) -> dict:
    logits = predict_logits(model, enc, batch_size)
    return scores(labels, logits.argmax(-1), model.config.num_labels)


def tfidf_baseline(splits, Cs=(1.0, 10.0, 100.0), max_features: int = 200_000, seed: int = 0) -> dict:
    """TF-IDF (word 1-2 grams, sublinear tf) + logistic regression: fit on train, pick C on val, score on test.

    Returns val/test scores, the chosen C and the size of the fitted model (vocabulary x classes weights),
    so it can be placed beside a student on the same size axis.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    y_train, y_val, y_test = splits.ids("train"), splits.ids("val"), splits.ids("test")
    k = len(splits.label_map)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_features=max_features)
    x_train = vec.fit_transform(splits.train.texts)
    x_val, x_test = vec.transform(splits.val.texts), vec.transform(splits.test.texts)
    best = None
    for C in Cs:
        clf = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(x_train, y_train)
        val = scores(y_val, clf.predict(x_val), k)
        if best is None or val["macro_f1"] > best[1]["macro_f1"]:
            best = (C, val, clf)
    C, val, clf = best
    n_weights = clf.coef_.size + clf.intercept_.size
    return {
        "method": "tfidf_logreg", "C": C, "val": val, "test": scores(y_test, clf.predict(x_test), k),
        "vocabulary": len(vec.vocabulary_), "params": int(n_weights),
        # weights + idf as float32; the vocabulary strings themselves are extra
        "weight_bytes_fp32": int(4 * (n_weights + len(vec.idf_))),
    }


@torch.no_grad()
def classifier_parity(reference, onnx_path, tokenizer, texts: list[str], max_len: int, threads: int = 2) -> dict:
    """Share of `texts` on which onnxruntime and PyTorch predict the same label, and logit differences."""
    from edgestill.models.encoder import tokenize
    from edgestill.runtime.onnx import onnx_classifier_logits, onnx_session

    enc = tokenize(tokenizer, texts, max_len)
    expected = predict_logits(reference, enc, desc="PyTorch logits")
    got = onnx_classifier_logits(onnx_session(onnx_path, threads), enc)
    diff = np.abs(got - expected)
    return {"examples": len(texts), "prediction_agreement": float((got.argmax(-1) == expected.argmax(-1)).mean()),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
