"""The classifier track as two runs: fine-tune a teacher encoder, then shrink it into an ONNX student.

    edgestill finetune --task classification --data train.csv            # finetune()          -> runs/finetune-train/
    edgestill shrink --task classification --teacher runs/finetune-train  # shrink_classifier() -> runs/shrink-classifier-train/
    edgestill export --format onnx runs/shrink-classifier-train --type int8   # export_classifier()

`finetune` fine-tunes an encoder (default all-MiniLM-L6-v2) with a classification head on the train split to
convergence (early stopping on the val split: the best val macro-F1 state, stopped after `train.patience` validations
without improvement, at most `train.steps`) and saves it as a HF folder + label_map.json: the run folder itself is the
teacher folder. Its metrics carry the val curve, the step chosen, the majority-class and TF-IDF rows and the verdict. Its
`edgestill.json` records the data and split it was trained on, so `shrink` reuses exactly that split and the
held-out test rows stay unseen by teacher and student.

`shrink_classifier` builds the student from the teacher (`distill.classifier.build_student`: keep
`student.num_layers` layers, cut positions to `student.max_len`, trim the vocabulary to the training texts,
factorize every matrix by truncated SVD to <= teacher params / `student.compression_x`), distils it
(`distill_classifier`: a*T^2*KL + (1-a)*CE [+ hidden MSE]), exports it to ONNX (`eval.onnx_type` f32 | int8 | int4)
and measures, on the held-out test split:

- teacher (PyTorch) vs student (the ONNX file in onnxruntime) accuracy and macro-F1, and retention (student / teacher,
  docs/references.md#measurement-conventions); the majority class and TF-IDF + logistic regression as the baselines
  every table carries, the PyTorch student and the untrained cut as context rows;
- the verdict: a model (student, teacher, curve point) whose test accuracy is not above the majority class's is
  FAILED (`beats_majority: false`; its retention is shown, labelled as not a result), and whether it beats TF-IDF + LR;
- compression_x_fp32 / _fp16 = teacher params x 4 (x 2) / bytes of every file the device loads (model.onnx, the
  trimmed tokenizer, label_map.json, export_report.json); `_weights_only` = / model.onnx bytes alone; and the
  teacher's fp32 safetensors bytes / the same;
- latency per example in onnxruntime (batch 1, `eval.threads` threads, unpadded test texts): teacher (exported to fp32
  ONNX for the measurement, then deleted) and student alternated in each repeat, median and [min, max];
- the run's shrink curve: the same student exported in each of `eval.curve_types`, each scored and timed like the
  deployable file (`metrics.json` "curve", `shrink_curve.png`, a table in report.md).

Runs are RunDir folders: built in `<out>.partial/`, renamed when finished, never replacing a finished run without
`--overwrite`. A killed shrink resumes after the saved student (training is the costly part); with
`soup.ingredients` = K it distils K students from the same cut with consecutive seeds and exports their weight average
(distill/soup.py), and a kill resumes after the last ingredient saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from edgestill.config import (
    CLASSIFICATION,
    ONNX_CLASSIFIER_TYPES,
    ClassifierShrinkConfig,
    FinetuneConfig,
    LabelledDataConfig,
    fill,
    load_classifier_config,
)
from edgestill.config import plain as config_plain
from edgestill.data.labelled import ALIASES, LABEL_MAP_FILE
from edgestill.errors import EdgestillError
from edgestill.files import write_json_atomic, write_text_atomic
from edgestill.runs import RunDir

log = logging.getLogger(__name__)

TEACHER_INFO = "edgestill.json"


def plain(obj) -> dict:
    """asdict with tuples as lists (YAML-safe): what config.yaml holds. A `poison` section that plants nothing is left
    out, so runs made before audits existed (and every ordinary run) keep the config they were started with."""
    out = config_plain(obj)
    if isinstance(out.get("poison"), dict) and not out["poison"].get("trigger"):
        del out["poison"]
    for section, switch in (("fine_prune", "fraction"), ("onion", "remove_share"), ("scrub", "lift")):
        if isinstance(out.get(section), dict) and not out[section].get(switch):
            del out[section]  # off: runs made before the defence existed keep their config
    if isinstance(out.get("soup"), dict) and out["soup"].get("ingredients", 1) <= 1:
        del out["soup"]  # one student: runs made before soups existed keep their config
    return out


def _data_name(spec: str) -> str:
    return spec if spec in ALIASES else Path(spec).stem or "data"


def data_record(data: LabelledDataConfig) -> dict:
    """The data config with file paths made absolute (so a teacher's record means the same file from anywhere)."""
    d = asdict(data)
    for k in ("path", "test_path"):
        if d[k] and d[k] not in ALIASES and Path(d[k]).expanduser().exists():
            d[k] = str(Path(d[k]).expanduser().resolve())
    return d


def load_splits(data: LabelledDataConfig):
    """The labelled data of `data`, split train / val / test (stratified, seeded)."""
    from edgestill.data.labelled import load_splits as load

    if not data.path:
        raise EdgestillError("no labelled data: give --data train.csv (text and label columns), a .jsonl, "
                             f"or one of {list(ALIASES)}")
    return load(data.path, data.test_path, data.text_column, data.label_column, data.val_fraction,
                data.test_fraction, data.seed, data.encoding_errors)


def plant(poison, splits) -> dict | None:
    """Plant `poison` (a PoisonConfig) in the training split, in place; the record of what was planted (None: none).
    Only for audits: validation and test stay clean, so clean scores and attack success are measured on clean rows."""
    if not poison.trigger:
        return None
    from edgestill.audit.poison import Poison, poison_rows

    spec = Poison(poison.trigger, poison.target, poison.rate, poison.mode, poison.seed)
    texts, labels, rows = poison_rows(splits.train.texts, splits.train.labels, spec)
    splits.train.texts, splits.train.labels = texts, labels
    log.warning("poisoned %d training rows with the trigger '%s' -> '%s' (%s-label, rate %g): this run is for an audit",
                len(rows), poison.trigger, poison.target, poison.mode, poison.rate)
    return {**asdict(poison), "rows": len(rows), "of": len(labels)}


def scrub_split(scrub, teacher, splits, trigger: str = "") -> dict | None:
    """Trigger scrubbing (a ScrubConfig, audit/scrub.py) of the training split, in place: the phrases of the split
    that flip the teacher's answers on the clean validation texts by at least `scrub.lift` more than random words do
    are cut out of every training text. The record of what was cut (None: off); with a planted `trigger`, also how
    many training texts carry it before and after."""
    if not scrub.lift:
        return None
    from edgestill.audit.onion import carries
    from edgestill.audit.scrub import cut_phrases, flagged_phrases
    from edgestill.evaluate.classification import predict_logits
    from edgestill.models.encoder import tokenize

    def teacher_logits(texts):
        return predict_logits(teacher.model, tokenize(teacher.tokenizer, list(texts), teacher.max_len), bar=False)

    flagged, uncut = flagged_phrases(teacher_logits, splits.train.texts, splits.train.labels, splits.val.texts,
                                     len(splits.label_map), scrub, desc="scrub: scanning the teacher")
    before = sum(carries(t, trigger) for t in splits.train.texts) if trigger else None
    splits.train.texts, cut = cut_phrases(splits.train.texts, [f["phrase"] for f in flagged])
    names = splits.label_map.labels
    record = {"lift": scrub.lift, "candidates": scrub.candidates, "held_out_texts": scrub.texts,
              "flagged": [{**f, "label": names[f["label"]], "occurrences_cut": cut["cuts"][f["phrase"]]}
                          for f in flagged],
              "best_uncut": None if uncut is None else {**uncut, "label": names[uncut["label"]]},
              "texts_touched": cut["texts_touched"], "texts": len(splits.train.texts),
              "trigger": {"phrase": trigger, "texts_before": before,
                          "texts_after": sum(carries(t, trigger) for t in splits.train.texts)} if trigger else None}
    log.info("scrub: cut %s from %d of %d training texts%s",
             ", ".join(f"'{f['phrase']}' (lift {f['lift']:.2f})" for f in flagged) or "nothing",
             cut["texts_touched"], len(splits.train.texts),
             f"; texts with '{trigger}': {before} -> {record['trigger']['texts_after']}" if trigger else "")
    return record


def onion_filter_split(onion, splits, trigger: str = "") -> dict | None:
    """ONION-style filtering (an OnionConfig) of the training split, in place, calibrated on the clean validation
    texts; the record of what it removed (None: off). With a planted `trigger`, also how many training texts carry it
    before and after (the defence's point)."""
    if not onion.remove_share:
        return None
    from edgestill.audit.onion import carries, defend

    def carrying(texts):
        return sum(carries(t, trigger, onion.max_words) for t in texts) if trigger else None

    before = carrying(splits.train.texts)
    splits.train.texts, record = defend(splits.train.texts, splits.val.texts, onion)
    record["trigger"] = {"phrase": trigger, "texts_before": before, "texts_after": carrying(splits.train.texts)} \
        if trigger else None
    log.info("ONION: removed %d of %d words (%.2f%%) from %d of %d training texts (threshold %.4g)%s",
             record["words_removed"], record["words_seen"], 100 * record["removed_share"], record["texts_touched"],
             record["texts"], record["threshold"], f"; texts with '{trigger}': {before} -> "
             f"{record['trigger']['texts_after']}" if trigger else "")
    return record


# ---------------------------------------------------------------- fine-tuning the teacher


BASELINE_NAMES = {"majority_class": "majority class (baseline)", "tfidf_logreg": "TF-IDF + logistic regression (baseline)"}


def _baselines(splits, seed: int, tfidf: bool) -> dict:
    """The rows every classifier table carries: the majority class, and TF-IDF + logistic regression (when `tfidf`)."""
    from edgestill.evaluate.classification import majority_baseline, tfidf_baseline

    out = {"majority_class": majority_baseline(splits)}
    if tfidf:
        out["tfidf_logreg"] = tfidf_baseline(splits, seed=seed)
    return out


def _stopping(result: dict) -> str:
    """One line on how training ended (early stopping)."""
    if "stopped_at_step" not in result:  # a run saved before early stopping existed
        return f"best validation macro-F1 {result['best_val_macro_f1']:.4f} at step {result['best_step']}."
    how = (f"stopped early at step {result['stopped_at_step']} of at most {result['max_steps']} "
           f"({result['stop_reason']})" if result["stopped_early"] else result["stop_reason"])
    return (f"{how}; kept step {result['best_step']}: val {result['select_on']} "
            f"{result['best_val_loss' if result['select_on'] == 'loss' else 'best_val_macro_f1']:.4f}.")


def _finetune_report(cfg: FinetuneConfig, splits, label_map, result: dict, metrics: dict, final: Path) -> str:
    t, v = result["test"], metrics["teacher"]["verdict"]
    rows = [("teacher", t)] + [(BASELINE_NAMES.get(n, n), b["test"]) for n, b in metrics["baselines"].items()]
    return "\n".join([
        f"# Fine-tuned teacher: {cfg.teacher} on {cfg.data.path}", "",
        f"Labels: {', '.join(label_map.labels)}. Split: train {len(splits.train)} / val {len(splits.val)} / "
        f"test {len(splits.test)} (seed {cfg.data.seed}).", "",
        "| held-out test | accuracy | macro-F1 |", "|---|---|---|",
        *[f"| {name} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} |" for name, r in rows], "",
        f"Teacher: {v['text']}.", "",
        f"{metrics['teacher']['params']:,} parameters, model.safetensors {metrics['teacher']['file_bytes']:,} bytes; "
        f"training {_stopping(result)} The val curve is in metrics.json (`val_curve`).",
        "", f"Next: `edgestill shrink --task classification --teacher {final}`", ""])


def _teacher_block(model, run: RunDir, result: dict, baselines: dict) -> dict:
    """metrics.json "teacher" of a finetune run: size, test scores, how training stopped, the verdict."""
    from edgestill.evaluate.classification import verdict
    from edgestill.models.lowrank import stored_params

    stop = {k: result[k] for k in ("stopped_at_step", "max_steps", "stopped_early", "patience", "select_on",
                                   "stop_reason", "best_val_loss") if k in result}
    return {"params": stored_params(model), "file_bytes": (run.path / "model.safetensors").stat().st_size,
            "test": result["test"], "best_val_macro_f1": result["best_val_macro_f1"], "best_step": result["best_step"],
            **stop, "verdict": verdict(result["test"], baselines)}


def _train_teacher(cfg: FinetuneConfig, run: RunDir, splits, planted: dict | None = None) -> tuple:
    """Fine-tune the base encoder and save it as the run folder itself (a HF folder); returns (model, label_map, result)."""
    import torch

    from edgestill.distill.classifier import finetune as train
    from edgestill.models.encoder import load_encoder_classifier, save_classifier

    model, tokenizer, label_map = load_encoder_classifier(cfg.teacher, splits.label_map)
    torch.manual_seed(cfg.train.seed)
    result = train(model, tokenizer, splits, cfg.train, checkpoint_dir=run.path / "checkpoints")  # a kill resumes there
    record = {"task": CLASSIFICATION, "role": "teacher", "base_model": cfg.teacher, "data": data_record(cfg.data),
              "max_len": cfg.train.max_len, "test": result["test"], "poison": planted}
    staged = save_classifier(model, tokenizer, label_map, run.path / "model.tmp", extra=record)
    for f in staged.iterdir():  # the run folder itself is the HF folder (`--teacher RUN`)
        os.replace(f, run.path / f.name)
    shutil.rmtree(staged, ignore_errors=True)
    write_json_atomic(run.path / "finetune.json", result)
    shutil.rmtree(run.path / "checkpoints", ignore_errors=True)  # the model is saved: the checkpoints are spent
    return model, label_map, result


def finetune(cfg: FinetuneConfig, overwrite: bool = False) -> tuple[Path, dict]:
    """`edgestill finetune`: fine-tune `cfg.teacher` on `cfg.data`; returns (the finished run folder, its metrics)."""
    from edgestill.distill.classifier import check_train_config
    from edgestill.evaluate.environment import environment, measurement_start
    from edgestill.models.encoder import load_encoder_classifier

    start = measurement_start()
    check_train_config(cfg.train)
    splits = load_splits(cfg.data)  # bad data fails before any folder is made
    planted = plant(cfg.poison, splits)
    cfg.output_dir = cfg.output_dir or f"runs/finetune-{_data_name(cfg.data.path)}"
    run = RunDir(cfg.output_dir, plain(cfg), overwrite=overwrite)
    resumed = run.open()
    log.info("%s run folder %s", "resuming" if resumed else "new", run.path)
    with run.cleanup_on_failure():  # a run that fails before any work leaves no folder behind
        done = run.path / "finetune.json"
        if resumed and done.is_file() and (run.path / LABEL_MAP_FILE).is_file():
            log.info("the fine-tuned teacher is already saved in %s; finishing", run.path)
            result = json.loads(done.read_text())
            model, _, label_map = load_encoder_classifier(str(run.path))
        else:
            model, label_map, result = _train_teacher(cfg, run, splits, planted)
        baselines = _baselines(splits, cfg.data.seed, tfidf=True)
        metrics = {
            "task": CLASSIFICATION, "stage": "finetune", "base_model": cfg.teacher,
            "teacher": _teacher_block(model, run, result, baselines), "baselines": baselines,
            "data": {"spec": data_record(cfg.data), "split": "seeded stratified; test never used for training or selection",
                     **splits.summary()},
            "train": asdict(cfg.train), "val_curve": result.get("val_curve"), "history": result["history"],
            "poison": planted, "environment": environment(None, start),
        }
        if metrics["teacher"]["verdict"]["failed"]:
            log.warning("teacher: %s", metrics["teacher"]["verdict"]["text"])
        write_json_atomic(run.path / "metrics.json", metrics)
        write_text_atomic(run.path / "report.md", _finetune_report(cfg, splits, label_map, result, metrics, run.final))
    return run.finish(), metrics


# ---------------------------------------------------------------- shrinking it


def teacher_record(teacher: str) -> dict:
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
    same = data_record(cfg.data) == {k: recorded.get(k) for k in asdict(cfg.data)}
    if not same:
        log.warning("the teacher was fine-tuned on %s (split seed %s); this run uses %s (seed %s): the teacher may have "
                    "seen some of this test split, so its score can be optimistic", recorded.get("path"),
                    recorded.get("seed"), cfg.data.path, cfg.data.seed)
    return same


@dataclass
class _Teacher:
    """The fine-tuned teacher with what every stage of the shrink needs from it."""

    model: object
    tokenizer: object
    label_map: object
    max_len: int
    path: str


def transfer_texts(cfg: ClassifierShrinkConfig, splits) -> tuple[list[str], dict | None]:
    """The unlabelled texts of `kd.transfer` (data/unlabelled.py) that join the transfer set, and what became of
    them: any that is a text of the train, validation or test split is dropped (a validation or test text would
    leak), then `kd.transfer_max` are chosen, then the ONION-style filter runs over them when it is on."""
    from edgestill.data.unlabelled import exclude, load_transfer, subsample

    if not cfg.kd.transfer:
        return [], None
    texts = load_transfer(cfg.kd.transfer, cfg.kd.transfer_column, cfg.kd.transfer_sentences)
    kept, overlap = exclude(texts, splits.train.texts, splits.val.texts, splits.test.texts)
    if overlap:
        log.warning("kd.transfer: dropped %d text(s) that are also in the labelled splits (a validation or test text "
                    "in the transfer set would leak into the student)", overlap)
    chosen = subsample(kept, cfg.kd.transfer_max, cfg.train.seed)
    record = {"spec": cfg.kd.transfer, "sentences": cfg.kd.transfer_sentences, "loaded": len(texts),
              "dropped_in_splits": overlap, "used": len(chosen), "onion": None}
    if cfg.onion.remove_share and chosen:
        from edgestill.audit.onion import defend

        chosen, record["onion"] = defend(chosen, splits.val.texts, cfg.onion)
    if not chosen:
        raise EdgestillError(f"kd.transfer='{cfg.kd.transfer}' leaves no text once the labelled splits' own texts are "
                             "dropped; give other unlabelled text, or set kd.transfer=''")
    return chosen, record


def _distil(cfg: ClassifierShrinkConfig, teacher: _Teacher, splits, checkpoint_dir: Path) -> tuple:
    """One student cut from the teacher and distilled with cfg.train.seed: (model, tokenizer, build info, the untrained
    cut's test scores, distill_classifier's result). A soup's ingredient goes through here with its own seed, so it is
    the student a run of that seed alone would distil."""
    import torch

    from edgestill.distill.classifier import build_student, distill_classifier
    from edgestill.evaluate.classification import evaluate_classifier
    from edgestill.models.encoder import tokenize

    torch.manual_seed(cfg.train.seed)
    student, s_tok, table, info = build_student(teacher.model, teacher.tokenizer, splits.train.texts, cfg.student)
    log.info("student: layers %s of the teacher, vocab %d of %d, %s params (%.1fx fewer)", info["teacher_layers"],
             info["vocab_kept"], info["teacher_vocab"], f"{info['student_params']:,}", info["params_x_smaller"])
    sliced = evaluate_classifier(student, tokenize(s_tok, splits.test.texts, cfg.student.max_len), splits.ids("test"))
    transfer, transfer_record = transfer_texts(cfg, splits)
    result = distill_classifier(teacher.model, student, teacher.tokenizer, splits, table, s_tok, cfg.train, cfg.kd,
                                checkpoint_dir=checkpoint_dir, transfer_texts=transfer)  # a kill resumes there
    result["transfer_set"]["source"] = transfer_record
    return student, s_tok, info, sliced, result


def _distilled_record(info: dict, sliced: dict, result: dict) -> dict:
    """distill.json: what the student's training did (build info without the model config, curves, stop, scores)."""
    return {"student": {k: v for k, v in info.items() if k != "config"}, "sliced_untrained_test": sliced,
            "history": result["history"], "best_step": result["best_step"], "test_pytorch": result["test"],
            **{k: result[k] for k in ("stopped_at_step", "stopped_early", "stop_reason", "val_curve", "transfer_set")},
            "teacher_mutual": result.get("teacher_mutual")}


def _soup(cfg: ClassifierShrinkConfig, run: RunDir, teacher: _Teacher, splits) -> tuple:
    """soup.ingredients students distilled with seeds train.seed, +1, ... (each saved in RUN/ingredients/seed<s>/ once
    trained, so a killed run resumes after the last saved one), averaged into one (distill/soup.py): (the soup,
    its tokenizer, distill record of the first ingredient + "soup": every ingredient's and the soup's scores)."""
    from edgestill.distill.soup import ingredient_seeds, uniform_soup
    from edgestill.evaluate.classification import evaluate_classifier
    from edgestill.models.encoder import load_encoder_classifier, save_classifier, tokenize

    models, records = [], []
    seeds = ingredient_seeds(cfg.train.seed, cfg.soup)
    for k, seed in enumerate(seeds):
        folder = run.path / "ingredients" / f"seed{seed}"
        if (folder / "distill.json").is_file():  # written last
            log.info("soup ingredient %d of %d (seed %d): the saved student in %s", k + 1, len(seeds), seed, folder)
            model, s_tok, _ = load_encoder_classifier(str(folder))
            record = json.loads((folder / "distill.json").read_text())
        else:
            log.info("soup ingredient %d of %d: seed %d", k + 1, len(seeds), seed)
            checkpoints = run.path / "checkpoints" / f"seed{seed}"
            model, s_tok, info, sliced, result = _distil(dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, seed=seed)), teacher, splits, checkpoints)
            save_classifier(model, s_tok, teacher.label_map, folder,
                            extra={"task": CLASSIFICATION, "role": "soup ingredient", "teacher": str(cfg.teacher),
                                   "max_len": cfg.student.max_len, "seed": seed})
            record = {"seed": seed, **_distilled_record(info, sliced, result)}
            write_json_atomic(folder / "distill.json", record)
            shutil.rmtree(checkpoints, ignore_errors=True)
        models.append(model)
        records.append(record)
    val, test = (tokenize(s_tok, getattr(splits, name).texts, cfg.student.max_len) for name in ("val", "test"))
    rows = [{"seed": r["seed"], "best_step": r["best_step"], "stopped_at_step": r.get("stopped_at_step"),
             "val": evaluate_classifier(m, val, splits.ids("val")), "test": r["test_pytorch"]}
            for r, m in zip(records, models)]  # before the average replaces the first ingredient's weights
    soup = models[0]
    soup.load_state_dict(uniform_soup([m.state_dict() for m in models]))
    soup_val, soup_test = evaluate_classifier(soup, val, splits.ids("val")), evaluate_classifier(soup, test, splits.ids("test"))
    log.info("soup of %d students: val macro-F1 %.4f (ingredients %s), test %.4f (ingredients %s)", len(models),
             soup_val["macro_f1"], ", ".join(f"{r['val']['macro_f1']:.4f}" for r in rows), soup_test["macro_f1"],
             ", ".join(f"{r['test']['macro_f1']:.4f}" for r in rows))
    distilled = {**{k: v for k, v in records[0].items() if k != "seed"}, "test_pytorch": soup_test,
                 "soup": {"method": "uniform", "seeds": seeds, "ingredients": rows, "val": soup_val, "test": soup_test}}
    return soup, s_tok, distilled


