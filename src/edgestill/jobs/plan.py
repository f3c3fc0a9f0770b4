"""`edgestill devices`, `edgestill plan` and `edgestill shrink --device`: students planned for a device's budget.

All three calibrate on the same tokens (the first data.corpus.CALIBRATION_BLOCKS blocks of the train split of
`data`), so the same teacher, budget and text rank plans the same way whichever command asks. An impossible
budget is refused from the cost model alone, before the text is read or anything measured.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

from edgestill.config import DataConfig, ShrinkConfig
from edgestill.data.corpus import CALIBRATION_BLOCKS, calibration_batches, corpus_blocks
from edgestill.errors import EdgestillError
from edgestill.files import write_text_atomic

log = logging.getLogger("edgestill")


def devices(show: str | None = None, refresh: bool = False) -> str:
    """The shipped profiles as a table, or one profile (`host` measured, cached unless `refresh`) as YAML."""
    from edgestill.plan.devices import describe_devices
    from edgestill.plan.load import load_device

    if not show:
        return describe_devices()
    return load_device(show, **({"refresh": refresh} if show == "host" else {})).to_yaml()


def _teacher_and_gguf(spec: str):
    """(the loaded teacher, its GGUF file: where the student's tokenizer metadata comes from; None for a HF folder)."""
    from edgestill.models.load import gguf_file, load_causal_lm

    return load_causal_lm(spec), gguf_file(spec)


def trim_to_price(tokenizer, blocks, seq_len: int, teacher_vocab: int):
    """The VocabTrim `shrink student.trim_vocab=true` will cut from the training split of `blocks` (CorpusBlocks), for
    plans to price (`plan --trim-vocab`, `shrink --device`, `sweep`)."""
    from edgestill.jobs.shrink import domain_blocks
    from edgestill.models.vocab import domain_trim

    trim = domain_trim(tokenizer, domain_blocks(blocks, tokenizer, seq_len), teacher_vocab)
    log.info("planning with the vocabulary trimmed to the %d tokens the train split uses (+ bytes and specials), of %d",
             trim.size, trim.old_size)
    return trim


def priced_tokenizer_bytes(gguf, trim=None) -> int:
    """The tokenizer bytes a student's GGUF carries, copied from the teacher's GGUF `gguf` (cut to `trim` when given);
    0 without a teacher GGUF (a HF folder's tokenizer is written from tokenizer.json at export)."""
    from edgestill.plan.cost import tokenizer_metadata_bytes

    return 0 if gguf is None else tokenizer_metadata_bytes(gguf, *((trim.kept, trim.merges) if trim else ()))


def _plan(loaded, gguf, device, budget, data: DataConfig, calibration_blocks: int = CALIBRATION_BLOCKS,
          plan_options: bool = True, correction=None, trim_vocab: bool = False, **plan_kwargs) -> list:
    """edgestill.plan.plan on the teacher `loaded`, after the cheap feasibility check (plan_options: the check's line
    may suggest `edgestill plan`'s own --depths and --context). correction: a distill.correct.CorrectConfig: plan
    for the teacher corrected on the train split of `data` (cached: the one `shrink` then distils from).
    trim_vocab: plan students whose vocabulary is trimmed to the tokens of the train split, as `shrink
    student.trim_vocab=true` cuts it: fewer embedding rows and a shorter tokenizer in every plan's bytes.
    gguf: the teacher's GGUF, whose tokenizer fields (cut to the trim) the student's file copies; None: no tokenizer
    bytes are counted (a HF folder's tokenizer is written from tokenizer.json at export)."""
    from edgestill.distill.correct import correct_teacher
    from edgestill.plan import DEFAULT_FORMATS, check_budget
    from edgestill.plan import plan as plan_students
    from edgestill.plan.cost import StudentShape, Workload
    from edgestill.plan.probe import probe_batches

    kwargs = {"workload": Workload(), "formats": DEFAULT_FORMATS, **plan_kwargs}
    probe = kwargs.get("probe")
    shape = StudentShape.from_config(loaded.model.config)
    trim, blocks = None, None
    if trim_vocab:  # the trim needs the text: read it before the cost model's check, which prices the cut
        blocks = corpus_blocks(data, loaded.tokenizer)
        trim = trim_to_price(loaded.tokenizer, blocks, data.seq_len, shape.vocab)
        shape = dataclasses.replace(shape, vocab=trim.size)
    metadata = priced_tokenizer_bytes(gguf, trim)
    # before the calibration text is read (unless the trim needed it): an impossible budget needs only the shape to fail
    check_budget(shape, device, budget, kwargs["formats"], kwargs.get("depths"), kwargs.get("widths"),
                 kwargs["workload"], metadata, plan_options=plan_options, hiddens=kwargs.get("hiddens"))
    blocks = blocks or corpus_blocks(data, loaded.tokenizer)
    if correction is not None:
        loaded = correct_teacher(loaded, blocks.train, blocks.val, correction)
    if probe is not None:  # its KD steps read the train blocks after the calibration ones
        kwargs["probe_batches"] = probe_batches(blocks.train, calibration_blocks, probe)
    return plan_students(loaded.model, device, budget, calibration_batches(blocks.train, calibration_blocks),
                         metadata_bytes=metadata, vocab_keep=trim.kept if trim else None, **kwargs)


def plan(teacher: str, device, budget, data: DataConfig | None = None, calibration_blocks: int = CALIBRATION_BLOCKS,
         correction=None, trim_vocab: bool = False, **plan_kwargs) -> list:
    """`edgestill plan`: ranked feasible plans (edgestill.plan.Plan) for `teacher` on `device` within `budget`,
    calibrated on the train split of `data` (default: the embedded corpus). correction: a CorrectConfig to plan for
    the corrected teacher (as `shrink` does by default), None for the teacher as given. trim_vocab: students with
    the vocabulary trimmed to that split's tokens (`shrink student.trim_vocab=true`). plan_kwargs go to
    edgestill.plan.plan (formats, depths, widths, hiddens, workload, top, probe, ...)."""
    loaded, gguf = _teacher_and_gguf(teacher)
    return _plan(loaded, gguf, device, budget, data or DataConfig(), calibration_blocks, correction=correction,
                 trim_vocab=trim_vocab, **plan_kwargs)


def plans_json(path: str | Path, device, budget, teacher: str, plans: list) -> Path:
    """Every plan, with the device and budget they were made for, as JSON (atomically)."""
    from edgestill.plan.load import load_device

    data = {"device": load_device(device).to_dict(), "budget": budget.to_dict(), "teacher": teacher,
            "plans": [p.to_dict() for p in plans]}
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n", "writing the plans")


def point_config(base: ShrinkConfig, plan, out: Path, teacher_ffn: int, teacher_hidden: int | None = None) -> ShrinkConfig:
    """The ShrinkConfig that executes `plan` (an edgestill.plan.Plan) into `out`; teacher_ffn / teacher_hidden: the
    teacher's widths (a plan narrower than them sets student.intermediate_size / student.hidden_size)."""
    s = base.student
    if any(w is not None for w in (s.hidden_size, s.num_attention_heads, s.num_key_value_heads)):
        raise EdgestillError("a device plan fixes the layers, the widths and the formats (the hidden size among the "
                             "candidates you give it: --hidden-sizes), not the heads; leave student.hidden_size, "
                             "student.num_attention_heads and student.num_key_value_heads unset with --device and sweep")
    cfg = copy.deepcopy(base)
    cfg.student.layers = list(plan.layers)
    cfg.student.num_layers = len(plan.layers)
    cfg.student.intermediate_size = plan.intermediate_size if plan.intermediate_size < teacher_ffn else None
    cfg.student.hidden_size = plan.shape.hidden if teacher_hidden and plan.shape.hidden < teacher_hidden else None
    cfg.quant.format = plan.default_format
    cfg.quant.plan = dict(plan.quant_plan)
    cfg.student.trim_vocab = bool(plan.vocab)  # a plan priced with the trimmed vocabulary is run with it
    cfg.output.dir = str(out)
    return cfg


def shrink_for_device(cfg: ShrinkConfig, device: str, budget, overwrite: bool = False):
    """`edgestill shrink --device D --max-memory M ...`: plan the best student for the budget, then shrink it.

    The plan fixes the layers kept, the FFN width and the per-layer formats; the run is an ordinary shrink run with
    those settings, plus plan.json (the prediction) next to its metrics so predicted and measured bytes/speed sit
    side by side. Returns what jobs.shrink.shrink returns.
    """
    from edgestill.jobs.shrink import shrink

    loaded, gguf = _teacher_and_gguf(cfg.teacher.model)
    best = _plan(loaded, gguf, device, budget, cfg.data, plan_options=False, correction=cfg.teacher.correction(),
                 trim_vocab=cfg.student.trim_vocab, top=1)[0]
    log.info("plan for %s: %s", device, best.summary())
    point = point_config(cfg, best, Path(cfg.output.dir), loaded.model.config.intermediate_size,
                         loaded.model.config.hidden_size)
    del loaded
    result = shrink(point, overwrite=overwrite)
    if result is not None:
        write_text_atomic(Path(result[0]) / "plan.json", json.dumps({"device": device, "budget": budget.to_dict(),
                                                                     "plan": best.to_dict()}, indent=1))
    return result
