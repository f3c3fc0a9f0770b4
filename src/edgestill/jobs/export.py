"""`edgestill export RUN`: a finished run's student as the file a device runtime loads.

    LM run, --format gguf   export_gguf_run: llama.cpp GGUF; a QAT run keeps its trained formats (quant_report.json)
    LM run, --format onnx   export_onnx_run: onnxruntime graph + tokenizer, checked against PyTorch on held-out tokens
    classifier run          jobs.classify.export_classifier: ONNX folder with tokenizer and label map
"""

from __future__ import annotations

import json
from pathlib import Path

from edgestill.config import ShrinkConfig, load_config
from edgestill.data.corpus import corpus_blocks
from edgestill.errors import EdgestillError
from edgestill.files import write_text_atomic, writing
from edgestill.runs import finished_run, not_partial


def _trained_formats(run_dir: Path) -> dict[str, object]:
    """Linear module name -> the format a quantization-aware run trained it in (empty for a float run)."""
    from edgestill.quant.formats import format_from_dict

    report_path = run_dir / "quant_report.json"
    if not report_path.is_file():
        return {}
    return {layer["name"]: format_from_dict(layer["format"]) for layer in json.loads(report_path.read_text())}


def export_gguf_run(run_dir: Path, cfg: ShrinkConfig, tensor_type: str | None = None, out: Path | None = None):
    """Write the run's student as a llama.cpp GGUF; returns the ExportReport.

    A quantization-aware run stores every tensor in the format it was trained in (quant_report.json) and other
    2-D weights in f16; otherwise all 2-D weights get `tensor_type` (default f16). The tokenizer metadata is
    copied from the teacher's GGUF when the teacher is one.
    """
    from edgestill.export.gguf import export_gguf, format_quantize_fn, trained_tensor_types
    from edgestill.models.load import gguf_file, load_causal_lm, lowrank_plan

    if lowrank_plan(run_dir / "student"):
        raise EdgestillError(f"'{run_dir}' has low-rank blocks (student.low_rank): llama.cpp's graph stores one matrix "
                             "per projection, so a GGUF would have to multiply the factors back into dense matrices "
                             "(no smaller than the dense student); export it with --format onnx, which keeps the two "
                             "smaller MatMuls")
    saved = load_causal_lm(str(run_dir / "student"))
    report_path = run_dir / "quant_report.json"
    per_tensor = {}
    if tensor_type is None and report_path.is_file():
        per_tensor = trained_tensor_types(json.loads(report_path.read_text()), saved.model)
    out = out or run_dir / "student.gguf"
    with writing(out, "exporting the student as GGUF"):
        return export_gguf(saved.model, saved.tokenizer, out, tensor_type or "f16", teacher_gguf=gguf_file(cfg.teacher.model),
                           quantize_fn=format_quantize_fn(per_tensor))


def _onnx_formats(model, tensor_type: str) -> tuple[dict, dict[str, str]]:
    """({Linear name: format}, {Linear name: why it stays fp32}) for one ONNX type applied to every Linear."""
    import torch

    from edgestill.export.onnx import onnx_types
    from edgestill.quant.formats import format_by_name

    if tensor_type not in onnx_types():
        raise EdgestillError(f"ONNX export --type '{tensor_type}': choose one of {', '.join(onnx_types())}")
    formats, fallbacks = {}, {}
    if tensor_type == "f32":
        return formats, fallbacks
    fmt = format_by_name(tensor_type)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if fmt.supports(module.in_features):
                formats[name] = fmt
            else:
                fallbacks[name] = f"rows of {module.in_features} weights are not a multiple of {fmt.block_size}: kept fp32"
    return formats, fallbacks