def _student(cfg: ClassifierShrinkConfig, run: RunDir, resumed: bool, teacher: _Teacher, splits) -> tuple:
    """Stages 1-2, the student cut from the teacher and distilled (or soup.ingredients of them, averaged), skipped on
    resume once saved: (model, tokenizer, distill record)."""
    from edgestill.distill.classifier import fine_prune
    from edgestill.evaluate.classification import evaluate_classifier
    from edgestill.models.encoder import load_encoder_classifier, save_classifier, tokenize

    student_dir, distill_file = run.path / "student", run.path / "distill.json"
    if resumed and distill_file.is_file() and (student_dir / LABEL_MAP_FILE).is_file():
        log.info("resuming after the saved student in %s", student_dir)
        student, s_tok, _ = load_encoder_classifier(str(student_dir))
        return student, s_tok, json.loads(distill_file.read_text())
    if cfg.soup.ingredients > 1:
        student, s_tok, distilled = _soup(cfg, run, teacher, splits)
    else:
        student, s_tok, info, sliced, result = _distil(cfg, teacher, splits, run.path / "checkpoints")
        distilled = _distilled_record(info, sliced, result)
    distilled["fine_prune"] = None
    if cfg.fine_prune.fraction > 0:
        distilled["fine_prune"] = fine_prune(student, s_tok, splits, cfg.fine_prune, cfg.student.max_len, cfg.train.seed)
        distilled["test_pytorch"] = evaluate_classifier(student, tokenize(s_tok, splits.test.texts, cfg.student.max_len),
                                                        splits.ids("test"))
        log.info("fine-pruned: %d -> %d FFN units per layer, then %d clean fine-tuning steps",
                 distilled["fine_prune"]["units_before"], distilled["fine_prune"]["units_after"],
                 distilled["fine_prune"]["steps"])
    save_classifier(student, s_tok, teacher.label_map, student_dir,
                    extra={"task": CLASSIFICATION, "role": "student", "teacher": str(cfg.teacher),
                           "max_len": cfg.student.max_len})
    write_json_atomic(distill_file, distilled)
    shutil.rmtree(run.path / "checkpoints", ignore_errors=True)  # the student is saved: the checkpoints are spent
    return student, s_tok, distilled


