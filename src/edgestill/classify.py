"""The classifier track as two runs: fine-tune a teacher encoder, then shrink it into an ONNX student.

    edgestill finetune --task classification --data train.csv            # -> runs/finetune-train/
    edgestill shrink --task classification --teacher runs/finetune-train  # -> runs/shrink-classifier-train/
    edgestill export --format onnx runs/shrink-classifier-train --type int8

`finetune_run` fine-tunes an encoder (default all-MiniLM-L6-v2) with a classification head on the
train split (model selection on val) and saves it as a HF folder + label_map.json: the run folder
itself is the teacher folder. Its `edgestill.json` records the data and split it was trained on, so
`shrink` reuses exactly that split and the held-out test rows stay unseen by teacher and student.

`shrink_classifier_run` builds the student from the teacher (`distill.classifier.build_student`:
keep `student.num_layers` layers, cut positions to `student.max_len`, trim the vocabulary to the
training texts, factorize every matrix by truncated SVD to ≤ teacher params / `student.compression_x`),
distils it (`distill_classifier`: α·T²·KL + (1−α)·CE [+ hidden MSE]), exports it to ONNX
(`export.onnx_classifier`, `eval.onnx_type` f32 | int8 | int4) and measures, on the held-out test split:

- teacher (PyTorch) vs student (the ONNX file in onnxruntime) accuracy and macro-F1, and retention
  (student ÷ teacher, shared/BENCHMARKS.md); the PyTorch student, the untrained cut and TF-IDF +
  logistic regression as context rows; onnxruntime-vs-PyTorch prediction agreement;
- compression_x_fp32 / _fp16 = teacher params × 4 (× 2) ÷ bytes of model.onnx (tokenizer bytes listed apart),
  and the teacher's fp32 safetensors bytes ÷ model.onnx bytes;
- latency per example in onnxruntime (batch 1, `eval.threads` threads, unpadded test texts): teacher
  (exported to fp32 ONNX for the measurement, then deleted) and student alternated in each repeat,
  median and [min, max]; speedup_x = teacher median ÷ student median;
- the run's shrink curve: the same student exported in each of `eval.curve_types` (f32, int8, int4 by
  default; kept as onnx/ and onnx-<type>/), each scored and timed like the deployable file
  (`metrics.json` "curve", `shrink_curve.png`, a table in report.md).

Runs are RunDir folders: built in `<out>.partial/`, renamed when finished, never replacing a finished run
without `--overwrite`. A killed shrink resumes after the saved student (training is the costly part).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import shutil
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from edgestill.data.labelled import ALIASES, LABEL_MAP_FILE
from edgestill.distill.classifier import KDConfig, StudentConfig, TrainConfig
from edgestill.errors import EdgestillError
from edgestill.files import write_text_atomic
from edgestill.runs import RunDir

log = logging.getLogger(__name__)

TASK = "classification"  # the marker in config.yaml that makes a run folder a classifier run
TEACHER_INFO = "edgestill.json"


@dataclass
class LabelledDataConfig:
    path: str = ""  # a .csv/.tsv/.jsonl file, or spamassassin / drugreview
    test_path: str | None = None  # a separate test file (else test is carved from `path`)
    text_column: str = "text"
    label_column: str = "label"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    encoding_errors: str = "strict"  # or "replace"


@dataclass
class ClassifierEvalConfig:
    onnx_type: str = "f32"  # the student's deployable file: f32, int8 (DequantizeLinear) or int4 (MatMulNBits)
    threads: int = 2  # onnxruntime intra-op threads for the latency measurement
    latency_examples: int = 32  # test texts timed one at a time (batch 1)
    latency_repeats: int = 5
    teacher_latency: bool = True  # export the teacher to ONNX (temporarily) to time it in the same runtime
    tfidf_baseline: bool = True
    # the run's own shrink curve: the distilled student exported in each of these ONNX types (kept as onnx-<type>/),
    # scored and timed with the rest; [] to skip
    curve_types: list = field(default_factory=lambda: ["f32", "int8", "int4"])


@dataclass
class FinetuneConfig:
    task: str = TASK
    stage: str = "finetune"
    teacher: str = "all-minilm-l6-v2"  # the base encoder: the embedded default, a HF folder or id
    data: LabelledDataConfig = field(default_factory=LabelledDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=300, lr=1e-4, max_len=128, eval_every=100))
    output_dir: str = ""


@dataclass
class ClassifierShrinkConfig:
    task: str = TASK
    stage: str = "shrink"
    teacher: str = ""  # a folder written by `edgestill finetune --task classification`
    data: LabelledDataConfig = field(default_factory=LabelledDataConfig)  # empty path: the teacher's own data + split
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, lr=1e-3, max_len=128, eval_every=100))
    kd: KDConfig = field(default_factory=lambda: KDConfig(temperature=2.0, alpha=0.7))
    eval: ClassifierEvalConfig = field(default_factory=ClassifierEvalConfig)
    output_dir: str = ""


QUICK = {
    "finetune": ["train.steps=60", "train.max_len=64", "train.eval_every=30"],
    "shrink": ["train.steps=100", "student.max_len=64", "train.eval_every=50", "eval.latency_examples=16",
               "eval.latency_repeats=3"],
}


# ---------------------------------------------------------------- configs


def _plain(obj):
    """asdict with tuples as lists (YAML-safe)."""
    return json.loads(json.dumps(asdict(obj), default=str))


def _coerce(value, hint, key: str):
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise EdgestillError(f"config key '{key}' cannot be null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return _coerce(value, args[0], key)
    if hint is float and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads 3e-3 (no dot) as a string
        except (TypeError, ValueError):
            raise EdgestillError(f"config key '{key}' must be a number, got {value!r}") from None
    if hint in (int, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise EdgestillError(f"config key '{key}' must be {hint.__name__}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise EdgestillError(f"config key '{key}' must be a list, got {value!r}")
        return type(value)(value) if origin is list else tuple(value)
    if origin is dict and not isinstance(value, dict):
        raise EdgestillError(f"config key '{key}' must be a mapping, got {value!r}")
    return value


def _set(obj, key: str, value, full: str | None = None) -> None:
    full = full or key
    head, _, rest = key.partition(".")
    names = [f.name for f in dataclasses.fields(obj)]
    if head not in names:
        near = difflib.get_close_matches(head, names, n=1)
        raise EdgestillError(f"unknown config key '{full}'" + (f"; did you mean '{full.rsplit(head, 1)[0]}{near[0]}'?" if near
                                                                else f"; valid keys here: {', '.join(names)}"))
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            _set(current, rest, value, full)
            return
        if not isinstance(value, dict):
            raise EdgestillError(f"config section '{full}' must be a mapping, got {value!r}")
        for k, v in value.items():
            _set(current, str(k), v, f"{full}.{k}")
        return
    if rest:
        raise EdgestillError(f"config key '{full}': '{head}' is not a section")
    setattr(obj, head, _coerce(value, typing.get_type_hints(type(obj))[head], full))


def load_classifier_config(stage: str, path: str | Path | None = None, overrides: list[str] | None = None,
                           quick: bool = False, values: dict | None = None):
    """Defaults <- recipe YAML <- quick profile <- key=value overrides <- `values` (CLI flags, set verbatim)."""
    if stage not in ("finetune", "shrink"):
        raise EdgestillError(f"unknown classifier stage '{stage}'")
    cfg = FinetuneConfig() if stage == "finetune" else ClassifierShrinkConfig()
    if path is not None:
        from edgestill.config import read_recipe

        for k, v in read_recipe(path).items():
            _set(cfg, str(k), v)
    for o in (QUICK[stage] if quick else []) + list(overrides or []):
        if "=" not in o:
            raise EdgestillError(f"override '{o}' is not of the form section.key=value (e.g. train.steps=100)")
        key, raw = o.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise EdgestillError(f"override '{o}': value is not valid YAML ({e.__class__.__name__})") from None
        _set(cfg, key.strip(), value)
    for key, value in (values or {}).items():
        if value is not None:
            _set(cfg, key, value)
    if cfg.task != TASK or cfg.stage != stage:
        raise EdgestillError(f"task/stage are fixed for this command ({TASK}/{stage})")
    if stage == "shrink":
        cfg.train.max_len = cfg.student.max_len  # the student's position table decides the length everywhere
        for t in (cfg.eval.onnx_type, *cfg.eval.curve_types):
            if t not in ("f32", "int8", "int4"):
                raise EdgestillError(f"ONNX type '{t}' (eval.onnx_type / eval.curve_types): choose f32, int8 or int4")
    return cfg


def _data_name(spec: str) -> str:
    return spec if spec in ALIASES else Path(spec).stem or "data"


def _data_record(data: LabelledDataConfig) -> dict:
    """The data config with file paths made absolute (so a teacher's record means the same file from anywhere)."""
    d = asdict(data)
    for k in ("path", "test_path"):
        if d[k] and d[k] not in ALIASES and Path(d[k]).expanduser().exists():
            d[k] = str(Path(d[k]).expanduser().resolve())
    return d


def _load_splits(data: LabelledDataConfig):
    from edgestill.data.labelled import load_splits

    if not data.path:
        raise EdgestillError("no labelled data: give --data train.csv (text and label columns), a .jsonl, "
                             f"or one of {list(ALIASES)}")
    return load_splits(data.path, data.test_path, data.text_column, data.label_column, data.val_fraction,
                       data.test_fraction, data.seed, data.encoding_errors)


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


# ---------------------------------------------------------------- fine-tuning the teacher


def finetune_run(cfg: FinetuneConfig, overwrite: bool = False) -> Path:
    """Fine-tune `cfg.teacher` on `cfg.data`; the finished run folder is the classifier's HF folder."""
    import torch

    from edgestill.distill.classifier import finetune
    from edgestill.evaluate.environment import environment
    from edgestill.models.encoder import load_encoder_classifier, save_classifier
    from edgestill.models.lowrank import stored_params

    splits = _load_splits(cfg.data)  # bad data fails before any folder is made
    out = cfg.output_dir or f"runs/finetune-{_data_name(cfg.data.path)}"
    cfg.output_dir = out
    run = RunDir(out, _plain(cfg), overwrite=overwrite)
    resumed = run.open()
    log.info("%s run folder %s", "resuming" if resumed else "new", run.path)
    with run.cleanup_on_failure():  # a run that fails before any work leaves no folder behind
        done = run.path / "finetune.json"
        if resumed and done.is_file() and (run.path / LABEL_MAP_FILE).is_file():
            log.info("the fine-tuned teacher is already saved in %s; finishing", run.path)
            result = json.loads(done.read_text())
            model, _, label_map = load_encoder_classifier(str(run.path))
        else:
            model, tokenizer, label_map = load_encoder_classifier(cfg.teacher, splits.label_map)
            torch.manual_seed(cfg.train.seed)
            result = finetune(model, tokenizer, splits, cfg.train)
            record = {"task": TASK, "role": "teacher", "base_model": cfg.teacher, "data": _data_record(cfg.data),
                      "max_len": cfg.train.max_len, "test": result["test"]}
            staged = save_classifier(model, tokenizer, label_map, run.path / "model.tmp", extra=record)
            for f in staged.iterdir():  # the run folder itself is the HF folder (`--teacher RUN`)
                os.replace(f, run.path / f.name)
            shutil.rmtree(staged, ignore_errors=True)
            _write_json(done, result)
        metrics = {
            "task": TASK, "stage": "finetune", "base_model": cfg.teacher,
            "teacher": {"params": stored_params(model), "file_bytes": (run.path / "model.safetensors").stat().st_size,
                        "test": result["test"], "best_val_macro_f1": result["best_val_macro_f1"], "best_step": result["best_step"]},
            "data": {"spec": _data_record(cfg.data), "split": "seeded stratified; test never used for training or selection",
                     **splits.summary()},
            "train": asdict(cfg.train), "history": result["history"], "environment": environment(),
        }
        _write_json(run.path / "metrics.json", metrics)
        t = result["test"]
        write_text_atomic(run.path / "report.md", "\n".join([
            f"# Fine-tuned teacher: {cfg.teacher} on {cfg.data.path}", "",
            f"Labels: {', '.join(label_map.labels)}. Split: train {len(splits.train)} / val {len(splits.val)} / "
            f"test {len(splits.test)} (seed {cfg.data.seed}).", "",
            "| held-out test | accuracy | macro-F1 |", "|---|---|---|",
            f"| teacher | {t['accuracy']:.4f} | {t['macro_f1']:.4f} |", "",
            f"{metrics['teacher']['params']:,} parameters, model.safetensors {metrics['teacher']['file_bytes']:,} bytes; "
            f"{cfg.train.steps} steps, best validation macro-F1 {result['best_val_macro_f1']:.4f} at step {result['best_step']}.",
            "", f"Next: `edgestill shrink --task classification --teacher {run.final}`", ""]))
    final = run.finish()
    print(f"teacher test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f} on {t['n']} held-out examples")
    print(f"run folder: {final}  (shrink it with: edgestill shrink --task classification --teacher {final})", flush=True)
    return final


# ---------------------------------------------------------------- shrinking it


def _teacher_record(teacher: str) -> dict:
    path = Path(teacher) / TEACHER_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def _resolve_data(cfg: ClassifierShrinkConfig, record: dict) -> bool:
    """Fill cfg.data from the teacher's record when not given; True when data + split match the teacher's."""
    recorded = record.get("data")
    if not cfg.data.path:
        if not recorded:
            raise EdgestillError(f"teacher '{cfg.teacher}' does not record its training data; give --data (the file it was "
                                 "fine-tuned on, with the same split settings)")
        for k, v in recorded.items():
            if k in {f.name for f in dataclasses.fields(LabelledDataConfig)}:
                setattr(cfg.data, k, v)
        return True
    if recorded is None:
        log.warning("teacher '%s' does not record its training data: its held-out scores are only fair if it never saw "
                    "the test split of %s", cfg.teacher, cfg.data.path)
        return False
    same = _data_record(cfg.data) == {k: recorded.get(k) for k in asdict(cfg.data)}
    if not same:
        log.warning("the teacher was fine-tuned on %s (split seed %s); this run uses %s (seed %s): the teacher may have "
                    "seen some of this test split, so its score can be optimistic", recorded.get("path"),
                    recorded.get("seed"), cfg.data.path, cfg.data.seed)
    return same


def _file_bytes(folder: Path, names) -> int:
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def shrink_classifier_run(cfg: ClassifierShrinkConfig, overwrite: bool = False) -> Path:
    """Build, distil, export and measure a student of a fine-tuned classifier (see the module docstring)."""
    import tempfile

    import torch

    from edgestill.distill.classifier import build_student, distill_classifier
    from edgestill.evaluate.classification import evaluate_classifier, predict_logits, retention, scores, tfidf_baseline
    from edgestill.evaluate.environment import environment
    from edgestill.export.onnx import onnx_session
    from edgestill.export.onnx_classifier import (
        export_classifier_onnx,
        measure_latency,
        onnx_classifier_logits,
        single_inputs,
    )
    from edgestill.models.encoder import load_encoder_classifier, save_classifier, tokenize, trim_coverage
    from edgestill.models.lowrank import stored_params

    if not cfg.teacher:
        raise EdgestillError("shrink --task classification needs --teacher: a folder from `edgestill finetune --task "
                             "classification --data ...`")
    if not (Path(cfg.teacher) / LABEL_MAP_FILE).is_file():
        raise EdgestillError(f"teacher '{cfg.teacher}' has no {LABEL_MAP_FILE}: fine-tune one first with "
                             "`edgestill finetune --task classification --data ...`")
    record = _teacher_record(cfg.teacher)
    data_matches = _resolve_data(cfg, record)
    splits = _load_splits(cfg.data)
    teacher, t_tok, label_map = load_encoder_classifier(cfg.teacher, splits.label_map)
    teacher_max_len = int(record.get("max_len") or cfg.student.max_len)
    out = cfg.output_dir or f"runs/shrink-classifier-{_data_name(cfg.data.path)}"
    cfg.output_dir = out
    run = RunDir(out, _plain(cfg), overwrite=overwrite)
    resumed = run.open()
    log.info("%s run folder %s", "resuming" if resumed else "new", run.path)
    with run.cleanup_on_failure():  # a run that fails before any work leaves no folder behind
        max_len = cfg.student.max_len
        test_ids = splits.ids("test")
        k = len(label_map)

        # 1-2. student: cut from the teacher, distilled; skipped on resume once saved
        student_dir, distill_file = run.path / "student", run.path / "distill.json"
        if resumed and distill_file.is_file() and (student_dir / LABEL_MAP_FILE).is_file():
            log.info("resuming after the saved student in %s", student_dir)
            distilled = json.loads(distill_file.read_text())
            student, s_tok, _ = load_encoder_classifier(str(student_dir))
        else:
            torch.manual_seed(cfg.train.seed)
            student, s_tok, table, info = build_student(teacher, t_tok, splits.train.texts, cfg.student)
            log.info("student: layers %s of the teacher, vocab %d of %d, %s params (%.1fx fewer)", info["teacher_layers"],
                     info["vocab_kept"], info["teacher_vocab"], f"{info['student_params']:,}", info["params_x_smaller"])
            sliced = evaluate_classifier(student, tokenize(s_tok, splits.test.texts, max_len), test_ids)
            result = distill_classifier(teacher, student, t_tok, splits, table, s_tok, cfg.train, cfg.kd)
            save_classifier(student, s_tok, label_map, student_dir,
                            extra={"task": TASK, "role": "student", "teacher": str(cfg.teacher), "max_len": max_len})
            distilled = {"student": {k2: v for k2, v in info.items() if k2 != "config"}, "sliced_untrained_test": sliced,
                         "history": result["history"], "best_step": result["best_step"], "test_pytorch": result["test"]}
            _write_json(distill_file, distilled)

        # 3. the deployable artifact, checked against PyTorch on the held-out split
        onnx_dir = run.path / "onnx"
        exported = export_classifier_onnx(student_dir, onnx_dir, cfg.eval.onnx_type, parity_texts=splits.test.texts,
                                          max_len=max_len, threads=cfg.eval.threads)
        session = onnx_session(onnx_dir / "model.onnx", cfg.eval.threads)
        test_inputs = tokenize(s_tok, splits.test.texts, max_len)
        s_onnx_pred = onnx_classifier_logits(session, test_inputs).argmax(-1)
        s_onnx_test = scores(test_ids, s_onnx_pred, k)

        # 4. teacher on the same split (PyTorch, its own tokenizer and length)
        t_logits = predict_logits(teacher, tokenize(t_tok, splits.test.texts, teacher_max_len), desc="teacher test logits")
        t_pred = t_logits.argmax(-1)
        t_test = scores(test_ids, t_pred, k)

        # 4b. the run's shrink curve: the same student in each ONNX type (the deployable one is already exported)
        def latency_name(onnx_type: str) -> str:
            return "student" if onnx_type == cfg.eval.onnx_type else f"student-{onnx_type}"

        curve_sessions, curve = {}, []
        for t in dict.fromkeys(cfg.eval.curve_types):
            if t == cfg.eval.onnx_type:
                folder, report, sess, pred = onnx_dir, exported, session, s_onnx_pred
            else:
                folder = run.path / f"onnx-{t}"
                report = export_classifier_onnx(student_dir, folder, t, parity_texts=splits.test.texts, max_len=max_len,
                                                threads=cfg.eval.threads)
                sess = onnx_session(folder / "model.onnx", cfg.eval.threads)
                pred = onnx_classifier_logits(sess, test_inputs).argmax(-1)
            test = scores(test_ids, pred, k)
            curve.append({"type": t, "folder": str(run.final / folder.name), "onnx_bytes": report["file_bytes"], "test": test,
                          **retention(test, t_test), "top1_agreement_with_teacher": float((pred == t_pred).mean()),
                          "onnx_parity_vs_pytorch": report.get("parity_vs_pytorch")})
            curve_sessions[latency_name(t)] = sess
        s_pt_logits = predict_logits(student, test_inputs, desc="student test logits")

        # 5. sizes from real file bytes
        teacher_params = stored_params(teacher)
        onnx_bytes = exported["file_bytes"]
        tokenizer_bytes = _file_bytes(onnx_dir, ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"))
        teacher_files = sorted(Path(cfg.teacher).glob("*.safetensors"))
        teacher_file_bytes = sum(f.stat().st_size for f in teacher_files)

        # 6. latency in onnxruntime, batch 1, teacher and student alternated
        texts = splits.test.texts[: max(1, cfg.eval.latency_examples)]
        student_inputs = single_inputs(s_tok, texts, max_len)
        systems = {"student": (session, student_inputs), **{name: (sess, student_inputs) for name, sess in curve_sessions.items()}}
        teacher_onnx_bytes = None
        with tempfile.TemporaryDirectory(dir=run.path, prefix=".teacher-onnx-") as tmp:
            if cfg.eval.teacher_latency:
                t_export = export_classifier_onnx(cfg.teacher, Path(tmp), "f32", max_len=teacher_max_len)
                teacher_onnx_bytes = t_export["file_bytes"]
                systems = {"teacher": (onnx_session(Path(tmp) / "model.onnx", cfg.eval.threads),
                                       single_inputs(t_tok, texts, teacher_max_len)), **systems}
            latency = measure_latency(systems, cfg.eval.latency_repeats)
            systems.clear()

        # 6b. what the vocabulary trim costs on unseen text: texts the student's tokenizer splits differently
        vocab_trim = None
        if distilled["student"]["vocab_kept"] < distilled["student"]["teacher_vocab"]:
            cov = trim_coverage(t_tok, s_tok, splits.test.texts, max_len)
            changed = cov.pop("changed")
            vocab_trim = {**cov, "fallback": "unseen pieces -> shorter kept WordPiece pieces, else [UNK]",
                          "test_texts_changed": int(changed.sum())}
            for name, mask in (("changed", changed), ("unchanged", ~changed)):
                if mask.any():
                    sub = test_ids[mask]
                    vocab_trim[f"student_accuracy_{name}"] = float((s_onnx_pred[mask] == sub).mean())
                    vocab_trim[f"teacher_accuracy_{name}"] = float((t_pred[mask] == sub).mean())

        baselines = {"student_sliced_untrained": {"test": distilled["sliced_untrained_test"],
                                                  **retention(distilled["sliced_untrained_test"], t_test)},
                     "student_pytorch": {"test": scores(test_ids, s_pt_logits.argmax(-1), k)}}
        if cfg.eval.tfidf_baseline:
            baselines["tfidf_logreg"] = tfidf_baseline(splits, seed=cfg.data.seed)

        metrics = {
            "task": TASK, "stage": "shrink",
            "teacher": {"path": str(cfg.teacher), "params": teacher_params, "fp32_bytes": teacher_params * 4,
                        "safetensors_bytes": teacher_file_bytes, "onnx_f32_bytes": teacher_onnx_bytes, "max_len": teacher_max_len,
                        "test": t_test, **latency.get("teacher", {})},
            "student": {"artifact": str(run.final / "onnx" / "model.onnx"), "onnx_type": cfg.eval.onnx_type,
                        "params": distilled["student"]["student_params"], "onnx_bytes": onnx_bytes,
                        "tokenizer_bytes": tokenizer_bytes,
                        "max_len": max_len, "layers_kept": distilled["student"]["teacher_layers"],
                        "vocab_kept": distilled["student"]["vocab_kept"], "ranks": distilled["student"]["ranks"],
                        "test": s_onnx_test, **latency["student"]},
            **retention(s_onnx_test, t_test),
            "top1_agreement_with_teacher": float((s_pt_logits.argmax(-1) == t_pred).mean()),
            "compression_x_fp32": teacher_params * 4 / onnx_bytes,
            "compression_x_fp16": teacher_params * 2 / onnx_bytes,
            "compression_x_teacher_file": teacher_file_bytes / onnx_bytes if teacher_file_bytes else None,
            "speedup_x": (latency["teacher"]["latency_ms_per_example"] / latency["student"]["latency_ms_per_example"]
                          if "teacher" in latency else None),
            "onnx_parity_vs_pytorch": exported.get("parity_vs_pytorch"),
            "vocab_trim": vocab_trim,
            "baselines": baselines,
            "data": {"spec": _data_record(cfg.data), "same_split_as_teacher_finetuning": data_matches,
                     "scored_on": "test split (never used for training, distillation or model selection)", **splits.summary()},
            "train": {"best_step": distilled["best_step"], "steps": cfg.train.steps, "kd": asdict(cfg.kd)},
            "history": distilled["history"],
            "environment": {**environment(), "onnxruntime_threads": cfg.eval.threads, "latency_batch_size": 1},
        }
        for c in curve:
            lat = latency[latency_name(c["type"])]
            c.update({"compression_x_fp32": teacher_params * 4 / c["onnx_bytes"], "compression_x_fp16": teacher_params * 2 / c["onnx_bytes"],
                      "latency_ms_per_example": lat["latency_ms_per_example"],
                      "speedup_x": (latency["teacher"]["latency_ms_per_example"] / lat["latency_ms_per_example"]
                                    if "teacher" in latency else None)})
        metrics["curve"] = curve
        if curve:
            _plot_curve(curve, run.path / "shrink_curve.png", str(cfg.teacher))
        _write_json(run.path / "metrics.json", metrics)
        write_text_atomic(run.path / "report.md", classifier_report(metrics))
    final = run.finish()
    print(summary_line(metrics))
    print(f"run folder: {final}", flush=True)
    return final


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def summary_line(m: dict) -> str:
    t, s = m["teacher"]["test"], m["student"]["test"]
    speed = f", {m['speedup_x']:.1f}x faster per example" if m.get("speedup_x") else ""
    return (f"teacher acc {t['accuracy']:.4f} / macro-F1 {t['macro_f1']:.4f}; student ({m['student']['onnx_type']} ONNX) "
            f"acc {s['accuracy']:.4f} / macro-F1 {s['macro_f1']:.4f} (retention {m['retention_accuracy']:.3f} / "
            f"{m['retention_macro_f1']:.3f}); {m['compression_x_fp32']:.1f}x smaller than fp32 "
            f"({m['compression_x_fp16']:.1f}x vs fp16){speed}")


def _plot_curve(curve: list[dict], path: Path, teacher: str) -> None:
    """shrink_curve.png of one run: accuracy retention and agreement against compression, one point per ONNX type."""
    from edgestill.evaluate.shrink_curve import ShrinkPoint, plot_shrink_curve

    points = [ShrinkPoint(name=c["type"], compression_x_fp32=c["compression_x_fp32"], retention=c["retention_accuracy"],
                          top1_agreement=c["top1_agreement_with_teacher"], bytes=c["onnx_bytes"]) for c in curve]
    plot_shrink_curve(points, path, title=f"Classifier shrink curve: {Path(teacher).name} -> this run's student, per ONNX type",
                      retention_label="retention (student ÷ teacher accuracy, test split)",
                      edgestill_label="student (slice + low-rank + KD), ONNX type")


def classifier_report(m: dict) -> str:
    """A short report.md from metrics.json."""
    t, s = m["teacher"], m["student"]
    rows = [("teacher (PyTorch)", t["test"]), (f"student, {s['onnx_type']} ONNX in onnxruntime", s["test"])]
    names = {"student_sliced_untrained": "student cut from the teacher, untrained", "student_pytorch": "student (PyTorch)",
             "tfidf_logreg": "TF-IDF + logistic regression (baseline)"}
    rows += [(names.get(name, name), b["test"]) for name, b in m["baselines"].items()]
    lines = [f"# Classifier shrink: {t['path']}", "",
             f"Scored on the {m['data']['scored_on']}: {m['data']['test']['n']} examples.", "",
             "| model | accuracy | macro-F1 |", "|---|---|---|"]
    lines += [f"| {name} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} |" for name, r in rows]
    par = m.get("onnx_parity_vs_pytorch") or {}
    lat_t = f"{t['latency_ms_per_example']:.2f} ms (spread {t['latency_ms_spread'][0]:.2f}–{t['latency_ms_spread'][1]:.2f})" \
        if "latency_ms_per_example" in t else "not measured"
    lines += [
        "", f"- retention (student ÷ teacher): accuracy {m['retention_accuracy']:.4f}, macro-F1 {m['retention_macro_f1']:.4f}",
        f"- student and teacher predict the same label on {m['top1_agreement_with_teacher']:.4f} of the test examples",
        f"- size: teacher {t['params']:,} params ({t['fp32_bytes']:,} bytes fp32); student model.onnx {s['onnx_bytes']:,} bytes "
        f"(+ tokenizer {s['tokenizer_bytes']:,} bytes): compression_x_fp32 {m['compression_x_fp32']:.1f}, "
        f"compression_x_fp16 {m['compression_x_fp16']:.1f}",
        f"- student: teacher layers {s['layers_kept']}, vocabulary {s['vocab_kept']:,} tokens, max {s['max_len']} tokens, "
        f"{s['params']:,} params (low-rank factors)",
        f"- latency per example, onnxruntime, batch 1, {m['environment']['onnxruntime_threads']} threads, median of "
        f"{s['repeats']} alternated repeats over {s['examples']} texts: student {s['latency_ms_per_example']:.2f} ms "
        f"(spread {s['latency_ms_spread'][0]:.2f}–{s['latency_ms_spread'][1]:.2f}), teacher {lat_t}; "
        "speed-up " + (f"{m['speedup_x']:.2f}x" if m.get("speedup_x") else "not measured"),
        f"- onnxruntime vs PyTorch student: same prediction on {_pct(par.get('prediction_agreement'))} of "
        f"{par.get('examples', 0)} test examples (max |logit diff| {par.get('max_abs_diff', float('nan')):.3g})",
        f"- machine: {m['environment'].get('cpu_cores')} cores; commit {m['environment'].get('git_commit')}; "
        f"{m['environment'].get('date')}",
    ]
    vt = m.get("vocab_trim")
    if vt:
        acc = (f"; student accuracy on them {vt['student_accuracy_changed']:.4f} (teacher {vt['teacher_accuracy_changed']:.4f})"
               if "student_accuracy_changed" in vt else "")
        lines.append(f"- vocabulary trim on the test split: {vt['test_texts_changed']} texts ({_pct(vt['texts_changed_fraction'])}) "
                     f"tokenize differently ({vt['fallback']}); [UNK] tokens {_pct(vt['unk_fraction'])} vs "
                     f"{_pct(vt['full_unk_fraction'])} with the full vocabulary{acc}")
    if m.get("curve"):
        lines += ["", "Shrink curve (`shrink_curve.png`): the same student in each ONNX type, scored in onnxruntime on the test split.",
                  "", "| ONNX type | MB | × fp32 | accuracy | macro-F1 | retention (acc / F1) | agreement with teacher | ms/example | speed-up |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in m["curve"]:
            sp = f"{c['speedup_x']:.1f}×" if c.get("speedup_x") else "—"
            lines.append(f"| {c['type']} | {c['onnx_bytes'] / 1e6:.2f} | {c['compression_x_fp32']:.1f}× | {c['test']['accuracy']:.4f} | "
                         f"{c['test']['macro_f1']:.4f} | {c['retention_accuracy']:.3f} / {c['retention_macro_f1']:.3f} | "
                         f"{c['top1_agreement_with_teacher']:.3f} | {c['latency_ms_per_example']:.2f} | {sp} |")
    if not m["data"]["same_split_as_teacher_finetuning"]:
        lines.append("- WARNING: the data or split differs from the teacher's fine-tuning; the teacher may have seen test rows.")
    if t.get("max_len") != s["max_len"]:
        lines.append(f"- note: the teacher reads up to {t.get('max_len')} tokens, the student {s['max_len']}.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- export of a finished run


def is_classifier_run(run_dir: str | Path) -> bool:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return False
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return False
    return isinstance(cfg, dict) and cfg.get("task") == TASK


def export_classifier_run(run_dir: str | Path, tensor_type: str | None = None, out: str | Path | None = None) -> dict:
    """Export a finished classifier run (a shrink run's student, or a finetune run's teacher) to ONNX.

    Default folder: RUN/onnx for the run's own type, RUN/onnx-<type> for another. The parity check runs on
    the run's held-out test split.
    """
    from edgestill.export.onnx_classifier import export_classifier_onnx

    run_dir = Path(run_dir)
    if not (run_dir / "DONE").is_file():
        raise EdgestillError(f"'{run_dir}' is not a finished edgestill run (no DONE marker); finish it first")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    stage = saved.get("stage")
    cfg = load_classifier_config(stage)
    _set(cfg, "data", saved.get("data") or {})
    if stage == "shrink":
        model_dir, max_len = run_dir / "student", int(saved.get("student", {}).get("max_len", 128))
        default_type = saved.get("eval", {}).get("onnx_type", "f32")
    else:
        model_dir, max_len, default_type = run_dir, int(saved.get("train", {}).get("max_len", 128)), "f32"
    tensor_type = tensor_type or default_type
    if tensor_type not in ("f32", "int8", "int4"):
        raise EdgestillError(f"--type {tensor_type} is not an ONNX classifier type; choose f32, int8 or int4")
    if out is None:
        out = run_dir / ("onnx" if tensor_type == default_type else f"onnx-{tensor_type}")
    splits = _load_splits(cfg.data)
    return export_classifier_onnx(model_dir, Path(out), tensor_type, parity_texts=splits.test.texts, max_len=max_len)


__all__ = ["FinetuneConfig", "ClassifierShrinkConfig", "LabelledDataConfig", "ClassifierEvalConfig", "load_classifier_config",
           "finetune_run", "shrink_classifier_run", "export_classifier_run", "is_classifier_run", "classifier_report"]
