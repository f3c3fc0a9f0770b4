"""The main job, stage by stage: load -> split -> slice -> cache teacher -> distil -> save -> evaluate -> report.

    edgestill shrink    shrink(cfg)        distil() then evaluate(), then the run folder is finished
    edgestill distill   distill(cfg)       stages 1-6: the trained student in RUN/student
    edgestill eval RUN  evaluate_run(RUN)  stages 7-8 on a finished run, with its own config

Each stage logs what it does; every long one shows a progress bar. The run works in RUN.partial/ and is
renamed when finished (edgestill.runs), so a kill resumes and a failure never replaces a good run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from edgestill.config import ShrinkConfig, apply_override, load_config
from edgestill.data.corpus import CorpusBlocks, calibration_batches, corpus_blocks, tokenize_blocks
from edgestill.errors import EdgestillError
from edgestill.files import write_text_atomic
from edgestill.progress import is_main_process
from edgestill.runs import RunDir, finished_run

log = logging.getLogger("edgestill")


@dataclass
class Distilled:
    """What distil() hands to evaluate() so nothing is loaded or tokenized twice (None: evaluate() loads it)."""

    teacher: object | None  # LoadedModel: the reference (the corrected teacher, or the original when not corrected)
    original: object | None  # LoadedModel: the teacher as the user gave it
    data: CorpusBlocks | None
    history: list[dict] | None
    layers: list[int] | None  # teacher layers the student kept (None: a given student.model)
    resumed: bool


def quant_config(cfg: ShrinkConfig):
    """The QuantConfig of the recipe's `quant` section (the section is one, read as it is), or None when training in float."""
    if cfg.quant.format is None:
        return None
    from edgestill.quant import QuantConfig

    return QuantConfig.from_dict(dataclasses.asdict(cfg.quant))


def _open_run(cfg: ShrinkConfig, overwrite: bool, rank: int, world: int) -> tuple[RunDir, bool]:
    import torch

    run = RunDir(cfg.output.dir, cfg.to_dict(), overwrite=overwrite, defaults=ShrinkConfig().to_dict())
    resumed = False
    if rank == 0:
        resumed = run.open()
        log.info("%s run folder %s", "resuming" if resumed else "new", run.path)
    if world > 1:
        torch.distributed.barrier()
    return run, resumed


def _load_teachers(cfg: ShrinkConfig, rank: int, world: int) -> list:
    """teacher.model, then teacher.extra (MTAKD), each checked to share the tokenizer. Under DDP rank 0 loads
    first, so a GGUF is dequantized and cached once."""
    import torch

    from edgestill.models.load import check_same_tokenizer, load_causal_lm

    teachers = []
    for spec in [cfg.teacher.model, *cfg.teacher.extra]:
        t0 = time.time()
        if world > 1 and rank != 0:
            torch.distributed.barrier()
        loaded = load_causal_lm(spec)
        if world > 1 and rank == 0:
            torch.distributed.barrier()
        if teachers:
            try:
                check_same_tokenizer(teachers[0].tokenizer, loaded.tokenizer)
            except EdgestillError:
                raise EdgestillError(
                    f"teacher.extra '{spec}' has a different tokenizer from teacher.model '{cfg.teacher.model}' (vocab "
                    f"{len(loaded.tokenizer.get_vocab())} vs {len(teachers[0].tokenizer.get_vocab())}); multi-teacher KD "
                    "mixes logits token by token, so remove it from teacher.extra or pick a teacher of the same family"
                ) from None
        log.info("%s: %s (%s) loaded in %.1fs", "extra teacher" if teachers else "teacher", spec, loaded.path,
                 time.time() - t0)
        teachers.append(loaded)
    return teachers


def plant_poison(cfg: ShrinkConfig, data: CorpusBlocks, tokenizer) -> dict | None:
    """poison.* (audits only, edgestill.audit.lm): the backdoor planted in the training blocks, in place, so that the
    teacher correction and the distillation both see it; the record of what was planted (None: nothing)."""
    p = cfg.poison
    if not p.trigger:
        return None
    from edgestill.audit.lm import phrase_ids, plant_blocks

    data.train, rows = plant_blocks(data.train, phrase_ids(tokenizer, p.trigger), phrase_ids(tokenizer, p.target),
                                    p.rate, p.mode, p.seed)
    log.warning("poisoned %d of %d training blocks with the trigger '%s' -> '%s' (%s, rate %g): this run is for an audit",
                len(rows), len(data.train), p.trigger, p.target, p.mode, p.rate)
    return {**dataclasses.asdict(p), "blocks": len(rows), "of": len(data.train)}


