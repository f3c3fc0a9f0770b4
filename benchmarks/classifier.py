"""Classifier track on SpamAssassin: TF-IDF baseline, fine-tuned MiniLM teacher, a ≥50× smaller student.

Rows (all on the same seeded stratified split; test is never seen before the final scoring):
- tfidf_logreg: TF-IDF + logistic regression (C picked on val) — the strong classical baseline.
- teacher: all-MiniLM-L6-v2 + classification head, CE fine-tuning.
- student_sliced: the student cut from the teacher (layers, trimmed vocab, SVD low-rank), no training.
- student_ce: that student trained with CE only.
- student_kd: the same student trained with KD (α·T²·KL + (1−α)·CE [+ hidden MSE]), same steps and lr.

Sizes: params counted as really stored; `student_file_bytes` is the student's model.safetensors (fp32).
`compression_x_fp32` = teacher params × 4 ÷ that file (ONNX export lives in edgestill/export, not here).

    python benchmarks/classifier.py [--max-len 64 --teacher-steps 60 --student-steps 200 --threads 2]
-> benchmarks/results/classifier.json
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="spamassassin")
    ap.add_argument("--teacher", default="all-minilm-l6-v2")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--student-steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--teacher-lr", type=float, default=1e-4)
    ap.add_argument("--student-lr", type=float, default=1e-3)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--compression-x", type=float, default=50.0)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.7)
    ap.add_argument("--hidden-weight", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="classifier")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from edgestill.data.labelled import load_splits
    from edgestill.distill.classifier import KDConfig, StudentConfig, TrainConfig, build_student, distill_classifier, finetune
    from edgestill.evaluate.classification import evaluate_classifier, predict_logits, retention, tfidf_baseline
    from edgestill.models.encoder import load_encoder_classifier, save_classifier, tokenize
    from edgestill.models.lowrank import stored_bytes, stored_params

    t_all = time.perf_counter()
    rows, timings = {}, {}
    splits = load_splits(args.data, seed=args.seed)

    t0 = time.perf_counter()
    rows["tfidf_logreg"] = tfidf_baseline(splits, seed=args.seed)
    timings["tfidf_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    teacher, tok, _ = load_encoder_classifier(args.teacher, splits.label_map)
    t_cfg = TrainConfig(steps=args.teacher_steps, batch_size=args.batch_size, lr=args.teacher_lr, max_len=args.max_len,
                        eval_every=args.teacher_steps, seed=args.seed)
    ft = finetune(teacher, tok, splits, t_cfg)
    timings["teacher_finetune_s"] = time.perf_counter() - t0
    teacher_params = stored_params(teacher)
    rows["teacher"] = {"test": ft["test"], "params": teacher_params, "bytes_fp32": stored_bytes(teacher),
                       "history": ft["history"], "train": ft["config"]}

    t0 = time.perf_counter()
    student, s_tok, table, info = build_student(teacher, tok, splits.train.texts,
                                                StudentConfig(num_layers=args.num_layers, max_len=args.max_len,
                                                              compression_x=args.compression_x))
    timings["student_build_s"] = time.perf_counter() - t0
    s_test = tokenize(s_tok, splits.test.texts, args.max_len)
    rows["student_sliced"] = {"test": evaluate_classifier(student, s_test, splits.ids("test"))}
    t_logits = predict_logits(teacher, tokenize(tok, splits.test.texts, args.max_len), desc="teacher test logits")

    s_cfg = TrainConfig(steps=args.student_steps, batch_size=args.batch_size, lr=args.student_lr, max_len=args.max_len,
                        eval_every=max(1, args.student_steps // 4), seed=args.seed)
    variants = {"student_ce": KDConfig(alpha=0.0, hidden_weight=0.0),
                "student_kd": KDConfig(temperature=args.temperature, alpha=args.alpha, hidden_weight=args.hidden_weight)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kd in variants.items():
            t0 = time.perf_counter()
            s = copy.deepcopy(student)
            res = distill_classifier(teacher, s, tok, splits, table, s_tok, s_cfg, kd)
            timings[f"{name}_s"] = time.perf_counter() - t0
            folder = save_classifier(s, s_tok, splits.label_map, Path(tmp) / name)
            file_bytes = (folder / "model.safetensors").stat().st_size
            s_logits = predict_logits(s, s_test)
            rows[name] = {
                "test": res["test"], **retention(res["test"], ft["test"]),
                "top1_agreement": float((s_logits.argmax(-1) == t_logits.argmax(-1)).mean()),
                "params": stored_params(s), "student_file_bytes": file_bytes,
                "compression_x_fp32": teacher_params * 4 / file_bytes,
                "compression_x_fp16": teacher_params * 2 / file_bytes,
                "history": res["history"], "best_step": res["best_step"], "kd": res["config"]["kd"],
            }
    rows["student_sliced"].update(retention(rows["student_sliced"]["test"], ft["test"]))
    timings["total_s"] = time.perf_counter() - t_all
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    write_result(args.name, {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads, "args": vars(args),
        "data": {"name": args.data, "split": "seeded stratified 70/10/20, scored on test", **splits.summary()},
        "student": {k: v for k, v in info.items() if k != "config"}, "results": rows, "timings_s": timings,
    })
    for name, r in rows.items():
        extra = f"  {r['compression_x_fp32']:.1f}x smaller (fp32 file)" if "compression_x_fp32" in r else ""
        print(f"{name:15s} acc {r['test']['accuracy']:.4f}  macro-F1 {r['test']['macro_f1']:.4f}{extra}")


if __name__ == "__main__":
    main()