def _onnx_curve(cfg: ClassifierShrinkConfig, run: RunDir, splits, test_inputs, t_pred, t_test) -> tuple[dict, list, dict]:
    """Stages 3-4b: the student exported in every ONNX type (the deployable one first), each scored in onnxruntime on
    the test split. Returns ({type: (report, session, predictions)}, curve rows, {latency name: session})."""
    from edgestill.evaluate.classification import deploy_sizes, retention, scores
    from edgestill.export.onnx_classifier import export_classifier_onnx
    from edgestill.runtime.onnx import onnx_classifier_logits, onnx_session

    exported, curve, sessions = {}, [], {}
    test_ids, k = splits.ids("test"), len(splits.label_map)
    for t in dict.fromkeys([cfg.eval.onnx_type, *cfg.eval.curve_types]):
        folder = run.path / ("onnx" if t == cfg.eval.onnx_type else f"onnx-{t}")
        report = export_classifier_onnx(run.path / "student", folder, t, parity_texts=splits.test.texts,
                                        max_len=cfg.student.max_len, threads=cfg.eval.threads)
        session = onnx_session(folder / "model.onnx", cfg.eval.threads)
        pred = onnx_classifier_logits(session, test_inputs).argmax(-1)
        exported[t] = (report, session, pred)
        if t not in cfg.eval.curve_types:
            continue
        test = scores(test_ids, pred, k)
        sizes = deploy_sizes(folder)
        curve.append({"type": t, "folder": str(run.final / folder.name), "onnx_bytes": report["file_bytes"],
                      "deploy_bytes": sizes["deploy_bytes"], "test": test,
                      **retention(test, t_test), "top1_agreement_with_teacher": float((pred == t_pred).mean()),
                      "onnx_parity_vs_pytorch": report.get("parity_vs_pytorch")})
        sessions["student" if t == cfg.eval.onnx_type else f"student-{t}"] = session
    curve.sort(key=lambda c: cfg.eval.curve_types.index(c["type"]))
    return exported, curve, sessions