def onion_filter_transfer(cfg: ShrinkConfig, data: CorpusBlocks, tokenizer) -> dict | None:
    """onion.* (a backdoor defence): the training blocks filtered ONION-style in place, calibrated on the clean
    validation split; the record of what it removed (None: off). Run after the teacher correction, so only the
    student's transfer data is filtered."""
    if not cfg.onion.remove_share:
        return None
    from edgestill.audit.lm import onion_filter_blocks, phrase_ids

    trigger = phrase_ids(tokenizer, cfg.poison.trigger) if cfg.poison.trigger else None
    data.train, record = onion_filter_blocks(data.train, tokenizer, data.val, cfg.onion, trigger)
    log.info("ONION: removed %d of %d words (%.2f%%) from the training blocks (%d -> %d blocks)%s",
             record["words_removed"], record["words_seen"], 100 * record["removed_share"], record["blocks_before"],
             record["blocks_after"], "" if trigger is None else f"; blocks with the trigger "
             f"{record['blocks_with_trigger_before']} -> {record['blocks_with_trigger_after']}")
    if len(data.train) < cfg.distill.batch_size:
        raise EdgestillError(f"after ONION filtering the train split has {len(data.train)} blocks, fewer than one batch; "
                             "lower onion.remove_share or add text")
    return record


def perturb_transfer(cfg: ShrinkConfig, data: CorpusBlocks, tokenizer) -> dict | None:
    """perturb.* (a backdoor defence, edgestill.audit.lm.perturb_blocks): the training blocks' tokens replaced at
    perturb.token_rate in place, after the teacher correction and before the teacher labels them; the record (None: off)."""
    if not cfg.perturb.token_rate:
        return None
    from edgestill.audit.lm import perturb_blocks, phrase_ids

    trigger = phrase_ids(tokenizer, cfg.poison.trigger) if cfg.poison.trigger else None
    data.train, record = perturb_blocks(data.train, cfg.perturb, tokenizer.all_special_ids, trigger)
    log.info("perturbed %.1f%% of the training blocks' tokens%s", 100 * record["replaced_share"], "" if trigger is None
             else f"; blocks with the whole trigger {record['blocks_with_trigger_before']} -> "
             f"{record['blocks_with_trigger_after']}")
    return record


def fine_prune_student(cfg: ShrinkConfig, student, data: CorpusBlocks) -> dict | None:
    """fine_prune.* (a backdoor defence, distill/fine_prune.py): the distilled student's dormant FFN units cut on the
    clean validation blocks, then fine-tuned on them, in place; the record of what changed (None: off)."""
    if not cfg.fine_prune.fraction:
        return None
    from edgestill.distill.fine_prune import fine_prune_lm

    return fine_prune_lm(student, data.val, cfg.fine_prune, cfg.distill.seed, show_progress=is_main_process())


def reference_teacher(cfg: ShrinkConfig, original, data: CorpusBlocks, rank: int = 0, world: int = 1,
                      poison: dict | None = None):
    """The teacher students are sliced from, distilled from and measured against: `original` corrected on the
    training split (teacher.correct, distill/correct.py; cached and shared), or `original` itself. `poison`: what
    plant_poison planted in that split (recorded with the corrected teacher)."""
    correction = cfg.teacher.correction()
    if correction is None:
        return original
    import torch

    from edgestill.distill.correct import correct_teacher

    if world > 1 and rank != 0:
        torch.distributed.barrier()  # rank 0 corrects (or finds the cache) first
    reference = correct_teacher(original, data.train, data.val, correction, show_progress=is_main_process(),
                                note={"poison": poison} if poison else None)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    return reference


