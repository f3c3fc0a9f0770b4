"""The classifier track from the command line, on a tiny random BERT and a generated CSV:
finetune -> shrink --task classification -> export --format onnx -> onnxruntime agrees with PyTorch."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest

from edgestill.cli import main
from edgestill.data.labelled import LabelMap, load_splits
from edgestill.models.encoder import tiny_encoder

FILLER = "the a of to and in is it on for with as at by".split()
CUES = {"fruit": "apple banana cherry mango".split(), "tool": "hammer wrench saw drill".split(),
        "pet": "cat dog parrot hamster".split()}
STEPS = ["train.steps=40", "train.eval_every=20", "train.lr=3e-3", "train.batch_size=16"]


def rows(n_per_class: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for label, cues in CUES.items():
        for _ in range(n_per_class):
            words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))] + [rng.choice(cues) for _ in range(2)]
            rng.shuffle(words)
            out.append((" ".join(words), label))
    return out


def write_csv(path, data, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(data)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clf")
    data = rows(60)
    enc = tiny_encoder(root / "tiny_bert", [t for t, _ in rows(80, seed=9)] + ["unseen zebra words"])
    train_csv = write_csv(root / "train.csv", data)
    teacher, shrunk = root / "teacher", root / "shrunk"
    assert main(["finetune", "--task", "classification", "--teacher", str(enc), "--data", str(train_csv),
                 "--out", str(teacher), *STEPS, "train.steps=100", "train.max_len=24"]) == 0
    assert main(["shrink", "--task", "classification", "--teacher", str(teacher), "--data", str(train_csv),
                 "--out", str(shrunk), *STEPS, "student.max_len=24", "student.num_layers=1", "student.compression_x=3",
                 "student.min_rank=2", "student.multiple_of=1", "kd.alpha=0.7", "eval.latency_examples=4",
                 "eval.latency_repeats=2"]) == 0
    return {"root": root, "csv": train_csv, "teacher": teacher, "shrunk": shrunk}


def _test_texts(runs):
    return load_splits(str(runs["csv"]), val_fraction=0.1, test_fraction=0.2, seed=0).test


def test_finetune_saves_a_hf_classifier_with_its_label_map(runs):
    from edgestill.models.encoder import load_encoder_classifier

    teacher = runs["teacher"]
    assert (teacher / "DONE").is_file() and not (teacher.parent / "teacher.partial").exists()
    label_map = LabelMap.load(teacher)
    assert label_map.labels == ("fruit", "pet", "tool")  # sorted label strings -> ids
    config = json.loads((teacher / "config.json").read_text())
    assert {int(k): v for k, v in config["id2label"].items()} == label_map.id2label
    model, _, again = load_encoder_classifier(str(teacher))
    assert again == label_map and model.config.num_labels == 3
    record = json.loads((teacher / "edgestill.json").read_text())
    assert record["data"]["path"] == str(runs["csv"].resolve()) and record["max_len"] == 24
    metrics = json.loads((teacher / "metrics.json").read_text())
    assert metrics["teacher"]["test"]["n"] == len(_test_texts(runs)) and metrics["teacher"]["test"]["accuracy"] > 0.6


def test_shrink_measures_the_onnx_student_against_the_teacher(runs):
    shrunk = runs["shrunk"]
    m = json.loads((shrunk / "metrics.json").read_text())
    onnx_file = shrunk / "onnx" / "model.onnx"
    assert m["task"] == "classification" and m["student"]["onnx_bytes"] == onnx_file.stat().st_size
    # "smaller" counts every file the device loads: model.onnx, the trimmed tokenizer, the label map, the report
    files = {f.name: f.stat().st_size for f in (shrunk / "onnx").iterdir() if f.is_file()}
    assert {"model.onnx", "tokenizer.json", "label_map.json"} <= set(files) and m["student"]["deploy_files"] == files
    assert m["student"]["deploy_bytes"] == sum(files.values()) > onnx_file.stat().st_size
    assert m["compression_x_fp32"] == pytest.approx(m["teacher"]["params"] * 4 / m["student"]["deploy_bytes"])
    assert m["compression_x_fp32_weights_only"] == pytest.approx(m["teacher"]["params"] * 4 / onnx_file.stat().st_size)
    assert m["compression_x_fp32"] < m["compression_x_fp32_weights_only"]
    assert m["compression_x_fp16"] == pytest.approx(m["compression_x_fp32"] / 2)
    assert m["compression_x_fp16_weights_only"] == pytest.approx(m["compression_x_fp32_weights_only"] / 2)
    assert m["compression_x_fp32"] > 1.5  # the student's files are really smaller than the teacher's fp32 weights
    assert m["retention_accuracy"] == pytest.approx(m["student"]["test"]["accuracy"] / m["teacher"]["test"]["accuracy"])
    assert m["retention_macro_f1"] == pytest.approx(m["student"]["test"]["macro_f1"] / m["teacher"]["test"]["macro_f1"])
    assert m["student"]["test"]["n"] == m["teacher"]["test"]["n"] == len(_test_texts(runs))
    lo, hi = m["student"]["latency_ms_spread"]
    assert 0 < lo <= m["student"]["latency_ms_per_example"] <= hi
    assert m["speedup_x"] == pytest.approx(m["teacher"]["latency_ms_per_example"] / m["student"]["latency_ms_per_example"])
    assert m["onnx_parity_vs_pytorch"]["prediction_agreement"] >= 0.995
    assert m["data"]["same_split_as_teacher_finetuning"] is True
    assert m["student"]["layers_kept"] == [1] and m["student"]["vocab_kept"] < json.loads(
        (runs["teacher"] / "config.json").read_text())["vocab_size"]
    assert {"majority_class", "tfidf_logreg", "student_sliced_untrained"} <= set(m["baselines"])
    vt = m["vocab_trim"]  # the trim's effect on held-out text is measured, not assumed
    assert 0 <= vt["texts_changed_fraction"] <= 1 and vt["test_texts_changed"] == round(vt["texts_changed_fraction"] * m["student"]["test"]["n"])
    assert "student_accuracy_unchanged" in vt and vt["unk_fraction"] >= vt["full_unk_fraction"]
    report = (shrunk / "report.md").read_text()
    assert "compression_x_fp32" in report and "retention" in report
    assert LabelMap.load(shrunk / "onnx") == LabelMap.load(runs["teacher"])  # the label map travels with the model
    assert not list(shrunk.glob(".teacher-onnx-*"))  # the teacher's timing export is not left behind


def test_shrink_draws_the_runs_shrink_curve_over_onnx_types(runs):
    shrunk = runs["shrunk"]
    m = json.loads((shrunk / "metrics.json").read_text())
    curve = {c["type"]: c for c in m["curve"]}
    assert list(curve) == ["f32", "int8", "int4"]
    assert curve["f32"]["onnx_bytes"] == m["student"]["onnx_bytes"] and curve["f32"]["test"] == m["student"]["test"]
    for t, c in curve.items():
        folder = shrunk / ("onnx" if t == "f32" else f"onnx-{t}")
        assert c["onnx_bytes"] == (folder / "model.onnx").stat().st_size  # real files, kept for deployment
        assert c["deploy_bytes"] == sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        assert c["compression_x_fp32"] == pytest.approx(m["teacher"]["params"] * 4 / c["deploy_bytes"])
        assert c["compression_x_fp32_weights_only"] == pytest.approx(m["teacher"]["params"] * 4 / c["onnx_bytes"])
        assert c["beats_majority"] == (c["test"]["accuracy"] > m["baselines"]["majority_class"]["test"]["accuracy"])
        assert c["retention_accuracy"] == pytest.approx(c["test"]["accuracy"] / m["teacher"]["test"]["accuracy"])
        assert c["onnx_parity_vs_pytorch"]["prediction_agreement"] >= 0.995
        assert c["latency_ms_per_example"] > 0 and c["speedup_x"] > 0
    # int4 can store only tables whose rows fill its 32-weight blocks: a narrow token table stays fp32 there, so an
    # int4 file may be larger than the int8 one, which stores every table
    assert max(curve["int4"]["onnx_bytes"], curve["int8"]["onnx_bytes"]) < curve["f32"]["onnx_bytes"]
    assert (shrunk / "shrink_curve.png").stat().st_size > 0
    assert "Shrink curve" in (shrunk / "report.md").read_text()


def test_finetune_stops_on_the_validation_curve_and_carries_the_baselines(runs):
    m = json.loads((runs["teacher"] / "metrics.json").read_text())
    t = m["teacher"]
    assert m["val_curve"][0]["step"] == 20 and m["val_curve"][-1]["step"] == t["stopped_at_step"]
    assert t["max_steps"] == 100 and t["patience"] == 5 and t["select_on"] == "macro_f1"
    best = max(m["val_curve"], key=lambda p: p["val_macro_f1"])  # the first step with the best val macro-F1
    assert t["best_step"] == best["step"] and t["best_val_macro_f1"] == best["val_macro_f1"]
    test = _test_texts(runs)
    major = m["baselines"]["majority_class"]  # 3 balanced classes: the tie goes to the first label
    assert major["label"] == "fruit" and major["test"]["accuracy"] == pytest.approx(test.labels.count("fruit") / len(test))
    assert m["baselines"]["tfidf_logreg"]["test"]["n"] == len(test)
    assert t["verdict"]["beats_majority"] is True and t["verdict"]["text"].startswith("above the majority class")
    report = (runs["teacher"] / "report.md").read_text()
    assert "majority class (baseline)" in report and "TF-IDF" in report
    assert ("stopped early" in report) == t["stopped_early"] and "val_curve" in report


def test_shrink_reports_the_verdict_against_the_baselines(runs):
    m = json.loads((runs["shrunk"] / "metrics.json").read_text())
    major = m["baselines"]["majority_class"]
    assert m["beats_majority"] == (m["student"]["test"]["accuracy"] > major["test"]["accuracy"]) is True
    assert m["failed"] is False and m["retention_note"] is None
    assert m["beats_tfidf_logreg"] == (m["student"]["test"]["accuracy"] > m["baselines"]["tfidf_logreg"]["test"]["accuracy"])
    assert major["retention_accuracy"] == pytest.approx(major["test"]["accuracy"] / m["teacher"]["test"]["accuracy"])
    assert m["teacher"]["beats_majority"] is True and m["environment"]["git_commit"] is not None
    report = (runs["shrunk"] / "report.md").read_text()
    assert "## Verdict" in report and "majority class (baseline)" in report and "FAILED" not in report
    assert "compression_x_fp32" in report and "weights only" in report


def test_a_student_at_the_majority_class_is_reported_as_failed(runs, tmp_path, monkeypatch, caplog):
    """The student's ONNX file made to predict label 0 everywhere (= the majority class on this balanced split, a tie):
    the run still finishes, but says FAILED and labels its retention."""
    import shutil

    import yaml

    import edgestill.runtime.onnx as ort

    out, partial = tmp_path / "failed", tmp_path / "failed.partial"
    shutil.copytree(runs["shrunk"], partial)  # resume after the saved student: no distillation
    for name in ("DONE", "metrics.json", "report.md"):
        (partial / name).unlink()
    cfg = yaml.safe_load((partial / "config.yaml").read_text())
    cfg["output_dir"] = str(out)
    (partial / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    monkeypatch.setattr(ort, "onnx_classifier_logits", lambda session, enc, *a, **k: np.zeros((len(enc["input_ids"]), 3),
                                                                                             np.float32))
    assert main(["shrink", "--task", "classification", "--teacher", str(runs["teacher"]), "--data", str(runs["csv"]),
                 "--out", str(out), *STEPS, "student.max_len=24", "student.num_layers=1", "student.compression_x=3",
                 "student.min_rank=2", "student.multiple_of=1", "kd.alpha=0.7", "eval.latency_examples=2",
                 "eval.latency_repeats=1", "eval.teacher_latency=false", "eval.tfidf_baseline=false",
                 "eval.curve_types=[f32]"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    acc = m["student"]["test"]["accuracy"]
    assert acc == pytest.approx(m["baselines"]["majority_class"]["test"]["accuracy"])
    assert m["beats_majority"] is False and m["failed"] is True and m["curve"][0]["failed"] is True
    assert m["retention_accuracy"] == pytest.approx(acc / m["teacher"]["test"]["accuracy"])  # computed, but labelled
    assert m["retention_note"].startswith("not a retention")
    line = f"FAILED: at or below the majority class (acc {acc:.4f} <= {acc:.4f})"
    assert m["verdict"]["text"].startswith(line) and line in (out / "report.md").read_text()
    assert any(line in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    # eval.tfidf_baseline=false: the teacher run's TF-IDF row (same split) is reused, so the comparison is still made
    assert m["baselines"]["tfidf_logreg"]["from"].endswith("metrics.json") and m["beats_tfidf_logreg"] is False


def test_onnxruntime_predictions_agree_with_pytorch(runs):
    """predict_onnx (labels via label_map.json) vs the PyTorch student, on the held-out split."""
    from edgestill.evaluate.classification import predict_logits
    from edgestill.models.encoder import load_encoder_classifier, tokenize
    from edgestill.runtime.onnx import predict_onnx

    test = _test_texts(runs)
    student, tok, label_map = load_encoder_classifier(str(runs["shrunk"] / "student"))
    expected = label_map.decode(predict_logits(student, tokenize(tok, test.texts, 24)).argmax(-1))
    got = predict_onnx(runs["shrunk"] / "onnx", test.texts)
    assert set(got) <= set(label_map.labels)
    assert np.mean([a == b for a, b in zip(got, expected)]) >= 0.995
    # long text is truncated to the student's 24 positions instead of failing in onnxruntime
    assert predict_onnx(runs["shrunk"] / "onnx", [" ".join(["apple"] * 200)])[0] in label_map.labels


def test_cli_export_int8_is_smaller_and_agrees_with_fake_quant_pytorch(runs, capsys):
    import onnx

    from edgestill.evaluate.classification import predict_logits
    from edgestill.export.onnx_classifier import fake_quant_reference, linearize_, quant_formats
    from edgestill.models.encoder import load_encoder_classifier, tokenize
    from edgestill.runtime.onnx import predict_onnx

    shrunk = runs["shrunk"]
    assert main(["export", "--format", "onnx", str(shrunk), "--type", "int8"]) == 0
    assert "same prediction on" in capsys.readouterr().out
    folder = shrunk / "onnx-int8"
    report = json.loads((folder / "export_report.json").read_text())
    assert report["type"] == "int8" and report["formats"] and report["float_matmuls"] <= 1  # only the fp32 head is left
    # the token table is stored in int8 too, and no float copy of it is left in the file
    table = next(k for k in report["formats"] if "word_embeddings" in k)
    assert report["formats"][table] == "Int8PerChannel"
    student, tok, label_map = load_encoder_classifier(str(shrunk / "student"))
    linearize_(student)
    rows = tuple(dict(student.named_modules())[table].weight.shape)
    floats = [tuple(i.dims) for i in onnx.load(str(folder / "model.onnx")).graph.initializer if i.data_type == 1]
    assert rows not in floats
    assert report["parity_vs_pytorch"]["prediction_agreement"] >= 0.995
    assert (folder / "model.onnx").stat().st_size < (shrunk / "onnx" / "model.onnx").stat().st_size
    assert (folder / "tokenizer.json").is_file() and LabelMap.load(folder) == LabelMap.load(shrunk / "student")
    reference = fake_quant_reference(student, quant_formats(student, "int8"))
    test = _test_texts(runs)
    expected = label_map.decode(predict_logits(reference, tokenize(tok, test.texts, 24)).argmax(-1))
    got = predict_onnx(folder, test.texts)
    assert np.mean([a == b for a, b in zip(got, expected)]) >= 0.995


def test_linearize_keeps_the_function(runs):
    import torch

    from edgestill.export.onnx_classifier import linearize_
    from edgestill.models.encoder import load_encoder_classifier, tokenize
    from edgestill.models.lowrank import FactorizedEmbedding, LowRankLinear

    student, tok, _ = load_encoder_classifier(str(runs["shrunk"] / "student"))
    assert any(isinstance(m, (LowRankLinear, FactorizedEmbedding)) for m in student.modules())
    batch = {k: torch.from_numpy(v) for k, v in tokenize(tok, _test_texts(runs).texts[:6], 24).items()}
    with torch.no_grad():
        before = student(**batch).logits
        changed = linearize_(student)
        after = student(**batch).logits
    assert changed and not any(isinstance(m, (LowRankLinear, FactorizedEmbedding)) for m in student.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgestill: error: ")
    return err[-1]


def test_bad_labelled_data_gives_one_line_errors(runs, tmp_path, capsys):
    no_label = write_csv(tmp_path / "nolabel.csv", rows(5), header=("text", "category"))
    assert main(["finetune", "--data", str(no_label), "--out", str(tmp_path / "a")]) == 2
    assert "no column(s) ['label']" in _one_line_error(capsys)
    single = write_csv(tmp_path / "single.csv", [(f"text number {i}", "spam") for i in range(20)])
    assert main(["finetune", "--data", str(single), "--out", str(tmp_path / "b")]) == 2
    assert "single class" in _one_line_error(capsys)
    assert not (tmp_path / "a.partial").exists() and not (tmp_path / "b.partial").exists()  # nothing started
    assert main(["finetune", "--data", str(runs["csv"]), "--out", str(tmp_path / "c"), "train.stepz=3"]) == 2
    assert "did you mean 'train.steps'" in _one_line_error(capsys)
    # a teacher that was never fine-tuned, and the GGUF format, are refused for classifiers
    assert main(["shrink", "--task", "classification", "--teacher", str(runs["root"] / "tiny_bert"),
                 "--out", str(tmp_path / "d")]) == 2
    assert "no label_map.json" in _one_line_error(capsys)
    assert main(["export", str(runs["shrunk"]), "--format", "gguf"]) == 2
    assert "classifier run" in _one_line_error(capsys)


def test_a_finished_run_is_not_overwritten(runs, capsys):
    weights = runs["teacher"] / "model.safetensors"
    before = weights.read_bytes()
    assert main(["finetune", "--teacher", str(runs["root"] / "tiny_bert"), "--data", str(runs["csv"]),
                 "--out", str(runs["teacher"]), "train.steps=2"]) == 2
    assert "already holds a finished run" in _one_line_error(capsys)
    assert weights.read_bytes() == before
    metrics = (runs["shrunk"] / "metrics.json").read_text()
    assert main(["shrink", "--task", "classification", "--teacher", str(runs["teacher"]), "--out", str(runs["shrunk"]),
                 "train.steps=2"]) == 2
    assert "already holds a finished run" in _one_line_error(capsys)
    assert (runs["shrunk"] / "metrics.json").read_text() == metrics


def test_a_killed_shrink_resumes_after_the_saved_student(runs, tmp_path, monkeypatch):
    """A partial run holding a saved student finishes without distilling again (same config, same student)."""
    import shutil

    import yaml

    import edgestill.distill.classifier as classifier

    out = tmp_path / "resumed"
    partial = tmp_path / "resumed.partial"
    shutil.copytree(runs["shrunk"], partial)
    for name in ("DONE", "metrics.json", "report.md"):
        (partial / name).unlink()
    shutil.rmtree(partial / "onnx")
    cfg = yaml.safe_load((partial / "config.yaml").read_text())
    cfg["output_dir"] = str(out)
    (partial / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    def boom(*a, **k):
        raise AssertionError("the student was distilled again")

    monkeypatch.setattr(classifier, "distill_classifier", boom)
    assert main(["shrink", "--task", "classification", "--teacher", str(runs["teacher"]), "--data", str(runs["csv"]),
                 "--out", str(out), *STEPS, "student.max_len=24", "student.num_layers=1", "student.compression_x=3",
                 "student.min_rank=2", "student.multiple_of=1", "kd.alpha=0.7", "eval.latency_examples=2",
                 "eval.latency_repeats=1", "eval.teacher_latency=false", "eval.tfidf_baseline=false"]) == 0
    assert (out / "DONE").is_file() and not partial.exists()
    assert (out / "student" / "model.safetensors").read_bytes() == (runs["shrunk"] / "student" / "model.safetensors").read_bytes()
    m = json.loads((out / "metrics.json").read_text())
    assert m["speedup_x"] is None  # eval.* may change on resume
    assert m["baselines"]["tfidf_logreg"]["from"] == str(runs["teacher"] / "metrics.json")  # reused: same split
    assert m["student"]["test"] == json.loads((runs["shrunk"] / "metrics.json").read_text())["student"]["test"]


def test_shrink_with_mutual_learning_reports_the_teacher_copy_beside_the_reference(runs, tmp_path):
    """kd.method=mutual from the command line: the run's teacher scores stay the fine-tuned teacher's, and the copy that
    learned beside the student is reported next to them (metrics.json and the report's verdict)."""
    out = tmp_path / "mutual"
    assert main(["shrink", "--task", "classification", "--teacher", str(runs["teacher"]), "--data", str(runs["csv"]),
                 "--out", str(out), *STEPS, "train.steps=10", "student.max_len=24", "student.num_layers=1",
                 "student.compression_x=3", "student.min_rank=2", "student.multiple_of=1", "kd.alpha=0.7",
                 "kd.method=mutual", "kd.mutual_teacher_lr=1e-3", "eval.latency_examples=2", "eval.latency_repeats=1",
                 "eval.teacher_latency=false", "eval.tfidf_baseline=false", "eval.curve_types=[f32]"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    reference = json.loads((runs["shrunk"] / "metrics.json").read_text())["teacher"]["test"]
    assert m["teacher"]["test"] == reference  # the fine-tuned teacher, untouched
    mutual = m["teacher"]["mutual"]
    assert mutual["lr"] == 1e-3 and {"accuracy", "macro_f1"} <= set(mutual["test"])
    assert m["train"]["kd"]["method"] == "mutual" and "lambda_ts" in m["history"][-1]
    assert "learned beside the student (kd.method=mutual" in (out / "report.md").read_text()


def test_shrink_with_unlabelled_transfer_text_drops_split_texts_and_reports_it(runs, tmp_path, capsys):
    """kd.transfer from the command line: a text file of unlabelled texts joins the transfer set; any that is a test
    (or train, or validation) text is dropped first, and metrics.json and the report say how many were used."""
    test_text = _test_texts(runs).texts[0]
    extra = tmp_path / "unlabelled.txt"
    extra.write_text("\n".join([test_text, "a hammer beside the cat", "mango and a drill", "ok"]) + "\n")
    args = ["shrink", "--task", "classification", "--teacher", str(runs["teacher"]), "--data", str(runs["csv"]),
            *STEPS, "train.steps=6", "student.max_len=24", "student.num_layers=1", "student.compression_x=3",
            "student.min_rank=2", "student.multiple_of=1", "kd.alpha=0.7", "eval.latency_examples=2",
            "eval.latency_repeats=1", "eval.teacher_latency=false", "eval.tfidf_baseline=false", "eval.curve_types=[f32]"]
    assert main([*args, f"kd.transfer={tmp_path / 'nope.txt'}", "--out", str(tmp_path / "missing")]) == 2
    assert "is neither a file nor a built-in corpus" in _one_line_error(capsys)
    assert not (tmp_path / "missing").exists() and not (tmp_path / "missing.partial").exists()
    out = tmp_path / "transfer"
    assert main([*args, f"kd.transfer={extra}", "--out", str(out)]) == 0
    ts = json.loads((out / "metrics.json").read_text())["train"]["transfer_set"]
    assert ts["unlabelled"] == 2
    assert ts["source"] == {"spec": str(extra), "sentences": False, "loaded": 3, "dropped_in_splits": 1, "used": 2,
                            "onion": None}
    assert "+ 2 unlabelled texts from" in (out / "report.md").read_text()


def test_a_soup_averages_students_that_equal_single_seed_runs_and_resumes_after_each(runs, tmp_path, capsys,
                                                                                        monkeypatch):
    """soup.ingredients=2 from the command line: ingredient k is the student a run with train.seed + k alone distils
    (bit for bit), the exported student is their average, and a run killed in the second ingredient resumes without
    distilling the first again. Bad settings are refused before any folder is made."""
    import torch
    import yaml
    from safetensors.torch import load_file

    import edgestill.distill.classifier as classifier

    args = ["shrink", "--task", "classification", "--teacher", str(runs["teacher"]), "--data", str(runs["csv"]),
            *STEPS, "train.steps=10", "train.eval_every=5", "student.max_len=24", "student.num_layers=1",
            "student.compression_x=3", "student.min_rank=2", "student.multiple_of=1", "kd.alpha=0.7", "kd.augment=1",
            "eval.latency_examples=2", "eval.latency_repeats=1", "eval.teacher_latency=false",
            "eval.tfidf_baseline=false", "eval.curve_types=[f32]"]
    assert main([*args, "soup.ingredients=0", "--out", str(tmp_path / "bad")]) == 2
    assert "soup.ingredients=0 must be between 1 (no soup) and 16" in _one_line_error(capsys)
    assert main([*args, "soup.ingredients=2", "kd.method=mutual", "kd.augment=0", "--out", str(tmp_path / "bad")]) == 2
    assert "with kd.method=mutual" in _one_line_error(capsys)
    assert not list(tmp_path.glob("bad*"))

    alone = tmp_path / "seed1"
    assert main([*args, "train.seed=1", "--out", str(alone)]) == 0
    assert "soup" not in yaml.safe_load((alone / "config.yaml").read_text())  # off: the config of runs made before soups existed

    real, calls = classifier.distill_classifier, []

    def killed_in_the_second(*a, **k):
        calls.append(a[6].seed)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would
        return real(*a, **k)

    out = tmp_path / "soup"
    monkeypatch.setattr(classifier, "distill_classifier", killed_in_the_second)
    assert main([*args, "soup.ingredients=2", "--out", str(out)]) == 130  # interrupted: rerun to resume
    assert (tmp_path / "soup.partial" / "ingredients" / "seed0" / "distill.json").is_file()
    calls.clear()
    monkeypatch.setattr(classifier, "distill_classifier", lambda *a, **k: (calls.append(a[6].seed), real(*a, **k))[1])
    import edgestill.evaluate.classification as scoring

    def checksum(weights) -> float:
        return float(sum(v.double().sum() for v in weights.values() if v.is_floating_point()))

    scored, real_scores = [], scoring.evaluate_classifier  # the weights of every model the job scores
    monkeypatch.setattr(scoring, "evaluate_classifier",
                        lambda model, *a, **k: (scored.append(checksum(model.state_dict())), real_scores(model, *a, **k))[1])
    assert main([*args, "soup.ingredients=2", "--out", str(out)]) == 0
    assert calls == [1]  # seed 0 was not distilled again

    ingredients = [load_file(str(out / "ingredients" / f"seed{s}" / "model.safetensors")) for s in (0, 1)]
    single = load_file(str(alone / "student" / "model.safetensors"))
    assert all(torch.equal(ingredients[1][k], single[k]) for k in single)  # the seed-1 run's own student
    soup = load_file(str(out / "student" / "model.safetensors"))
    for weights in (*ingredients, soup):  # each ingredient scored with its own weights, the soup with the average
        assert any(abs(c - checksum(weights)) < 1e-6 * max(1.0, abs(c)) for c in scored)
    floats = [k for k, v in soup.items() if v.is_floating_point()]
    assert any(not torch.equal(ingredients[0][k], ingredients[1][k]) for k in floats)
    for k in floats:
        torch.testing.assert_close(soup[k], (ingredients[0][k] + ingredients[1][k]) / 2)
    m = json.loads((out / "metrics.json").read_text())
    assert m["soup"]["seeds"] == [0, 1] and [r["seed"] for r in m["soup"]["ingredients"]] == [0, 1]
    assert m["soup"]["test"] == m["baselines"]["student_pytorch"]["test"]
    assert m["soup"]["ingredients"][1]["test"] == json.loads((alone / "distill.json").read_text())["test_pytorch"]
    seed0 = json.loads((out / "ingredients" / "seed0" / "distill.json").read_text())
    assert m["soup"]["ingredients"][0]["test"] == seed0["test_pytorch"]
    val_f1 = [r["val"]["macro_f1"] for r in m["soup"]["ingredients"]]  # each ingredient's own, not the soup's
    assert val_f1[0] == max(h["val_macro_f1"] for h in seed0["history"] if "val_macro_f1" in h)
    assert val_f1[1] == max(h["val_macro_f1"] for h in json.loads((alone / "distill.json").read_text())["history"]
                            if "val_macro_f1" in h)
    assert "a uniform soup of 2 students distilled with seeds 0, 1" in (out / "report.md").read_text()
    assert not (out / "checkpoints").exists()