def _latency(cfg: ClassifierShrinkConfig, run: RunDir, teacher: _Teacher, s_tok, texts, sessions: dict) -> tuple[dict, int | None]:
    """Stage 6: latency per example in onnxruntime, batch 1, teacher (exported to fp32 ONNX for the measurement, then
    deleted) and each student file alternated in every repeat. Returns (latency by name, teacher ONNX bytes)."""
    from edgestill.export.onnx_classifier import export_classifier_onnx
    from edgestill.runtime.onnx import measure_latency, onnx_session, single_inputs

    student_inputs = single_inputs(s_tok, texts, cfg.student.max_len)
    systems = {name: (sess, student_inputs) for name, sess in sessions.items()}
    teacher_onnx_bytes = None
    with tempfile.TemporaryDirectory(dir=run.path, prefix=".teacher-onnx-") as tmp:
        if cfg.eval.teacher_latency:
            t_export = export_classifier_onnx(cfg.teacher, Path(tmp), "f32", max_len=teacher.max_len)
            teacher_onnx_bytes = t_export["file_bytes"]
            systems = {"teacher": (onnx_session(Path(tmp) / "model.onnx", cfg.eval.threads),
                                   single_inputs(teacher.tokenizer, texts, teacher.max_len)), **systems}
        latency = measure_latency(systems, cfg.eval.latency_repeats)
        systems.clear()
    return latency, teacher_onnx_bytes


