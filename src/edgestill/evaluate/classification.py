"""Classifier quality: accuracy, macro-F1, retention, the two baselines, the verdict, deployable bytes, ONNX parity.

Definitions (docs/references.md#measurement-conventions): retention for a classifier =
student score ÷ teacher score on the same held-out split, for accuracy and macro-F1. Every results table carries two
baselines fitted on the same train split and scored on test:

- the majority class (`majority_baseline`): always predict the most frequent training label. A model whose test
  accuracy is not above it has learned nothing usable: `verdict` marks it FAILED, whatever its retention;
- TF-IDF + logistic regression (`tfidf_baseline`, C chosen on the val split): the strongest simple baseline;
  `verdict` says whether the model beats it.

"Smaller" counts every file the device loads (`deployable_files`): the model file, the tokenizer files, the label
map and the export report the runtime reads its max length from.
"""

from __future__ import annotations

from pathlib import Path

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
def predict_logits(model, enc: dict[str, np.ndarray], batch_size: int = 64, desc: str = "predicting",
                   bar: bool = True) -> np.ndarray:
    """(N, num_labels) logits of an encoder classifier over pre-tokenized arrays, in their order (`bar=False`: no
    progress bar of its own, for a caller that shows one over many small calls).

    Texts are batched shortest first, so that each batch is cut to a length close to all of its texts' (padding
    costs time, not results: the attention mask hides it)."""
    from edgestill.models.encoder import batch_tensors

    model.eval()
    device = next(model.parameters()).device
    n = len(enc["input_ids"])
    out = np.zeros((n, model.config.num_labels), np.float32)
    order = np.argsort(enc["attention_mask"].sum(1), kind="stable")
    progress = progress_bar(total=n, desc=desc, unit="ex", disable=not bar)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in batch_tensors(enc, idx).items()}
        out[idx] = model(**batch).logits.float().cpu().numpy()
        progress.update(len(idx))
    progress.close()
    return out


def evaluate_classifier(model, enc: dict[str, np.ndarray], labels: np.ndarray, batch_size: int = 64) -> dict:
    logits = predict_logits(model, enc, batch_size)
    return scores(labels, logits.argmax(-1), model.config.num_labels)


def validation_scores(model, enc: dict[str, np.ndarray], labels: np.ndarray, batch_size: int = 64) -> dict:
    """accuracy, macro-F1 and `loss` (mean cross-entropy) on a validation split: what early stopping reads."""
    logits = predict_logits(model, enc, batch_size, desc="validation")
    out = scores(labels, logits.argmax(-1), model.config.num_labels)
    out["loss"] = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits).float(),
                                                          torch.as_tensor(np.asarray(labels), dtype=torch.long)))
    return out


# ---------------------------------------------------------------- baselines and the verdict


def majority_baseline(splits) -> dict:
    """Always predict the most frequent label of the train split (ties: the lowest id), scored on test.

    The floor of every classifier table: on a skewed test split its accuracy is the share of that label, which a
    model that learned nothing reaches by predicting it everywhere.
    """
    y_train, y_test = splits.ids("train"), splits.ids("test")
    k = len(splits.label_map)
    label_id = int(np.bincount(y_train, minlength=k).argmax())
    return {"method": "majority_class", "label": splits.label_map.labels[label_id], "label_id": label_id,
            "train_share": float((y_train == label_id).mean()),
            "test": scores(y_test, np.full_like(y_test, label_id), k), "params": 0}


def verdict(test: dict, baselines: dict) -> dict:
    """Whether a model's test scores beat the majority class and TF-IDF + logistic regression (accuracy decides).

    `failed` is True when accuracy is at or below the majority class's: such a model is reported as a failure, and
    its retention is not a result. `beats_tfidf_logreg` is None when that baseline was not measured.
    """
    acc = test["accuracy"]
    major = baselines["majority_class"]["test"]
    beats = acc > major["accuracy"]
    out = {"beats_majority": beats, "failed": not beats, "majority_accuracy": major["accuracy"],
           "accuracy_minus_majority": acc - major["accuracy"], "beats_tfidf_logreg": None}
    tfidf = baselines.get("tfidf_logreg")
    if tfidf:
        t = tfidf["test"]
        out.update({"beats_tfidf_logreg": acc > t["accuracy"], "tfidf_logreg_accuracy": t["accuracy"],
                    "accuracy_minus_tfidf_logreg": acc - t["accuracy"],
                    "macro_f1_minus_tfidf_logreg": test["macro_f1"] - t["macro_f1"]})
    out["text"] = verdict_text(acc, out)
    return out


def verdict_text(accuracy: float, v: dict) -> str:
    """One line: FAILED (at or below the majority class) or above it, and the comparison with TF-IDF + LR."""
    if v["failed"]:
        head = f"FAILED: at or below the majority class (acc {accuracy:.4f} <= {v['majority_accuracy']:.4f})"
    else:
        head = f"above the majority class (acc {accuracy:.4f} > {v['majority_accuracy']:.4f})"
    if v.get("beats_tfidf_logreg") is None:
        return head + "; TF-IDF + logistic regression not measured"
    word = "beats" if v["beats_tfidf_logreg"] else "does NOT beat"
    return head + f"; {word} TF-IDF + logistic regression (acc {v['tfidf_logreg_accuracy']:.4f})"


RETENTION_OF_A_FAILURE = ("not a retention: the model is at or below the majority class, so the ratio is shown for the "
                          "record only")


# ---------------------------------------------------------------- what the device loads


def deployable_files(folder: str | Path) -> dict[str, int]:
    """{file name: bytes} of every file in an exported classifier folder: what `runtime.onnx.load_onnx_classifier`
    reads (model.onnx, the tokenizer files, label_map.json, export_report.json for the max length)."""
    folder = Path(folder)
    return {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "added_tokens.json")


def deploy_sizes(folder: str | Path, weights_file: str = "model.onnx") -> dict:
    """The bytes of an exported folder: weights (`onnx_bytes`), tokenizer files, label map, and all together."""
    from edgestill.data.labelled import LABEL_MAP_FILE

    files = deployable_files(folder)
    return {"onnx_bytes": files.get(weights_file, 0),
            "tokenizer_bytes": sum(b for n, b in files.items() if n in TOKENIZER_FILES),
            "label_map_bytes": files.get(LABEL_MAP_FILE, 0), "deploy_bytes": sum(files.values()), "deploy_files": files}


def compression(reference_bytes: float, sizes: dict, name: str) -> dict:
    """`<name>` = reference ÷ every deployed byte; `<name>_weights_only` = reference ÷ the weights file's bytes."""
    return {name: reference_bytes / sizes["deploy_bytes"], f"{name}_weights_only": reference_bytes / sizes["onnx_bytes"]}


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
    weight_bytes = int(4 * (n_weights + len(vec.idf_)))
    vocabulary_bytes = sum(len(term.encode("utf-8")) + 1 for term in vec.vocabulary_)  # one term a line, in id order
    return {
        "method": "tfidf_logreg", "C": C, "val": val, "test": scores(y_test, clf.predict(x_test), k),
        "vocabulary": len(vec.vocabulary_), "params": int(n_weights),
        "weight_bytes_fp32": weight_bytes,  # weights + idf as float32
        "vocabulary_bytes": vocabulary_bytes,  # the terms it must ship to map text to features
        "deploy_bytes": weight_bytes + vocabulary_bytes,
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
