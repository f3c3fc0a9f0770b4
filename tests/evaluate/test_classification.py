"""The honest classifier table: the majority-class row, the verdict (FAILED at or below it), every deployed byte."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgestill.data.labelled import LabelledSplits, LabelledText, LabelMap
from edgestill.evaluate.classification import (
    compression,
    deploy_sizes,
    majority_baseline,
    validation_scores,
    verdict,
)


def _splits(train: dict[str, int], test: dict[str, int]) -> LabelledSplits:
    def part(counts):
        labels = [y for y, n in counts.items() for _ in range(n)]
        return LabelledText([f"text {i}" for i in range(len(labels))], labels)

    return LabelledSplits(part(train), part({"ham": 1, "spam": 1}), part(test), LabelMap.from_labels(["ham", "spam"]))


def test_majority_row_on_a_skewed_split_predicts_the_train_majority_everywhere():
    splits = _splits(train={"ham": 8, "spam": 2}, test={"ham": 6, "spam": 4})
    m = majority_baseline(splits)
    assert m["label"] == "ham" and m["label_id"] == 0 and m["train_share"] == pytest.approx(0.8)
    assert m["test"]["accuracy"] == pytest.approx(0.6) and m["test"]["n"] == 10
    # F1(ham) = 2·0.6·1 / 1.6 = 0.75, F1(spam) = 0 (never predicted): macro-F1 = 0.375
    assert m["test"]["macro_f1"] == pytest.approx(0.375)


def test_majority_label_comes_from_train_not_from_test():
    m = majority_baseline(_splits(train={"ham": 3, "spam": 7}, test={"ham": 7, "spam": 3}))
    assert m["label"] == "spam" and m["test"]["accuracy"] == pytest.approx(0.3)


def _baselines(majority_acc: float, tfidf_acc: float | None = None) -> dict:
    out = {"majority_class": {"test": {"accuracy": majority_acc, "macro_f1": 0.4, "n": 100}}}
    if tfidf_acc is not None:
        out["tfidf_logreg"] = {"test": {"accuracy": tfidf_acc, "macro_f1": 0.9, "n": 100}}
    return out


@pytest.mark.parametrize("acc", [0.60, 0.65])  # below, and exactly at, the majority class
def test_a_model_at_or_below_the_majority_class_fails(acc):
    v = verdict({"accuracy": acc, "macro_f1": 0.5, "n": 100}, _baselines(0.65, 0.9))
    assert v["failed"] is True and v["beats_majority"] is False and v["beats_tfidf_logreg"] is False
    assert v["text"].startswith(f"FAILED: at or below the majority class (acc {acc:.4f} <= 0.6500)")
    assert v["accuracy_minus_majority"] == pytest.approx(acc - 0.65)


def test_a_model_above_the_majority_class_passes_and_is_compared_with_tfidf():
    v = verdict({"accuracy": 0.95, "macro_f1": 0.93, "n": 100}, _baselines(0.65, 0.9))
    assert v["failed"] is False and v["beats_majority"] is True and v["beats_tfidf_logreg"] is True
    assert "FAILED" not in v["text"] and "beats TF-IDF" in v["text"]
    assert v["macro_f1_minus_tfidf_logreg"] == pytest.approx(0.03)
    below_tfidf = verdict({"accuracy": 0.85, "macro_f1": 0.8, "n": 100}, _baselines(0.65, 0.9))
    assert below_tfidf["beats_tfidf_logreg"] is False and "does NOT beat TF-IDF" in below_tfidf["text"]
    unmeasured = verdict({"accuracy": 0.85, "macro_f1": 0.8, "n": 100}, _baselines(0.65))
    assert unmeasured["beats_tfidf_logreg"] is None and "not measured" in unmeasured["text"]


def test_compression_counts_the_tokenizer_and_label_map(tmp_path):
    for name, n in {"model.onnx": 1000, "tokenizer.json": 300, "tokenizer_config.json": 50, "label_map.json": 20,
                    "export_report.json": 30}.items():
        (tmp_path / name).write_bytes(b"x" * n)
    (tmp_path / ".tokenizer.tmp").write_bytes(b"x" * 99)  # a leftover temp file is not deployed
    sizes = deploy_sizes(tmp_path)
    assert sizes["onnx_bytes"] == 1000 and sizes["tokenizer_bytes"] == 350 and sizes["label_map_bytes"] == 20
    assert sizes["deploy_bytes"] == 1400 and set(sizes["deploy_files"]) == {"model.onnx", "tokenizer.json",
                                                                           "tokenizer_config.json", "label_map.json",
                                                                           "export_report.json"}
    x = compression(4000, sizes, "compression_x_fp32")
    assert x["compression_x_fp32"] == pytest.approx(4000 / 1400)
    assert x["compression_x_fp32_weights_only"] == pytest.approx(4.0)
    assert x["compression_x_fp32"] < x["compression_x_fp32_weights_only"]


def test_validation_scores_report_the_mean_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0]])

    class Fixed(torch.nn.Module):  # an encoder classifier's interface: config.num_labels, forward(...).logits
        config = SimpleNamespace(num_labels=2)

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=logits[input_ids[:, 0]])

    enc = {"input_ids": np.arange(3)[:, None].astype(np.int64), "attention_mask": np.ones((3, 1), np.int64)}
    labels = np.array([0, 0, 0])
    v = validation_scores(Fixed(), enc, labels, batch_size=2)
    assert v["accuracy"] == pytest.approx(2 / 3)
    assert v["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.zeros(3, dtype=torch.long)).item())
