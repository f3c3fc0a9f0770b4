"""`edgestill quantize`: the post-training baseline that quantization-aware distillation must beat.

The whole (corrected, see teacher.correct) teacher is quantized to `quant.format` (and `quant.plan`) by round-to-nearest or by GPTQ (calibrated on
blocks of the train split), exported to GGUF and evaluated against the teacher exactly like a student.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from edgestill.config import ShrinkConfig, refuse_poison
from edgestill.data.corpus import calibration_batches, corpus_blocks
from edgestill.errors import EdgestillError
from edgestill.files import write_text_atomic
from edgestill.jobs.export import export_gguf_run
from edgestill.jobs.shrink import Distilled, evaluate, quant_config, reference_teacher
from edgestill.runs import RunDir

METHODS = ("rtn", "gptq")


def quantize(cfg: ShrinkConfig, method: str = "rtn", overwrite: bool = False,
             calibration_blocks: int = 32) -> tuple[Path, dict]:
    """Quantize the teacher by `method`, export and evaluate it; returns (the finished run folder, its metrics)."""
    from edgestill.models.load import load_causal_lm, save_causal_lm
    from edgestill.quant import gptq_quantize_, quantize_

    refuse_poison(cfg, "quantize")
    if method not in METHODS:
        raise EdgestillError(f"unknown post-training method '{method}'; use rtn or gptq")
    qconfig = quant_config(cfg)
    if qconfig is None:
        raise EdgestillError("edgestill quantize needs a format: --type q4_0 (or quant.format=...)")
    run = RunDir(cfg.output.dir, {**cfg.to_dict(), "ptq_method": method}, overwrite=overwrite, defaults=ShrinkConfig().to_dict())
    run.open()
    with run.cleanup_on_failure():
        original = load_causal_lm(cfg.teacher.model)
        data = corpus_blocks(cfg.data, original.tokenizer)
        teacher = reference_teacher(cfg, original, data)  # fine-tune, then quantize: what a user would do instead
        model = copy.deepcopy(teacher.model)
        if method == "gptq":
            report = gptq_quantize_(model, qconfig, calibration_batches(data.train, calibration_blocks, 4))
        else:
            report = quantize_(model, qconfig, step="convert")
        write_text_atomic(run.path / "quant_report.json", json.dumps([r.to_dict() for r in report], indent=1))
        write_text_atomic(run.path / "splits.json", json.dumps(data.splits.names(), indent=1))
        save_causal_lm(model, teacher.tokenizer, run.path / "student", "float32")
        export_gguf_run(run.path, cfg)
        metrics = evaluate(cfg, run.path, Distilled(teacher, original, data, [], None, False), final_dir=run.final)
    return run.finish(), metrics