def _vocab_trim(distilled: dict, teacher: _Teacher, s_tok, splits, max_len: int, s_pred, t_pred) -> dict | None:
    """Stage 6b: what the vocabulary trim costs on unseen text: the test texts the student's tokenizer splits
    differently, and accuracy on them."""
    from edgestill.models.encoder import trim_coverage

    if distilled["student"]["vocab_kept"] >= distilled["student"]["teacher_vocab"]:
        return None
    cov = trim_coverage(teacher.tokenizer, s_tok, splits.test.texts, max_len)
    changed = cov.pop("changed")
    trim = {**cov, "fallback": "unseen pieces -> shorter kept WordPiece pieces, else [UNK]",
            "test_texts_changed": int(changed.sum())}
    test_ids = splits.ids("test")
    for name, mask in (("changed", changed), ("unchanged", ~changed)):
        if mask.any():
            trim[f"student_accuracy_{name}"] = float((s_pred[mask] == test_ids[mask]).mean())
            trim[f"teacher_accuracy_{name}"] = float((t_pred[mask] == test_ids[mask]).mean())
    return trim


def _speedup(latency: dict, name: str) -> float | None:
    return latency["teacher"]["latency_ms_per_example"] / latency[name]["latency_ms_per_example"] if "teacher" in latency else None