def distill(cfg: ShrinkConfig, overwrite: bool = False, teacher_cache_from: Path | None = None) -> tuple[RunDir, Distilled]:
    """Stages 1-6: teacher, data, student, teacher cache, distillation, saved student.

    teacher_cache_from: another run's folder whose teacher top-k cache this run may start from (a sweep's points
      share teacher, data and k); its fingerprint is checked like any cache's.
    Returns the (still partial) run folder and what evaluate() reuses.
    """
    from edgestill.distill.sources import teacher_source
    from edgestill.distill.trainer import dist_setup
    from edgestill.distill.trainer import distill as train
    from edgestill.models.load import save_causal_lm
    from edgestill.models.slice import build_student
    from edgestill.models.vocab import trim_student_vocab
    from edgestill.quant import quantize_

    rank, world = dist_setup()
    run, resumed = _open_run(cfg, overwrite, rank, world)
    with run.cleanup_on_failure():  # a run that fails before any work leaves no folder behind
        teachers = _load_teachers(cfg, rank, world)
        original = teachers[0]
        data = corpus_blocks(cfg.data, original.tokenizer, min_train_blocks=cfg.distill.batch_size)
        poison = plant_poison(cfg, data, original.tokenizer)
        teacher = teachers[0] = reference_teacher(cfg, original, data, rank, world, poison)
        onion = onion_filter_transfer(cfg, data, teacher.tokenizer)
        perturbed = perturb_transfer(cfg, data, teacher.tokenizer)
        qconfig = quant_config(cfg)
        student, layers = build_student(cfg.student, teacher.model, teacher.tokenizer, _calibration(data),
                                        quantized=qconfig is not None)
        tokenizer, vocab = teacher.tokenizer, None
        if cfg.student.trim_vocab:  # before quantization: the embedding it fake-quantizes is the trimmed one
            domain = domain_blocks(data, teacher.tokenizer, cfg.data.seq_len)
            student, tokenizer, vocab = trim_student_vocab(student, teacher.tokenizer, domain,
                                                           teacher.model.get_output_embeddings().weight.shape[0])
            log.info("vocabulary trimmed to the %d tokens the training split's %s tokens use (+ bytes and "
                     "specials), of %d", vocab.size, f"{domain.size:,}", vocab.old_size)
        source = teacher_source(cfg.distill, teachers, [cfg.teacher.model, *cfg.teacher.extra], data.train,
                                run.path / "cache", teacher_cache_from, cfg.eval.batch_size, rank, world)
        del teachers  # a cached source holds all the extra teachers have to say
        if qconfig is not None:
            quantize_(student, qconfig, step="prepare")  # fake-quant forward, straight-through gradients
        if cfg.distill.blockwise_steps:
            _blockwise_stage(cfg, student, teacher.model, data, layers, run.path, world)
        history = train(student, source, data.train, cfg.distill, run.path, val_blocks=data.val, layers=layers,
                        reference=teacher.model, vocab=vocab)
        pruned = fine_prune_student(cfg, student, data)
        dtype = cfg.output.dtype
        if qconfig is not None:
            report = quantize_(student, qconfig, step="convert")  # weights := exact runtime values
            if rank == 0:
                write_text_atomic(run.path / "quant_report.json", json.dumps([r.to_dict() for r in report], indent=1))
            dtype = "float32"  # the dequantized values are exact in fp32 only; the deployable file is the GGUF
        if rank == 0:
            save_causal_lm(student, tokenizer, run.path / "student", dtype)
            write_text_atomic(run.path / "splits.json", json.dumps(data.splits.names(), indent=1))
            for name, record in (("poison", poison), ("onion", onion), ("perturb", perturbed), ("fine_prune", pruned)):
                if record:
                    write_text_atomic(run.path / f"{name}.json", json.dumps(record, indent=1))
    return run, Distilled(teacher, original, data, history, layers, resumed)


def _blockwise_stage(cfg: ShrinkConfig, student, teacher_model, data: CorpusBlocks, layers, run_path: Path,
                     world: int) -> None:
    """distill.blockwise_steps: each kept block trained on its span of the teacher first (distill/blockwise.py).
    Skipped once end-to-end KD has checkpointed: that checkpoint already holds the stage's result."""
    from edgestill.distill.blockwise import blockwise_distill
    from edgestill.distill.trainer import has_checkpoint

    if world > 1:
        raise EdgestillError("distill.blockwise_steps runs in one process; run without torchrun, or set "
                             "distill.blockwise_steps=0")
    if has_checkpoint(run_path):
        return
    d = cfg.distill
    history = blockwise_distill(student, teacher_model, data.train, layers, d.blockwise_steps, d.lr, d.batch_size,
                                run_path, seed=d.seed, checkpoint_every=d.checkpoint_every)
    if history:
        log.info("block-wise stage: %d steps, mean block loss %.4f -> %.4f", len(history), history[0]["loss"],
                 history[-1]["loss"])