def export_onnx_run(run_dir: Path, cfg: ShrinkConfig, tensor_type: str | None = None, out: Path | None = None,
                    parity_tokens: int = 256) -> dict:
    """Write the run's student as ONNX (onnxruntime) with its tokenizer, and check it against PyTorch.

    A quantization-aware run keeps its trained formats when they have an exact ONNX op (q4_0, q8_0, int4, int8);
    `tensor_type` (f32 | int8 | int4 | q4_0 | q8_0) instead applies one to every Linear. Rows a 32-weight block does
    not divide stay fp32 and are listed. The parity check runs the file in onnxruntime on `parity_tokens` held-out
    tokens and compares the logits with the PyTorch student's. Returns the export report (also written next to
    the model as export_report.json).
    """
    import torch

    from edgestill.evaluate.metrics import logit_parity
    from edgestill.export.onnx import copy_tokenizer, export_onnx
    from edgestill.models.load import load_causal_lm
    from edgestill.runtime.onnx import onnx_logits

    saved = load_causal_lm(str(run_dir / "student"))
    model = saved.model.float().eval()
    if tensor_type is not None:
        formats, fallbacks = _onnx_formats(model, tensor_type)
    else:
        formats, fallbacks = _trained_formats(run_dir), {}
    out = Path(out) if out else run_dir / "onnx" / "model.onnx"
    with writing(out, "exporting the student as ONNX"):
        report = export_onnx(model, out, formats)
        copy_tokenizer(saved.tokenizer, out.parent)
    test = corpus_blocks(cfg.data, saved.tokenizer).test
    ids = torch.from_numpy(test.reshape(-1)[:parity_tokens]).long()
    with torch.no_grad():
        reference = model(input_ids=ids[None]).logits[0].numpy()  # the saved weights are the exact quantized values
    result = {**report.to_dict(), "fallbacks": fallbacks, "parity_vs_pytorch": logit_parity(reference, onnx_logits(out, ids))}
    write_text_atomic(out.parent / "export_report.json", json.dumps(result, indent=1))
    return result


def _gguf_summary(report) -> list[str]:
    from collections import Counter

    types = sorted(set(report.tensor_types.values()))
    lines = [f"wrote {report.path} ({report.file_bytes:,} bytes, {report.n_tensors} tensors: {', '.join(types)})"]
    return lines + [f"  fallback, {count} tensors: {reason}" for reason, count in Counter(report.fallbacks.values()).items()]


def _onnx_summary(result: dict) -> list[str]:
    kinds = sorted(set(result["formats"].values())) or ["fp32"]
    par = result["parity_vs_pytorch"]
    return [f"wrote {result['path']} ({result['file_bytes']:,} bytes; {len(result['formats'])} quantized "
            f"weights: {', '.join(kinds)}; {result['float_matmuls']} fp32 MatMuls)",
            f"  onnxruntime vs PyTorch on {par['positions']} held-out tokens: top-1 agreement "
            f"{par['top1_agreement']:.4f}, max |diff| {par['max_abs_diff']:.3g}, mean |diff| {par['mean_abs_diff']:.3g}",
            *(f"  fallback {name}: {reason}" for name, reason in result["fallbacks"].items())]


def export(run_dir: str | Path, fmt: str = "gguf", tensor_type: str | None = None, out: str | Path | None = None) -> list[str]:
    """`edgestill export`: write the artifact; returns the lines that describe what was written."""
    from edgestill.jobs import classify

    run_dir = not_partial(Path(run_dir), "export")
    if classify.is_classifier_run(run_dir):
        if fmt != "onnx":
            raise EdgestillError(f"'{run_dir}' is a classifier run: export it with --format onnx")
        out = Path(out) if out else None
        return classify.export_summary(classify.export_classifier(run_dir, tensor_type, out.parent if out and out.suffix == ".onnx" else out))
    run_dir = finished_run(run_dir, "export")
    cfg = load_config(run_dir / "config.yaml")
    if fmt == "onnx":
        return _onnx_summary(export_onnx_run(run_dir, cfg, tensor_type, Path(out) if out else None))
    from edgestill.quant.formats import format_names

    if tensor_type in format_names(gguf=False):  # the registry's formats that only ONNX Runtime runs
        raise EdgestillError(f"--type {tensor_type} is an ONNX format; for GGUF use q8_0 or q4_0")
    return _gguf_summary(export_gguf_run(run_dir, cfg, tensor_type, Path(out) if out else None))