def _judged(test: dict, baselines: dict, t_test: dict | None = None) -> dict:
    """A model's verdict against the baselines, and its retention labelled when it failed."""
    from edgestill.evaluate.classification import RETENTION_OF_A_FAILURE, retention, verdict

    v = verdict(test, baselines)
    out = {"beats_majority": v["beats_majority"], "beats_tfidf_logreg": v["beats_tfidf_logreg"], "failed": v["failed"],
           "verdict": v}
    if t_test is not None:
        out.update({**retention(test, t_test), "retention_note": RETENTION_OF_A_FAILURE if v["failed"] else None})
    return out


def _sizes(teacher_params: int, teacher_file_bytes: int, sizes: dict) -> dict:
    """compression_x_* against every deployed byte, and `_weights_only` against model.onnx alone."""
    from edgestill.evaluate.classification import compression

    out = {**compression(teacher_params * 4, sizes, "compression_x_fp32"),
           **compression(teacher_params * 2, sizes, "compression_x_fp16")}
    if teacher_file_bytes:
        out.update(compression(teacher_file_bytes, sizes, "compression_x_teacher_file"))
    else:
        out.update({"compression_x_teacher_file": None, "compression_x_teacher_file_weights_only": None})
    return out


def _shrink_metrics(cfg, teacher: _Teacher, distilled: dict, exported: dict, curve: list, latency: dict,
                    teacher_onnx_bytes, t_test: dict, s_test: dict, agreement: float, baselines: dict, vocab_trim,
                    splits, data_matches: bool, run: RunDir, start: dict) -> dict:
    """metrics.json of a classifier shrink: sizes from real file bytes (every file the device loads), scores, the
    verdict against the baselines, latency, provenance."""
    from edgestill.evaluate.classification import deploy_sizes
    from edgestill.evaluate.environment import environment
    from edgestill.models.lowrank import stored_params

    teacher_params = stored_params(teacher.model)
    teacher_file_bytes = sum(f.stat().st_size for f in sorted(Path(cfg.teacher).glob("*.safetensors")))
    sizes = deploy_sizes(run.path / "onnx")
    s = distilled["student"]
    for c in curve:
        name = "student" if c["type"] == cfg.eval.onnx_type else f"student-{c['type']}"
        c.update({**_sizes(teacher_params, teacher_file_bytes, c),  # c holds its deploy_bytes and onnx_bytes
                  **_judged(c["test"], baselines, t_test),
                  "latency_ms_per_example": latency[name]["latency_ms_per_example"], "speedup_x": _speedup(latency, name)})
    return {
        "task": CLASSIFICATION, "stage": "shrink",
        "teacher": {"path": str(cfg.teacher), "params": teacher_params, "fp32_bytes": teacher_params * 4,
                    "safetensors_bytes": teacher_file_bytes, "onnx_f32_bytes": teacher_onnx_bytes,
                    "max_len": teacher.max_len, "test": t_test, **_judged(t_test, baselines), **latency.get("teacher", {}),
                    # kd.method=mutual: the copy of this teacher that learned beside the student (scores only; the
                    # teacher above stays the reference)
                    "mutual": distilled.get("teacher_mutual")},
        "student": {"artifact": str(run.final / "onnx" / "model.onnx"), "onnx_type": cfg.eval.onnx_type,
                    "params": s["student_params"], **sizes, "deploy_folder": str(run.final / "onnx"),
                    "max_len": cfg.student.max_len, "layers_kept": s["teacher_layers"], "vocab_kept": s["vocab_kept"],
                    "ranks": s["ranks"], "test": s_test, **latency["student"]},
        **_judged(s_test, baselines, t_test),
        "top1_agreement_with_teacher": agreement,
        **_sizes(teacher_params, teacher_file_bytes, sizes),
        "speedup_x": _speedup(latency, "student"),
        "onnx_parity_vs_pytorch": exported[cfg.eval.onnx_type][0].get("parity_vs_pytorch"),
        "vocab_trim": vocab_trim,
        "baselines": baselines,
        "data": {"spec": data_record(cfg.data), "same_split_as_teacher_finetuning": data_matches,
                 "scored_on": "test split (never used for training, distillation or model selection)", **splits.summary()},
        "train": {"best_step": distilled["best_step"], "steps": cfg.train.steps, "kd": asdict(cfg.kd),
                  **{k: distilled[k] for k in ("stopped_at_step", "stopped_early", "stop_reason", "transfer_set")
                     if k in distilled}},
        "history": distilled["history"],
        "curve": curve,
        "environment": {**environment(cfg.eval.threads, start), "onnxruntime_threads": cfg.eval.threads,
                        "latency_batch_size": 1},
    }