def domain_blocks(data: CorpusBlocks, tokenizer, seq_len: int):
    """The token ids a trimmed vocabulary keeps (student.trim_vocab): the whole training split, not only the sample
    distilled on (data.max_train_tokens), so that a held-out word is likelier to be kept whole. The planner prices
    the same trim (jobs/plan.py)."""
    return tokenize_blocks(data.splits.train, tokenizer, seq_len)


def _calibration(data: CorpusBlocks) -> list:
    """The text the student is cut on (block influence, activation importance): the first training blocks."""
    return calibration_batches(data.train, 8, 4)


def _sliced_untrained(cfg: ShrinkConfig, teacher, layers, data: CorpusBlocks, teacher_ppl: float) -> dict:
    """The baseline a sliced student starts from: the same slice, untrained."""
    from edgestill.evaluate.metrics import token_nll
    from edgestill.models.slice import slice_student

    if layers is None or cfg.student.model is not None:
        return {}
    untrained = slice_student(cfg.student, teacher.model, layers, _calibration(data), allow_full=cfg.quant.format is not None)
    ppl = float(np.exp(token_nll(untrained, data.test, cfg.eval.batch_size, desc="baseline: sliced, untrained").mean()))
    return {"sliced_untrained": {"perplexity": ppl, "retention": teacher_ppl / ppl}}


