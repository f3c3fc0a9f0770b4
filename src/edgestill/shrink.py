"""The main job, stage by stage: load -> split -> slice -> cache teacher -> distil -> save -> evaluate -> report.

`shrink(cfg)` is what `edgestill shrink` runs; `distill_run` and `evaluate_run` are its two
halves (`edgestill distill`, `edgestill eval`). Each stage logs what it does; every long one
shows a progress bar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from edgestill.config import ShrinkConfig
from edgestill.errors import EdgestillError
from edgestill.files import write_text_atomic, writing
from edgestill.progress import is_main_process
from edgestill.runs import RunDir

log = logging.getLogger("edgestill")


def _blocks_for(cfg: ShrinkConfig, tokenizer):
    from edgestill.data.corpus import load_documents, split_documents, tokenize_blocks

    d = cfg.data
    docs = load_documents(d.path, d.text_field)
    splits = split_documents(docs, d.val_fraction, d.test_fraction, d.split_seed)
    train = tokenize_blocks(splits.train, tokenizer, d.seq_len, d.max_train_tokens, seed=d.split_seed)
    val = tokenize_blocks(splits.val, tokenizer, d.seq_len, d.max_val_tokens, seed=d.split_seed)
    test = tokenize_blocks(splits.test, tokenizer, d.seq_len, d.max_eval_tokens, seed=d.split_seed)
    if len(test) == 0 or len(val) == 0:
        raise EdgestillError(
            f"corpus too small: the held-out split has {len(test)} and the validation split {len(val)} blocks of "
            f"{d.seq_len} tokens; add text or lower data.seq_len"
        )
    if len(train) < cfg.distill.batch_size:
        raise EdgestillError(
            f"corpus too small: the train split has {len(train)} blocks of {d.seq_len} tokens, fewer than one batch "
            f"of {cfg.distill.batch_size}; add text, or lower data.seq_len / distill.batch_size"
        )
    log.info("data: %d train / %d val / %d test blocks of %d tokens (split by document: %d / %d / %d docs)",
             len(train), len(val), len(test), d.seq_len, len(splits.train), len(splits.val), len(splits.test))
    return splits, train, val, test


def _build_student(cfg: ShrinkConfig, teacher, tokenizer, calibration: np.ndarray):
    import torch

    from edgestill.models.load import check_same_tokenizer, load_causal_lm
    from edgestill.models.slice import block_influence, choose_layers, count_params, decoder_layers, slice_decoder

    s = cfg.student
    if s.model:
        loaded = load_causal_lm(s.model)
        check_same_tokenizer(tokenizer, loaded.tokenizer)
        if count_params(loaded.model) >= count_params(teacher):
            raise EdgestillError(
                f"student '{s.model}' has {count_params(loaded.model):,} parameters, not fewer than the teacher's "
                f"{count_params(teacher):,}: nothing would be shrunk; pick a smaller student"
            )
        return loaded.model, None
    n = len(decoder_layers(teacher))
    if s.layers is not None:
        layers = sorted(s.layers)
    else:
        if s.num_layers >= n and s.intermediate_size is None and cfg.quant.format is None:
            raise EdgestillError(
                f"student.num_layers={s.num_layers} keeps all {n} teacher layers at full width: the student would be as "
                "large as the teacher; set student.num_layers lower, student.intermediate_size smaller, or quantize "
                "it (quant.format=q4_0: quantization-aware distillation of the whole teacher)"
            )
        scores = None
        if s.layer_selection == "block_influence":
            batches = [torch.from_numpy(calibration[i : i + 4]).long() for i in range(0, min(len(calibration), 8), 4)]
            scores = block_influence(teacher, batches)
        layers = choose_layers(n, min(s.num_layers, n), scores)
    student = slice_decoder(teacher, layers, s.intermediate_size, allow_full=cfg.quant.format is not None)
    log.info("student: layers %s of %d, FFN %s -> %s params (teacher %s)", layers, n,
             student.config.intermediate_size, f"{count_params(student):,}", f"{count_params(teacher):,}")
    return student, layers


def _quant_config(cfg: ShrinkConfig):
    """The QuantConfig of the recipe's `quant` section, or None when training in float."""
    if cfg.quant.format is None:
        return None
    from edgestill.quant import QuantConfig
    from edgestill.quant.formats import format_by_name

    return QuantConfig(default=format_by_name(cfg.quant.format),
                       plan={name: format_by_name(f) for name, f in cfg.quant.plan.items()}, skip=list(cfg.quant.skip),
                       activations=cfg.quant.activations)