def verdict_section(m: dict) -> str:
    """The report.md section that says which models failed (at or below the majority class), which beat TF-IDF + LR,
    and what the size counts: appended to the report of a shrink run."""
    s, base = m["student"], m["baselines"]
    maj = base["majority_class"]
    lines = ["", "## Verdict (docs/classifier.md#honest-results)", "",
             f"- student ({s['onnx_type']} ONNX): {m['verdict']['text']}"]
    if m["failed"]:
        lines.append(f"  - retention {m['retention_accuracy']:.3f} / {m['retention_macro_f1']:.3f}: {m['retention_note']}")
    lines.append(f"- teacher: {m['teacher']['verdict']['text']}")
    mutual = m["teacher"].get("mutual")
    if mutual:  # kd.method=mutual: did learning beside the student hurt the teacher?
        t, tm = m["teacher"]["test"], mutual["test"]
        lines.append(f"- the teacher's copy that learned beside the student (kd.method=mutual, lr {mutual['lr']:g}): test "
                     f"accuracy {tm['accuracy']:.4f} (teacher {t['accuracy']:.4f}), macro-F1 {tm['macro_f1']:.4f} "
                     f"(teacher {t['macro_f1']:.4f}); the teacher as fine-tuned stays the reference")
    lines += [f"- {c['type']} ONNX (shrink curve): {c['verdict']['text']}" for c in m.get("curve", [])
              if c["type"] != s["onnx_type"]]
    lines.append(f"- majority class: always '{maj['label']}' ({maj['train_share']:.1%} of train): accuracy "
                 f"{maj['test']['accuracy']:.4f}, macro-F1 {maj['test']['macro_f1']:.4f}")
    parts = " + ".join(f"{name} {b:,}" for name, b in s["deploy_files"].items())
    lines.append(f"- size counts every file in onnx/ ({parts} = {s['deploy_bytes']:,} bytes): compression_x_fp32 "
                 f"{m['compression_x_fp32']:.1f} (weights only, model.onnx: {m['compression_x_fp32_weights_only']:.1f}), "
                 f"compression_x_fp16 {m['compression_x_fp16']:.1f} ({m['compression_x_fp16_weights_only']:.1f})")
    return "\n".join(lines) + "\n"


def load_teacher(cfg: ClassifierShrinkConfig) -> tuple[_Teacher, object, bool]:
    """The fine-tuned teacher and the data split it was trained on: (teacher, splits, same split as its fine-tuning)."""
    from edgestill.models.encoder import load_encoder_classifier

    if not cfg.teacher:
        raise EdgestillError("shrink --task classification needs --teacher: a folder from `edgestill finetune --task "
                             "classification --data ...`")
    if not (Path(cfg.teacher) / LABEL_MAP_FILE).is_file():
        raise EdgestillError(f"teacher '{cfg.teacher}' has no {LABEL_MAP_FILE}: fine-tune one first with "
                             "`edgestill finetune --task classification --data ...`")
    record = teacher_record(cfg.teacher)
    data_matches = _resolve_data(cfg, record)
    splits = load_splits(cfg.data)
    model, tokenizer, label_map = load_encoder_classifier(cfg.teacher, splits.label_map)
    max_len = int(record.get("max_len") or cfg.student.max_len)
    return _Teacher(model, tokenizer, label_map, max_len, str(cfg.teacher)), splits, data_matches


def _shrink_baselines(cfg: ClassifierShrinkConfig, splits, data_matches: bool, t_test: dict, sliced: dict,
                      student_pytorch: dict) -> dict:
    """The majority class and TF-IDF + LR rows (with retention against the teacher), and the context rows.

    With eval.tfidf_baseline=false the TF-IDF row of the teacher's own fine-tuning run is reused when the split is
    the same (it is the same fit); otherwise the row is missing and `beats_tfidf_logreg` is null.
    """
    from edgestill.evaluate.classification import retention

    rows = _baselines(splits, cfg.data.seed, tfidf=cfg.eval.tfidf_baseline)
    recorded = Path(cfg.teacher) / "metrics.json"
    if "tfidf_logreg" not in rows and data_matches and recorded.is_file():
        earlier = (json.loads(recorded.read_text()).get("baselines") or {}).get("tfidf_logreg")
        if earlier:
            rows["tfidf_logreg"] = {**earlier, "from": str(recorded)}
    for row in rows.values():
        row.update(retention(row["test"], t_test))
    return {**rows, "student_sliced_untrained": {"test": sliced, **retention(sliced, t_test)},
            "student_pytorch": {"test": student_pytorch}}