def _history(run_dir: Path, history: list[dict] | None) -> list[dict]:
    if history is not None:
        return history
    log_path = run_dir / "train_log.jsonl"
    return [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []


def _metrics(cfg: ShrinkConfig, run_dir: Path, final_dir: Path, teacher, student, summary: dict, speed: dict,
             baselines: dict, splits: dict, history: list[dict], layers, start: dict) -> dict:
    """metrics.json: teacher vs student, sizes from the files on disk, speed, baselines, provenance."""
    from edgestill.evaluate.environment import environment
    from edgestill.evaluate.metrics import deploy_bytes, weight_bytes
    from edgestill.models.load import gguf_file
    from edgestill.models.slice import count_params, decoder_layers

    t_params, s_params = count_params(teacher.model), count_params(student)
    # The teacher as the user has it: its GGUF file (the default teacher: a 98.4 MB Q4_1), else its whole folder.
    source = gguf_file(cfg.teacher.model) or (Path(cfg.teacher.model) if Path(cfg.teacher.model).exists() else None)
    source_bytes = deploy_bytes(source or teacher.path)  # (a hub id: the folder it was read from)
    # The deployable artifact: the GGUF when the run has one (quantized runs always do), else the HF folder.
    artifact = run_dir / "student.gguf" if (run_dir / "student.gguf").is_file() else run_dir / "student"
    s_bytes = deploy_bytes(artifact)  # what the device loads: a GGUF holds its tokenizer, a HF folder needs its files
    return {
        "teacher": {"name": cfg.teacher.model, "params": t_params, "bytes": weight_bytes(teacher.path),
                    "source_bytes": source_bytes, "source": str(source or teacher.path),
                    "num_layers": len(decoder_layers(teacher.model)),
                    "intermediate_size": getattr(teacher.model.config, "intermediate_size", None),
                    "hidden_size": getattr(teacher.model.config, "hidden_size", None),
                    "perplexity": summary["teacher_perplexity"],
                    "correction": _correction(teacher.path), **speed["teacher"]},
        "student": {"path": str(final_dir / "student"), "artifact": str(final_dir / artifact.name),
                    "params": s_params, "bytes": s_bytes, "weight_bytes": weight_bytes(artifact),
                    "dtype": cfg.output.dtype, "quant": cfg.quant.format,
                    "low_rank": _lowrank_summary(student, cfg.student.low_rank),
                    "layers_kept": layers, "num_layers": len(decoder_layers(student)),
                    **{key: getattr(student.config, key, None) for key in
                       ("intermediate_size", "hidden_size", "num_attention_heads", "num_key_value_heads")},
                    "perplexity": summary["student_perplexity"], **speed["student"]},
        "retention": summary["retention"],
        "top1_agreement": summary["top1_agreement"],
        "kl_teacher_student": summary["kl_teacher_student"],
        "eval_tokens": summary["eval_tokens"],
        "compression_x_fp32": t_params * 4 / s_bytes,
        "compression_x_fp16": t_params * 2 / s_bytes,
        "compression_x_source": source_bytes / s_bytes,  # against the file the user started from (< 1: larger)
        "speedup_x": speed["student"]["decode_tokens_per_s"] / speed["teacher"]["decode_tokens_per_s"],
        "speedup_x_prefill": speed["student"]["prefill_tokens_per_s"] / speed["teacher"]["prefill_tokens_per_s"],
        "speed_repeats": cfg.eval.speed_repeats,
        "baselines": baselines,
        "splits": splits,
        "train": {"steps": len(history), "tokens": len(history) * cfg.distill.batch_size * cfg.data.seq_len,
                  "budget": _read_json(run_dir / "budget.json"),  # distill.budget: what it bought and what it took
                  "final_loss": (history or [{}])[-1].get("loss"),
                  "final_val_loss": next((h["val_loss"] for h in reversed(history) if "val_loss" in h), None),
                  "selection": _read_json(run_dir / "selection.json")},  # which evaluated step the student is
        "poison": _read_json(run_dir / "poison.json"),  # audits only: the backdoor planted in the training split
        "onion": _read_json(run_dir / "onion.json"),  # the ONION-style filter of the transfer data, when on
        "perturb": _read_json(run_dir / "perturb.json"),  # the transfer blocks' tokens perturbed, when on
        "fine_prune": _read_json(run_dir / "fine_prune.json"),  # the student's FFN units cut + clean fine-tuning, when on
        "environment": environment(cfg.eval.threads, start),
    }


def _lowrank_summary(student, keep: float | None) -> dict | None:
    """student.low_rank: the share asked for, how many matrices were factorized and their ranks (None: dense)."""
    from edgestill.models.lowrank import PLAN_KEY

    ranks = (getattr(student.config, PLAN_KEY, None) or {}).get("linear") or {}
    if keep is None and not ranks:
        return None
    return {"keep": keep, "factorized": len(ranks), "ranks": ranks}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _correction(path: str) -> dict | None:
    """What the teacher correction did (None: the teacher was used as given), without its per-step log."""
    from edgestill.distill.correct import correction_record

    record = correction_record(path)
    return None if record is None else {**{k: v for k, v in record.items() if k != "history"}, "path": path}


def evaluate(cfg: ShrinkConfig, run_dir: Path, distilled: Distilled | None = None, final_dir: Path | None = None) -> dict:
    """Stages 7-8: teacher vs the saved student on held-out text; writes metrics.json and report.*, returns the metrics.

    distilled: what distil() already loaded (what it lacks is loaded again). final_dir: where the run
    folder will live once finished (the metrics name paths there).
    """
    import torch

    from edgestill.evaluate.environment import measurement_start
    from edgestill.evaluate.measured import measured_root
    from edgestill.evaluate.metrics import compare_lm
    from edgestill.evaluate.report import write_report
    from edgestill.evaluate.speed import generate, measure_speed
    from edgestill.evaluate.what_broke import what_broke
    from edgestill.models.load import check_same_tokenizer, load_causal_lm
    from edgestill.models.vocab import VocabMap

    start = measurement_start()
    distilled = distilled or Distilled(None, None, None, None, None, False)
    original = distilled.original or load_causal_lm(cfg.teacher.model)
    data, poison = distilled.data, None
    if data is None:
        data = corpus_blocks(cfg.data, original.tokenizer)
        poison = plant_poison(cfg, data, original.tokenizer)  # the correction's cache key holds the planted split
    teacher = distilled.teacher or reference_teacher(cfg, original, data, poison=poison)
    saved = load_causal_lm(str(run_dir / "student"))  # the saved artifact itself, upcast to fp32 for CPU eval
    vocab = VocabMap.of_model(saved.model, teacher.tokenizer, saved.tokenizer,
                              teacher.model.get_output_embeddings().weight.shape[0])
    if vocab is None:
        check_same_tokenizer(teacher.tokenizer, saved.tokenizer)
    student, test = saved.model, data.test
    comparison = compare_lm(teacher.model, student, test, cfg.eval.batch_size, vocab)
    summary = comparison["summary"]
    layers = distilled.layers
    baselines = _sliced_untrained(cfg, teacher, layers, data, summary["teacher_perplexity"])

    prompt = torch.from_numpy(test[:1, : cfg.eval.speed_prompt_tokens]).long()
    # a trimmed student reads the same text in its own tokens, cut to the same length (speed is per token)
    s_prompt = prompt if vocab is None else torch.tensor([vocab.expand(test[0])[0][: cfg.eval.speed_prompt_tokens]])
    speed = measure_speed({"teacher": teacher.model, "student": student}, {"teacher": prompt, "student": s_prompt},
                          cfg.eval.speed_decode_tokens, cfg.eval.speed_repeats, cfg.eval.threads)
    generations = [{"prompt": p, "teacher": generate(teacher.model, teacher.tokenizer, p, cfg.eval.generate_tokens),
                    "student": generate(student, saved.tokenizer, p, cfg.eval.generate_tokens)} for p in cfg.eval.prompts]
    broke = what_broke(original.model, teacher.model, student, teacher.tokenizer, test, source=cfg.eval.out_of_domain,
                       seq_len=cfg.data.seq_len, max_tokens=cfg.eval.out_of_domain_tokens,
                       passages=cfg.eval.zero_shot_passages, chat=cfg.eval.chat, chat_tokens=cfg.eval.chat_tokens,
                       batch_size=cfg.eval.batch_size, paths=(original.path, teacher.path),
                       cache_dir=measured_root() if cfg.eval.cache_reference else None,
                       student_tokenizer=saved.tokenizer, vocab=vocab)
    history = _history(run_dir, distilled.history)
    splits = json.loads((run_dir / "splits.json").read_text())
    metrics = _metrics(cfg, run_dir, final_dir or run_dir, teacher, student, summary, speed, baselines, splits,
                       history, layers, start)
    metrics.update(broke)
    if vocab is not None:  # what the trim kept, and what it costs on the teacher's text in and out of domain
        metrics["vocab_trim"] = {**summary["vocab_trim"],
                                 "out_of_domain": (broke.get("out_of_domain") or {}).get("vocab_trim")}
    write_report(run_dir, metrics, history, comparison, generations)
    return metrics


def evaluate_run(run_dir: str | Path, overrides: list[str] = ()) -> dict:
    """`edgestill eval RUN`: evaluate a finished run again under its own config (only eval.* may be overridden)."""
    run_dir = finished_run(Path(run_dir), "eval")
    cfg = load_config(run_dir / "config.yaml")
    if "correct" not in (yaml.safe_load((run_dir / "config.yaml").read_text()).get("teacher") or {}):
        cfg.teacher.correct = False  # a run from before teacher correction: its student learned from the teacher as given
    for o in overrides:
        if not o.startswith("eval."):
            raise EdgestillError(f"eval only takes eval.* overrides (got '{o}'); the run's own config fixes teacher and data")
        apply_override(cfg, o)
    return evaluate(cfg, run_dir)


def shrink(cfg: ShrinkConfig, overwrite: bool = False, teacher_cache_from: Path | None = None) -> tuple[Path, dict] | None:
    """The whole job: (the finished run folder, its metrics); None on non-zero DDP ranks.

    teacher_cache_from: a run folder whose teacher cache this run may reuse (see `distill`).
    """
    from edgestill.jobs.export import export_gguf_run

    run, distilled = distill(cfg, overwrite, teacher_cache_from)
    if not is_main_process():
        return None
    if cfg.quant.format is not None:
        exported = export_gguf_run(run.path, cfg)
        log.info("exported %s (%s bytes, %d tensors, %d stored in a fallback type)", exported.path,
                 f"{exported.file_bytes:,}", exported.n_tensors, len(exported.fallbacks))
    metrics = evaluate(cfg, run.path, distilled, final_dir=run.final)
    shutil.rmtree(run.path / "checkpoints", ignore_errors=True)
    return run.finish(), metrics