def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()[:16]


def _copy_cache(source_run: Path | None, cache_dir: Path) -> None:
    """Start `cache_dir` (RUN/cache/<name>) from `source_run`/cache/<name> when it has none (atomically)."""
    source = Path(source_run) / "cache" / cache_dir.name if source_run is not None else None
    if source is None or not source.is_dir() or cache_dir.exists():
        return
    tmp = cache_dir.with_name(cache_dir.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    os.replace(tmp, cache_dir)
    log.info("teacher cache copied from %s (its fingerprint is checked before use)", source_run)


def _save_student(student, tokenizer, folder: Path, dtype: str) -> None:
    """Save the student as a HF folder (safetensors + tokenizer), atomically: all of it or nothing."""
    import torch

    from edgestill.files import atomic_path

    nbytes = sum(p.numel() for p in student.parameters()) * torch.finfo(getattr(torch, dtype)).bits // 8
    try:
        with atomic_path(folder, "saving the student", needed_bytes=nbytes, is_dir=True) as tmp:
            student.to(getattr(torch, dtype)).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    finally:
        student.to(torch.float32)


def distill_run(cfg: ShrinkConfig, overwrite: bool = False, teacher_cache_from: Path | None = None) -> tuple[RunDir, dict]:
    """Stages 1-6: teacher, data, student, teacher cache, distillation, saved student.

    teacher_cache_from: another run's folder whose teacher top-k cache (single or multi-teacher) this run may
      start from (a sweep's points share teacher, data and k). It is copied only where this run has none yet, and its
      fingerprint is checked like any cache: a cache of another teacher, text or k is rebuilt.
    Returns the (still partial) run folder and a context dict that `evaluate_run` can reuse.
    """
    import torch

    from edgestill.distill.teacher_cache import build_topk_cache, build_union_topk_cache
    from edgestill.distill.trainer import CachedTeacher, LiveTeacher, MultiTeacher, dist_setup, distill, needs_live_teacher
    from edgestill.models.load import check_same_tokenizer, load_causal_lm

    rank, world = dist_setup()
    run = RunDir(cfg.output.dir, cfg.to_dict(), overwrite=overwrite, defaults=ShrinkConfig().to_dict())
    resumed = False
    if rank == 0:
        resumed = run.open()
        log.info("%s run folder %s", "resuming" if resumed else "new", run.path)
    if world > 1:
        torch.distributed.barrier()

    with run.cleanup_on_failure():  # a run that fails before any work leaves no folder behind
        t0 = time.time()
        if world > 1 and rank != 0:
            torch.distributed.barrier()  # rank 0 loads first, so a GGUF is dequantized and cached once
        teacher = load_causal_lm(cfg.teacher.model)
        if world > 1 and rank == 0:
            torch.distributed.barrier()
        log.info("teacher: %s (%s) loaded in %.1fs", cfg.teacher.model, teacher.path, time.time() - t0)
        extras = []  # MTAKD: more teachers sharing the tokenizer (loaded in the same order on every rank)
        for spec in cfg.teacher.extra:
            if world > 1 and rank != 0:
                torch.distributed.barrier()
            extra = load_causal_lm(spec)
            if world > 1 and rank == 0:
                torch.distributed.barrier()
            try:
                check_same_tokenizer(teacher.tokenizer, extra.tokenizer)
            except EdgestillError:
                raise EdgestillError(
                    f"teacher.extra '{spec}' has a different tokenizer from teacher.model '{cfg.teacher.model}' (vocab "
                    f"{len(extra.tokenizer.get_vocab())} vs {len(teacher.tokenizer.get_vocab())}); multi-teacher KD mixes "
                    "logits token by token, so remove it from teacher.extra or pick a teacher of the same family") from None
            log.info("extra teacher: %s (%s)", spec, extra.path)
            extras.append(extra)
        splits, train, val, test = _blocks_for(cfg, teacher.tokenizer)
        student, layers = _build_student(cfg, teacher.model, teacher.tokenizer, train)

        if extras:
            models = [teacher.model] + [e.model for e in extras]
            names = [cfg.teacher.model, *cfg.teacher.extra]
            live_model = teacher.model if needs_live_teacher(cfg.distill) else None
            if cfg.distill.cache_teacher:
                fp = _fingerprint(*(t.path for t in [teacher, *extras]), train.tobytes(), cfg.distill.top_k, "union")
                cache_dir = run.path / "cache" / "teachers_union_topk"
                if rank == 0:
                    _copy_cache(teacher_cache_from, cache_dir)
                    build_union_topk_cache(models, train, cfg.distill.top_k, cache_dir, fp,
                                           batch_size=max(1, cfg.eval.batch_size // len(models)))
                if world > 1:
                    torch.distributed.barrier()
                from edgestill.distill.teacher_cache import UnionTopKCache

                source = MultiTeacher(names, cfg.distill.top_k, cache=UnionTopKCache(cache_dir), model=live_model)
                del extras, models  # the cache holds all the extra teachers have to say
            else:
                source = MultiTeacher(names, cfg.distill.top_k, models=models)
        elif cfg.distill.cache_teacher:
            fp = _fingerprint(teacher.path, train.tobytes(), cfg.distill.top_k)
            cache_dir = run.path / "cache" / "teacher_topk"
            if rank == 0:
                _copy_cache(teacher_cache_from, cache_dir)
                cache = build_topk_cache(teacher.model, train, cfg.distill.top_k, cache_dir, fp, batch_size=cfg.eval.batch_size)
            if world > 1:
                torch.distributed.barrier()
            if rank != 0:
                from edgestill.distill.teacher_cache import TopKCache

                cache = TopKCache(cache_dir)
            # hidden-state / relation / on-policy terms need the teacher itself; the cache still serves the logits
            source = CachedTeacher(cache, model=teacher.model if needs_live_teacher(cfg.distill) else None)
        else:
            source = LiveTeacher(teacher.model, cfg.distill.top_k)

        quant_config = _quant_config(cfg)
        if quant_config is not None:
            from edgestill.quant import quantize_

            quantize_(student, quant_config, step="prepare")  # fake-quant forward, straight-through gradients
        history = distill(student, source, train, cfg.distill, run.path, val_blocks=val, layers=layers)
        dtype = cfg.output.dtype
        if quant_config is not None:
            report = quantize_(student, quant_config, step="convert")  # weights := exact runtime values
            if rank == 0:
                write_text_atomic(run.path / "quant_report.json", json.dumps([r.to_dict() for r in report], indent=1))
            dtype = "float32"  # the dequantized values are exact in fp32 only; the deployable file is the GGUF
        if rank == 0:
            _save_student(student, teacher.tokenizer, run.path / "student", dtype)
            write_text_atomic(run.path / "splits.json", json.dumps(splits.names(), indent=1))
        context = {"teacher": teacher, "splits": splits, "test": test, "history": history, "layers": layers, "resumed": resumed}
    return run, context


def evaluate_run(cfg: ShrinkConfig, run_dir: Path, teacher=None, test=None, splits=None, history=None, layers=None,
                 final_dir: Path | None = None) -> dict:
    """Stages 7-8: teacher vs the saved student on held-out text; metrics.json + report.*.

    `final_dir` is where the run folder will live once finished (metrics name paths there).
    """
    import torch

    from edgestill.evaluate.environment import environment
    from edgestill.evaluate.metrics import compare_lm, token_nll, weight_bytes
    from edgestill.evaluate.report import summary_text, write_report
    from edgestill.evaluate.speed import generate, measure_speed
    from edgestill.models.load import check_same_tokenizer, load_causal_lm
    from edgestill.models.slice import count_params, decoder_layers

    if teacher is None:
        teacher = load_causal_lm(cfg.teacher.model)
    if test is None:
        splits, _, _, test = _blocks_for(cfg, teacher.tokenizer)
    student_dir = run_dir / "student"
    saved = load_causal_lm(str(student_dir))  # the saved artifact itself, upcast to fp32 for CPU eval
    check_same_tokenizer(teacher.tokenizer, saved.tokenizer)
    student = saved.model
    comparison = compare_lm(teacher.model, student, test, cfg.eval.batch_size)
    summary = comparison["summary"]

    baselines = {}
    if layers is not None and cfg.student.model is None:
        from edgestill.models.slice import slice_decoder

        untrained = slice_decoder(teacher.model, layers, cfg.student.intermediate_size, allow_full=cfg.quant.format is not None)
        ppl = float(np.exp(token_nll(untrained, test, cfg.eval.batch_size, desc="baseline: sliced, untrained").mean()))
        baselines["sliced_untrained"] = {"perplexity": ppl, "retention": summary["teacher_perplexity"] / ppl}
        del untrained

    prompt = torch.from_numpy(test[:1, : cfg.eval.speed_prompt_tokens]).long()
    speed = measure_speed({"teacher": teacher.model, "student": student}, prompt, cfg.eval.speed_decode_tokens,
                          cfg.eval.speed_repeats, cfg.eval.threads)
    generations = [{"prompt": p, "teacher": generate(teacher.model, teacher.tokenizer, p, cfg.eval.generate_tokens),
                    "student": generate(student, teacher.tokenizer, p, cfg.eval.generate_tokens)} for p in cfg.eval.prompts]

    if history is None:
        log_path = run_dir / "train_log.jsonl"
        history = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
    t_params, s_params = count_params(teacher.model), count_params(student)
    # The deployable artifact: the GGUF when the run has one (quantized runs always do), else the HF folder.
    artifact = run_dir / "student.gguf" if (run_dir / "student.gguf").is_file() else student_dir
    s_bytes = weight_bytes(artifact)
    metrics = {
        "teacher": {"name": cfg.teacher.model, "params": t_params, "bytes": weight_bytes(teacher.path),
                    "num_layers": len(decoder_layers(teacher.model)), "perplexity": summary["teacher_perplexity"],
                    **speed["teacher"]},
        "student": {"path": str((final_dir or run_dir) / "student"), "artifact": str((final_dir or run_dir) / artifact.name),
                    "params": s_params, "bytes": s_bytes, "dtype": cfg.output.dtype, "quant": cfg.quant.format,
                    "layers_kept": layers, "num_layers": len(decoder_layers(student)),
                    "intermediate_size": getattr(student.config, "intermediate_size", None),
                    "perplexity": summary["student_perplexity"], **speed["student"]},
        "retention": summary["retention"],
        "top1_agreement": summary["top1_agreement"],
        "kl_teacher_student": summary["kl_teacher_student"],
        "eval_tokens": summary["eval_tokens"],
        "compression_x_fp32": t_params * 4 / s_bytes,
        "compression_x_fp16": t_params * 2 / s_bytes,
        "speedup_x": speed["student"]["decode_tokens_per_s"] / speed["teacher"]["decode_tokens_per_s"],
        "speedup_x_prefill": speed["student"]["prefill_tokens_per_s"] / speed["teacher"]["prefill_tokens_per_s"],
        "speed_repeats": cfg.eval.speed_repeats,
        "baselines": baselines,
        "splits": splits.names() if splits is not None else json.loads((run_dir / "splits.json").read_text()),
        "train": {"steps": len(history or []), "final_loss": (history or [{}])[-1].get("loss"),
                  "final_val_loss": next((h["val_loss"] for h in reversed(history or []) if "val_loss" in h), None)},
        "environment": environment(cfg.eval.threads),
    }
    write_report(run_dir, metrics, history, comparison, generations)
    print(summary_text(metrics), flush=True)
    return metrics


def export_student_gguf(run_dir: Path, cfg: ShrinkConfig, tensor_type: str | None = None, out: Path | None = None):
    """Write the run's student as a llama.cpp GGUF; returns the ExportReport.

    A quantization-aware run stores every tensor in the format it was trained in (quant_report.json)
    and other 2-D weights in f16; otherwise all 2-D weights get `tensor_type` (default f16). The
    tokenizer metadata is copied from the teacher's GGUF when the teacher is one.
    """
    from edgestill.export.gguf import export_gguf, format_quantize_fn, hf_to_gguf_name
    from edgestill.models.load import load_causal_lm, resolve_model_path

    saved = load_causal_lm(str(run_dir / "student"))
    per_tensor: dict[str, str] = {}
    report_path = run_dir / "quant_report.json"
    if report_path.is_file() and tensor_type is None:
        from edgestill.quant.formats import format_from_dict

        for layer in json.loads(report_path.read_text()):
            name = format_from_dict(layer["format"]).ggml_type.lower()
            for module in [layer["name"], *layer["tied"]]:
                hf_name = module + ".weight"
                if hf_name == "lm_head.weight" and getattr(saved.model.config, "tie_word_embeddings", False):
                    hf_name = "model.embed_tokens.weight"  # one stored tensor for a tied head
                per_tensor[hf_to_gguf_name(hf_name)] = name
    teacher_path = resolve_model_path(cfg.teacher.model)
    teacher_gguf = teacher_path if teacher_path.suffix.lower() == ".gguf" else None
    out = out or run_dir / "student.gguf"
    with writing(out, "exporting the student as GGUF"):
        return export_gguf(saved.model, saved.tokenizer, out, tensor_type or "f16", teacher_gguf=teacher_gguf,
                           quantize_fn=format_quantize_fn(per_tensor))


def _trained_formats(run_dir: Path) -> dict[str, object]:
    """Linear module name -> the format a quantization-aware run trained it in (empty for a float run)."""
    from edgestill.quant.formats import format_from_dict

    report_path = run_dir / "quant_report.json"
    if not report_path.is_file():
        return {}
    return {layer["name"]: format_from_dict(layer["format"]) for layer in json.loads(report_path.read_text())}


def export_student_onnx(run_dir: Path, cfg: ShrinkConfig, tensor_type: str | None = None, out: Path | None = None,
                        parity_tokens: int = 256) -> dict:
    """Write the run's student as ONNX (onnxruntime) with its tokenizer, and check it against PyTorch.

    A quantization-aware run keeps its trained formats when they have an exact ONNX op (q4_0, q8_0,
    int4, int8); `tensor_type` (f32 | int8 | int4 | q4_0 | q8_0) instead applies one to every Linear.
    Rows a 32-weight block does not divide stay fp32 and are listed. The parity check runs the file
    in onnxruntime on `parity_tokens` held-out tokens and compares the logits with the PyTorch
    student's. Returns the export report (also written next to the model as export_report.json).
    """
    import torch

    from edgestill.export.llamacpp import logit_parity
    from edgestill.export.onnx import ONNX_TYPES, copy_tokenizer, export_onnx, onnx_logits
    from edgestill.models.load import load_causal_lm
    from edgestill.quant.formats import format_by_name

    saved = load_causal_lm(str(run_dir / "student"))
    model = saved.model.float().eval()
    fallbacks: dict[str, str] = {}
    if tensor_type is not None:
        if tensor_type not in ONNX_TYPES:
            raise EdgestillError(f"ONNX export --type '{tensor_type}': choose one of {', '.join(ONNX_TYPES)}")
        formats = {}
        if tensor_type != "f32":
            fmt = format_by_name(tensor_type)
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear):
                    if fmt.supports(module.in_features):
                        formats[name] = fmt
                    else:
                        fallbacks[name] = f"rows of {module.in_features} weights are not a multiple of {fmt.block_size}: kept fp32"
    else:
        formats = _trained_formats(run_dir)
    out = Path(out) if out else run_dir / "onnx" / "model.onnx"
    with writing(out, "exporting the student as ONNX"):
        report = export_onnx(model, out, formats)
        copy_tokenizer(saved.tokenizer, out.parent)

    _, _, _, test = _blocks_for(cfg, saved.tokenizer)
    ids = torch.from_numpy(test.reshape(-1)[:parity_tokens]).long()
    with torch.no_grad():
        reference = model(input_ids=ids[None]).logits[0].numpy()  # the saved weights are the exact quantized values
    parity = logit_parity(reference, onnx_logits(out, ids))
    result = {**report.to_dict(), "fallbacks": fallbacks, "parity_vs_pytorch": parity}
    write_text_atomic(out.parent / "export_report.json", json.dumps(result, indent=1))
    return result


def quantize_run(cfg: ShrinkConfig, method: str = "rtn", overwrite: bool = False, calibration_blocks: int = 32) -> Path:
    """Post-training quantization of the whole teacher (the baseline QAT+KD must beat).

    The teacher is quantized to `quant.format` (and `quant.plan`) by round-to-nearest or by GPTQ on
    `calibration_blocks` blocks of the train split, exported to GGUF and evaluated like a student.
    """
    import copy

    import torch

    from edgestill.models.load import load_causal_lm
    from edgestill.quant import gptq_quantize_, quantize_

    if method not in ("rtn", "gptq"):
        raise EdgestillError(f"unknown post-training method '{method}'; use rtn or gptq")
    quant_config = _quant_config(cfg)
    if quant_config is None:
        raise EdgestillError("edgestill quantize needs a format: --type q4_0 (or quant.format=...)")
    run = RunDir(cfg.output.dir, {**cfg.to_dict(), "ptq_method": method}, overwrite=overwrite, defaults=ShrinkConfig().to_dict())
    run.open()
    with run.cleanup_on_failure():
        teacher = load_causal_lm(cfg.teacher.model)
        splits, train, _, test = _blocks_for(cfg, teacher.tokenizer)
        model = copy.deepcopy(teacher.model)
        if method == "gptq":
            calibration = [torch.from_numpy(train[i : i + 4]).long() for i in range(0, min(len(train), calibration_blocks), 4)]
            report = gptq_quantize_(model, quant_config, calibration)
        else:
            report = quantize_(model, quant_config, step="convert")
        write_text_atomic(run.path / "quant_report.json", json.dumps([r.to_dict() for r in report], indent=1))
        write_text_atomic(run.path / "splits.json", json.dumps(splits.names(), indent=1))
        _save_student(model, teacher.tokenizer, run.path / "student", "float32")
        export_student_gguf(run.path, cfg)
        evaluate_run(cfg, run.path, teacher, test, splits, history=[], layers=None, final_dir=run.final)
    final = run.finish()
    print(f"run folder: {final}", flush=True)
    return final


def shrink(cfg: ShrinkConfig, overwrite: bool = False, teacher_cache_from: Path | None = None) -> Path | None:
    """The whole job. Returns the finished run folder (None on non-zero DDP ranks).

    teacher_cache_from: a run folder whose teacher cache this run may reuse (see `distill_run`).
    """
    run, ctx = distill_run(cfg, overwrite, teacher_cache_from)
    if not is_main_process():
        return None
    if cfg.quant.format is not None:
        exported = export_student_gguf(run.path, cfg)
        log.info("exported %s (%s bytes, %d tensors, %d stored in a fallback type)", exported.path,
                 f"{exported.file_bytes:,}", exported.n_tensors, len(exported.fallbacks))
    evaluate_run(cfg, run.path, ctx["teacher"], ctx["test"], ctx["splits"], ctx["history"], ctx["layers"], final_dir=run.final)
    shutil.rmtree(run.path / "checkpoints", ignore_errors=True)
    final = run.finish()
    print(f"run folder: {final}", flush=True)
    return final