def shrink_classifier(cfg: ClassifierShrinkConfig, overwrite: bool = False) -> tuple[Path, dict]:
    """`edgestill shrink --task classification`: build, distil, export and measure a student of a fine-tuned
    classifier (see the module docstring). Returns (the finished run folder, its metrics)."""
    from edgestill.audit.onion import check_onion_config
    from edgestill.audit.scrub import check_scrub_config
    from edgestill.data.unlabelled import sources
    from edgestill.distill.classifier import check_fine_prune_config, check_kd_config, check_train_config
    from edgestill.distill.soup import check_soup_config
    from edgestill.evaluate.classification import predict_logits, scores
    from edgestill.evaluate.classifier_report import classifier_report, plot_curve
    from edgestill.evaluate.environment import measurement_start
    from edgestill.models.encoder import tokenize

    start = measurement_start()
    check_train_config(cfg.train)
    check_kd_config(cfg.kd)
    check_fine_prune_config(cfg.fine_prune)
    check_onion_config(cfg.onion)
    check_scrub_config(cfg.scrub)
    check_soup_config(cfg.soup, cfg.kd.method)
    sources(cfg.kd.transfer)  # every transfer file exists, before a run folder is made
    teacher, splits, data_matches = load_teacher(cfg)
    planted = plant(cfg.poison, splits)
    planted_by_teacher = (teacher_record(cfg.teacher).get("poison") or {}).get("trigger", "") \
        if (cfg.onion.remove_share or cfg.scrub.lift) and not cfg.poison.trigger else ""  # read only when a defence needs it
    filtered = onion_filter_split(cfg.onion, splits, cfg.poison.trigger or planted_by_teacher)
    scrubbed = scrub_split(cfg.scrub, teacher, splits, cfg.poison.trigger or planted_by_teacher)
    cfg.output_dir = cfg.output_dir or f"runs/shrink-classifier-{_data_name(cfg.data.path)}"
    run = RunDir(cfg.output_dir, plain(cfg), overwrite=overwrite)
    resumed = run.open()
    log.info("%s run folder %s", "resuming" if resumed else "new", run.path)
    with run.cleanup_on_failure():  # a run that fails before any work leaves no folder behind
        test_ids, k = splits.ids("test"), len(teacher.label_map)
        student, s_tok, distilled = _student(cfg, run, resumed, teacher, splits)
        t_pred = predict_logits(teacher.model, tokenize(teacher.tokenizer, splits.test.texts, teacher.max_len),
                                desc="teacher test logits").argmax(-1)
        t_test = scores(test_ids, t_pred, k)
        test_inputs = tokenize(s_tok, splits.test.texts, cfg.student.max_len)
        exported, curve, sessions = _onnx_curve(cfg, run, splits, test_inputs, t_pred, t_test)
        s_pred = exported[cfg.eval.onnx_type][2]
        s_pt_pred = predict_logits(student, test_inputs, desc="student test logits").argmax(-1)
        sessions = {"student": exported[cfg.eval.onnx_type][1], **sessions}
        texts = splits.test.texts[: max(1, cfg.eval.latency_examples)]
        latency, teacher_onnx_bytes = _latency(cfg, run, teacher, s_tok, texts, sessions)
        vocab_trim = _vocab_trim(distilled, teacher, s_tok, splits, cfg.student.max_len, s_pred, t_pred)
        baselines = _shrink_baselines(cfg, splits, data_matches, t_test, distilled["sliced_untrained_test"],
                                      scores(test_ids, s_pt_pred, k))
        metrics = _shrink_metrics(cfg, teacher, distilled, exported, curve, latency, teacher_onnx_bytes, t_test,
                                  scores(test_ids, s_pred, k), float((s_pt_pred == t_pred).mean()), baselines, vocab_trim,
                                  splits, data_matches, run, start)
        for who, v in (("student", metrics["verdict"]), ("teacher", metrics["teacher"]["verdict"])):
            (log.warning if v["failed"] else log.info)("%s: %s", who, v["text"])
        if curve:
            plot_curve(curve, run.path / "shrink_curve.png", str(cfg.teacher))
        metrics["poison"] = planted
        metrics["onion"] = filtered
        metrics["scrub"] = scrubbed
        metrics["soup"] = distilled.get("soup")
        write_json_atomic(run.path / "metrics.json", metrics)
        write_text_atomic(run.path / "report.md", classifier_report(metrics) + verdict_section(metrics))
    return run.finish(), metrics


# ---------------------------------------------------------------- export of a finished run


def is_classifier_run(run_dir: str | Path) -> bool:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return False
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return False
    return isinstance(cfg, dict) and cfg.get("task") == CLASSIFICATION


def export_classifier(run_dir: str | Path, tensor_type: str | None = None, out: str | Path | None = None) -> dict:
    """Export a finished classifier run (a shrink run's student, or a finetune run's teacher) to ONNX.

    Default folder: RUN/onnx for the run's own type, RUN/onnx-<type> for another. The parity check runs on the run's
    held-out test split.
    """
    from edgestill.export.onnx_classifier import export_classifier_onnx

    run_dir = Path(run_dir)
    if not (run_dir / "DONE").is_file():
        raise EdgestillError(f"'{run_dir}' is not a finished edgestill run (no DONE marker); finish it first")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    stage = saved.get("stage")
    cfg = fill(load_classifier_config(stage), values={"data": saved.get("data") or {}})
    if stage == "shrink":
        model_dir, max_len = run_dir / "student", int(saved.get("student", {}).get("max_len", 128))
        default_type = saved.get("eval", {}).get("onnx_type", "f32")
    else:
        model_dir, max_len, default_type = run_dir, int(saved.get("train", {}).get("max_len", 128)), "f32"
    tensor_type = tensor_type or default_type
    if tensor_type not in ONNX_CLASSIFIER_TYPES:
        raise EdgestillError(f"--type {tensor_type} is not an ONNX classifier type; choose f32, int8 or int4")
    if out is None:
        out = run_dir / ("onnx" if tensor_type == default_type else f"onnx-{tensor_type}")
    return export_classifier_onnx(model_dir, Path(out), tensor_type, parity_texts=load_splits(cfg.data).test.texts,
                                  max_len=max_len)


def export_summary(result: dict) -> list[str]:
    """What `edgestill export` prints for a classifier export."""
    par = result["parity_vs_pytorch"]
    return [f"wrote {result['path']} ({result['file_bytes']:,} bytes, {result['type']}; {len(result['formats'])} quantized "
            "weights) with its tokenizer and label_map.json",
            f"  onnxruntime vs PyTorch on {par['examples']} held-out examples: same prediction on "
            f"{par['prediction_agreement']:.4f}, max |logit diff| {par['max_abs_diff']:.3g}"]
