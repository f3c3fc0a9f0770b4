"""`edgestill sweep`: plans from light to extreme compression, each one shrunk end to end, and the shrink curve.

    reference = the teacher corrected on the training split (jobs.shrink.reference_teacher; the teacher as given
                when teacher.correct=false): every point is sliced from, distilled from and measured against it
    for each file-size budget (fractions of the teacher's fp32 bytes, light -> extreme):
        best plan = plan(reference, device, Budget(max_file_bytes=...))   # shape + per-layer formats (EdgeDistill)
        run it:  edgestill shrink student.layers=... quant.format=... quant.plan=...   -> SWEEP/points/NN-<size>/
    with student.trim_vocab=true every plan is priced with the vocabulary trimmed to the training split's tokens
    (fewer embedding rows, a shorter tokenizer in the GGUF) and every point is cut to it, as `shrink` does alone
    baselines, run by llama.cpp and scored against the reference, in domain and out of domain:
        llama.cpp's own quantizer of the reference (Q8_0 ... Q2_K)       series "llama.cpp"
        the teacher file the user started from, when it is a GGUF        series "original file"
    -> SWEEP/shrink_curve.{json,png}, SWEEP/report.html: KL, top-1 agreement, retention (in and out of domain) vs
       file size, and the break points of each (evaluate/shrink_curve.py)

Every point is an ordinary run folder, so a killed sweep continues where it stopped: finished points are
read back, an interrupted one resumes from its last checkpoint, and the baselines are cached in
SWEEP/baseline.json. The plans themselves are written to SWEEP/plans.json before any training starts, and the
layer sensitivities (the slow part of planning) to SWEEP/sensitivity.json. All of these are kept for one
reference (`reference_key`): made for another teacher (an older sweep, another correction), they are made again,
and a finished point measured against another reference (or made for another plan) is shrunk again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgestill.config import ShrinkConfig, refuse_poison
from edgestill.data.corpus import CALIBRATION_BLOCKS, calibration_batches, corpus_blocks
from edgestill.errors import EdgestillError
from edgestill.files import write_text_atomic
from edgestill.jobs.plan import point_config
from edgestill.plan.allocate import DEFAULT_FORMATS
from edgestill.plan.probe import RecoveryProbe, probe_batches
from edgestill.runs import WorkFolder

log = logging.getLogger("edgestill")

BASELINE_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
SWEEP_MARKER = ".edgestill-sweep"  # marks a folder as a sweep's: only such a folder (or an empty one) is written into


@dataclass
class SweepSettings:
    # File-size budgets as fractions of the teacher's fp32 bytes, light to extreme.
    budgets: list[float] = field(default_factory=lambda: [1 / 4, 1 / 6, 1 / 8, 1 / 12, 1 / 16, 1 / 24])
    device: str = "host"
    thresholds: tuple[float, ...] = (0.95, 0.90)  # in-domain retention bars of the break points
    # Fidelity bars (why these: evaluate/shrink_curve.py): top-1 agreement at least, KL(reference ‖ model) at most.
    top1_thresholds: tuple[float, ...] = (0.90, 0.80)
    kl_thresholds: tuple[float, ...] = (0.10, 0.25)
    baseline_types: tuple[str, ...] = BASELINE_TYPES
    calibration_blocks: int = CALIBRATION_BLOCKS
    formats: tuple[str, ...] = DEFAULT_FORMATS  # what quantization-aware training can use (q4_k's search is too slow)
    hiddens: tuple[int, ...] | None = None  # candidate hidden sizes (Minitron's hidden cut); None: the teacher's alone
    # the recovery probe (plan/probe.py): each budget's best plans re-ranked by their KL after a few KD steps; off by default
    probe: RecoveryProbe = field(default_factory=RecoveryProbe)
    threads: int = 2  # llama.cpp's, scoring the baselines

    def criteria(self) -> list:
        from edgestill.evaluate.shrink_curve import criteria

        return criteria(self.thresholds, self.top1_thresholds, self.kl_thresholds)


@dataclass
class Reference:
    """The teacher every point is measured against, and what names it in the caches."""

    loaded: object  # LoadedModel: the corrected teacher, or the original when teacher.correct=false
    kind: str  # "corrected" or "original" (the `reference` of every result)
    key: str  # reference_key(loaded)

    @property
    def params(self) -> int:
        from edgestill.models.slice import count_params

        return count_params(self.loaded.model)


def reference_key(loaded) -> str:
    """Names the reference's weights (models.load.weights_key of its folder): its folder's name and its weight
    files' sizes and modification times."""
    from edgestill.models.load import weights_key

    return weights_key(loaded.path)


def _sha(blocks: np.ndarray | None) -> str | None:
    return None if blocks is None else hashlib.sha256(np.ascontiguousarray(blocks).tobytes()).hexdigest()[:16]


@dataclass
class HeldOut:
    """The in-domain test blocks and the out-of-domain blocks (None: not measured), with the reference's log-probs
    on them, computed on first use (a resumed sweep whose baselines are all cached never needs them)."""

    reference_model: object
    test: np.ndarray  # (N, T)
    out_of_domain: np.ndarray | None  # (M, T)
    batch_size: int = 8
    _logprobs: tuple | None = field(default=None, init=False, repr=False)

    def logprobs(self) -> tuple:
        """(in-domain ReferenceLogprobs, out-of-domain ReferenceLogprobs or None)."""
        from edgestill.evaluate.gguf_eval import reference_logprobs

        if self._logprobs is None:
            ood = self.out_of_domain
            self._logprobs = (reference_logprobs(self.reference_model, self.test, self.batch_size),
                              None if ood is None else reference_logprobs(self.reference_model, ood, self.batch_size))
        return self._logprobs

    def key(self) -> dict:
        return {"held_out_sha256": _sha(self.test), "out_of_domain_sha256": _sha(self.out_of_domain)}

    def perplexities(self) -> dict:
        """The reference's own perplexity in domain and out of domain (None: not measured)."""
        in_domain, ood = self.logprobs()
        return {"in_domain": in_domain.perplexity, "out_of_domain": None if ood is None else ood.perplexity}


def make_plans(cfg: ShrinkConfig, settings: SweepSettings, teacher, train_blocks, metadata_bytes: int,
               folder: Path | None = None, dropped: list | None = None, reference: str | None = None,
               vocab_keep=None) -> list[dict]:
    """The best feasible plan for every budget (the same plan twice is run once).

    teacher: the model plans are cut from (the sweep's reference); reference: its reference_key, which with the
    formats and the calibration tokens keys the layer sensitivities kept in folder/sensitivity.json (measured once
    for all budgets; a file made for another teacher is measured again).
    Budgets even the smallest student misses are dropped first, from the cost model alone; budgets no plan meets
    after measuring are dropped too. Each drop is appended to `dropped` as {budget_fraction, max_file_bytes, reason}.
    vocab_keep: the teacher token ids a trimmed vocabulary keeps (student.trim_vocab), so every plan is priced with
    the trimmed embedding; metadata_bytes is then the trimmed tokenizer's.
    """
    dropped = [] if dropped is None else dropped
    from edgestill.plan import cached_sensitivity, plan
    from edgestill.plan.allocate import feasible_file_budgets
    from edgestill.plan.cost import StudentShape

    teacher_bytes = 4 * sum(p.numel() for p in teacher.parameters())
    shape = StudentShape.from_config(teacher.config)
    if vocab_keep is not None:
        shape = dataclasses.replace(shape, vocab=len(vocab_keep))
    budgets, too_small = feasible_file_budgets(shape, settings.device, teacher_bytes, settings.budgets, settings.formats,
                                               metadata_bytes, hiddens=settings.hiddens)
    dropped += [{"budget_fraction": f, "max_file_bytes": int(teacher_bytes * f), "reason": why} for f, why in too_small.items()]
    batches = calibration_batches(train_blocks, settings.calibration_blocks)
    # valid for exactly these calibration tokens, teacher and formats (whatever data settings produced them)
    tokens = _sha(train_blocks[: settings.calibration_blocks])
    key = {"formats": list(settings.formats), "teacher": cfg.teacher.model, "reference": reference,
           "calibration_tokens_sha256": tokens}
    sensitivity = cached_sensitivity(teacher, batches, settings.formats, folder / "sensitivity.json" if folder else None, key)
    cache: dict = {}  # reference logits, block influence, structural KL (and the probe's) per shape: shared by the budgets
    probed = probe_batches(train_blocks, settings.calibration_blocks, settings.probe, cfg.distill.batch_size)
    plans, seen = [], set()
    for fraction, budget in budgets:
        try:
            best = plan(teacher, settings.device, budget, batches, formats=settings.formats, sensitivity=sensitivity,
                        metadata_bytes=metadata_bytes, top=1, cache=cache, vocab_keep=vocab_keep,
                        hiddens=settings.hiddens, probe=settings.probe, probe_batches=probed)[0]
        except EdgestillError as e:
            log.warning("budget 1/%.0f of the teacher: %s", 1 / fraction, e)
            dropped.append({"budget_fraction": fraction, "max_file_bytes": budget.max_file_bytes, "reason": str(e)})
            continue
        same = json.dumps([best.layers, best.shape.hidden, best.intermediate_size, best.default_format, best.quant_plan],
                          sort_keys=True)
        if same in seen:
            continue
        seen.add(same)
        plans.append({"budget_fraction": fraction, "max_file_bytes": budget.max_file_bytes, "plan": best.to_dict(),
                      "summary": best.summary()})
    if not plans:
        raise EdgestillError("no budget of the sweep has a feasible plan; use larger budgets (e.g. --budgets 0.25,0.125)")
    return plans


def _gguf_point(name: str, series: str, path: Path, reference: Reference, held_out: HeldOut, source_bytes: int | None,
                threads: int):
    """One GGUF run by llama.cpp, against the reference in and out of domain, with the environment it was scored in."""
    from edgestill.evaluate.environment import environment, measurement_start
    from edgestill.evaluate.gguf_eval import gguf_fidelity
    from edgestill.evaluate.shrink_curve import ShrinkPoint, provenance

    start = measurement_start()
    q = gguf_fidelity(path, *held_out.logprobs(), threads=threads)
    size = path.stat().st_size
    return ShrinkPoint(name, reference.params * 4 / size, q["retention"], q["top1_agreement"], size, series=series,
                       perplexity=q["perplexity"], detail={"gguf": str(path)},
                       compression_x_source=source_bytes / size if source_bytes else None,
                       compression_x_fp16=reference.params * 2 / size, kl_teacher_student=q["kl_teacher_student"],
                       reference=reference.kind, out_of_domain=q["out_of_domain"],
                       environment=provenance(environment(threads, start)))


def baseline_points(folder: Path, reference: Reference, held_out: HeldOut, types, teacher_gguf: Path | None,
                    source_bytes: int | None = None, threads: int = 2) -> tuple[list, dict]:
    """llama.cpp's quantizer of the reference at each type, and the user's own teacher file when it is a GGUF, each
    run by llama.cpp and scored against the reference. Returns (points, the reference's perplexities).

    Cached in folder/baseline.json under the reference, the held-out tokens and the teacher file: a cache made for
    anything else (another reference, an older sweep's list) is scored again, never read.
    """
    from edgestill.evaluate.shrink_curve import LLAMA_CPP, ORIGINAL_FILE, ShrinkPoint
    from edgestill.export.gguf import export_gguf
    from edgestill.runtime.llamacpp import llamacpp_quantize

    key = {"reference": reference.key, "reference_kind": reference.kind, **held_out.key(),
           "source_file": None if teacher_gguf is None else f"{teacher_gguf.name}:{teacher_gguf.stat().st_size}"}
    cache_path = folder / "baseline.json"
    stored = json.loads(cache_path.read_text()) if cache_path.is_file() else None
    fresh = isinstance(stored, dict) and stored.get("key") == key
    done, perplexity = (stored["points"], stored["reference_perplexity"]) if fresh else ({}, None)
    ggufs = folder / "baseline"
    ggufs.mkdir(parents=True, exist_ok=True)
    source = ggufs / f"reference-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:8]}-f32.gguf"
    wanted = [(f"llama.cpp {t}", LLAMA_CPP, t) for t in types]
    if teacher_gguf is not None:
        wanted.append((teacher_gguf.name, ORIGINAL_FILE, None))
    for name, series, qtype in wanted:
        if name in done:
            continue
        if qtype is None:
            path = teacher_gguf  # the file itself, as the user has it
        else:
            if not source.is_file():  # the reference in full precision: only a source for the quantizer
                export_gguf(reference.loaded.model, reference.loaded.tokenizer, source, "f32", teacher_gguf=teacher_gguf)
            path = llamacpp_quantize(source, ggufs / f"reference-{qtype}.gguf", qtype, n_threads=threads)
        done[name] = _gguf_point(name, series, path, reference, held_out, source_bytes, threads).to_dict()
        perplexity = held_out.perplexities()
        write_text_atomic(cache_path, json.dumps({"key": key, "reference_perplexity": perplexity, "points": done}, indent=1))
    source.unlink(missing_ok=True)
    perplexity = perplexity or held_out.perplexities()  # nothing was to be scored (no types, no GGUF teacher)
    return [ShrinkPoint.from_dict(done[name]) for name, _, _ in wanted if name in done], perplexity


def _plans(cfg: ShrinkConfig, settings: SweepSettings, out: Path, reference: Reference, train, metadata: int,
           trim=None) -> tuple[list, list]:
    """(plans, dropped budgets with their reasons): SWEEP/plans.json when it was made for these budgets, device,
    reference, vocabulary (trim: a VocabTrim, or None for the teacher's), formats and hidden sizes, else new plans
    (written before training)."""
    plans_path = out / "plans.json"
    saved = json.loads(plans_path.read_text()) if plans_path.is_file() else None
    vocab = None if trim is None else {"size": trim.size, "kept_sha256": _sha(np.asarray(trim.kept, dtype=np.int64))}
    made_for = {"budgets": settings.budgets, "device": settings.device, "reference": reference.key, "vocab": vocab,
                "formats": list(settings.formats), "hiddens": list(settings.hiddens) if settings.hiddens else None,
                "probe": settings.probe.to_dict() if settings.probe.on else None}
    if saved is not None and {k: saved.get(k) for k in made_for} == made_for:
        return saved["plans"], saved.get("dropped", [])
    dropped: list = []
    plans = make_plans(cfg, settings, reference.loaded.model, train, metadata, out, dropped, reference.key,
                       vocab_keep=None if trim is None else trim.kept)
    write_text_atomic(plans_path, json.dumps({**made_for, "plans": plans, "dropped": dropped}, indent=1))
    return plans, dropped


def _finished_point(run: Path, point_cfg: ShrinkConfig, reference: Reference) -> dict | None:
    """The metrics of `run` when it has finished, ran this plan and was measured against this reference; else None
    (not run yet, or made for another plan or another teacher: it is shrunk again)."""
    from edgestill.config import load_config

    if not (run / "DONE").is_file():
        return None
    m = json.loads((run / "metrics.json").read_text())
    correction = (m.get("teacher") or {}).get("correction") or {}
    against = (m.get("reference"), Path(correction["path"]).name if correction.get("path") else None)
    wanted = (reference.kind, Path(reference.loaded.path).name if reference.kind == "corrected" else None)
    return m if against == wanted and _plan_of(load_config(run / "config.yaml")) == _plan_of(point_cfg) else None


def _plan_of(cfg: ShrinkConfig) -> tuple:
    """What a plan fixes in a point's config (the layers kept, the hidden and FFN widths, the formats, a trimmed
    vocabulary) and the training it gets (distill.budget, else distill.steps): a point finished otherwise is shrunk
    again."""
    training = cfg.distill.budget or cfg.distill.steps
    return (list(cfg.student.layers or []), cfg.student.hidden_size, cfg.student.intermediate_size, cfg.quant.format,
            dict(cfg.quant.plan or {}), training, cfg.student.trim_vocab)


def _shrink_points(cfg: ShrinkConfig, plans: list[dict], out: Path, reference: Reference) -> list:
    """Shrink every plan not yet finished against this reference (each an ordinary run folder) and read back its
    point of the curve."""
    from edgestill.evaluate.shrink_curve import ShrinkPoint
    from edgestill.jobs.shrink import shrink
    from edgestill.plan import Plan

    points, finished = [], []
    for i, p in enumerate(plans):
        plan = Plan.from_dict(p["plan"])
        run = out / "points" / f"{i:02d}-{p['max_file_bytes'] / 1e6:.0f}MB"
        point_cfg = point_config(cfg, plan, run, reference.loaded.model.config.intermediate_size,
                                 reference.loaded.model.config.hidden_size)
        if _finished_point(run, point_cfg, reference) is None:
            stale = (run / "DONE").is_file()  # another plan's or another reference's: replaced once the new one finishes
            log.info("sweep point %d/%d -> %s%s", i + 1, len(plans), run, " (made for another plan or teacher: again)" * stale)
            # every point distils from the same reference on the same text: the first point's cache serves all
            shrink(point_cfg, overwrite=stale, teacher_cache_from=finished[0] if finished else None)
        finished.append(run)
        m = json.loads((run / "metrics.json").read_text())
        name = f"{len(plan.layers)}L {plan.default_format}" + ("+mix" if plan.quant_plan else "")
        points.append(ShrinkPoint.from_metrics(name, m, {"run": str(run), "plan": p["plan"],
                                                         "predicted_file_bytes": p["plan"]["prediction"]["file_bytes"]}))
    return points


def sweep(cfg: ShrinkConfig, settings: SweepSettings, out: str | Path) -> dict:
    """Plan, shrink every point (resuming), score the llama.cpp baselines, write the shrink curve. Returns its JSON.

    `out` is created if needed; an existing folder must be empty or an earlier sweep's (which is resumed).
    """
    refuse_poison(cfg, "sweep")
    from edgestill.plan.allocate import check_formats

    check_formats(settings.formats)  # before the teacher is loaded and corrected
    if any(not 0 < f < 1 for f in settings.budgets):
        raise EdgestillError(f"sweep budgets {settings.budgets} must be fractions of the teacher's bytes, between 0 and 1")
    if cfg.student.low_rank is not None:
        raise EdgestillError("the sweep does not take student.low_rank: its points are GGUFs scored in llama.cpp, and a "
                             "low-rank student has no GGUF; run `edgestill shrink student.low_rank=...` for one student "
                             "instead")
    folder = WorkFolder(out, SWEEP_MARKER, "sweep", legacy_files=("plans.json", "sensitivity.json"))
    out = folder.open()
    with folder.cleanup_on_failure():  # a sweep that fails before any work leaves no folder behind
        return _sweep(cfg, settings, out)


def _held_out(cfg: ShrinkConfig, reference: Reference, test: np.ndarray) -> HeldOut:
    """The in-domain test blocks and, when eval.out_of_domain is set, the general-English blocks every run's
    what-broke section measures (the same call, so the same tokens)."""
    from edgestill.data.general import out_of_domain_blocks

    ood = None
    if cfg.eval.out_of_domain:
        ood = out_of_domain_blocks(reference.loaded.tokenizer, cfg.data.seq_len, cfg.eval.out_of_domain_tokens,
                                   cfg.eval.out_of_domain)
    return HeldOut(reference.loaded.model, test, ood, cfg.eval.batch_size)


def _sweep(cfg: ShrinkConfig, settings: SweepSettings, out: Path) -> dict:
    from edgestill.evaluate.environment import environment, measurement_start
    from edgestill.evaluate.metrics import deploy_bytes
    from edgestill.evaluate.shrink_curve import write_shrink_report
    from edgestill.jobs.plan import priced_tokenizer_bytes, trim_to_price
    from edgestill.jobs.shrink import reference_teacher
    from edgestill.models.load import gguf_file, load_causal_lm

    start = measurement_start()
    began = environment(start=start)  # the code the sweep started with (a point resumed later records its own)
    original = load_causal_lm(cfg.teacher.model)
    data = corpus_blocks(cfg.data, original.tokenizer)
    loaded = reference_teacher(cfg, original, data)
    reference = Reference(loaded, "corrected" if loaded is not original else "original", reference_key(loaded))
    teacher_gguf = gguf_file(cfg.teacher.model)
    source = teacher_gguf or Path(original.path)  # the teacher file(s) the user started from
    source_bytes = deploy_bytes(source)  # a GGUF holds its tokenizer; a folder counts its tokenizer files too
    del original  # the points load it again for their what-broke section
    # every plan priced with the embedding and tokenizer `shrink` will cut
    trim = trim_to_price(loaded.tokenizer, data, cfg.data.seq_len, loaded.model.config.vocab_size) \
        if cfg.student.trim_vocab else None
    metadata = priced_tokenizer_bytes(teacher_gguf, trim)
    plans, dropped = _plans(cfg, settings, out, reference, data.train, metadata, trim)
    for i, p in enumerate(plans):
        log.info("plan %d/%d (budget %.1f MB): %s", i + 1, len(plans), p["max_file_bytes"] / 1e6, p["summary"])
    points = _shrink_points(cfg, plans, out, reference)

    held_out = _held_out(cfg, reference, data.test)
    baselines, perplexity = baseline_points(out, reference, held_out, settings.baseline_types, teacher_gguf,
                                            source_bytes, settings.threads)
    ood = held_out.out_of_domain
    end = environment(start=start)
    meta = {"title": f"{cfg.teacher.model} on {cfg.data.path}: fidelity and retention vs file size",
            "teacher": cfg.teacher.model, "data": cfg.data.path, "device": settings.device, "budgets": settings.budgets,
            "dropped_budgets": dropped, "reference": reference.kind, "reference_path": loaded.path,
            "reference_key": reference.key, "reference_params": reference.params,
            "source_file": {"path": str(source), "bytes": source_bytes},
            "held_out_tokens": int(data.test[:, 1:].size), "reference_perplexity": perplexity["in_domain"],
            "out_of_domain": None if ood is None else {"source": cfg.eval.out_of_domain, "tokens": int(ood[:, 1:].size),
                                                       "reference_perplexity": perplexity["out_of_domain"]},
            "environment": {**end, "git_commit": began["git_commit"], "git_dirty": began["git_dirty"],
                            "git_commit_end": end["git_commit"], "git_dirty_end": end["git_dirty"]},
            "note": "All figures against the reference. edgestill points: from the PyTorch model holding the exact "
                    "quantized weights (its run's metrics.json); llama.cpp and original-file points: from llama.cpp's "
                    "logits. Bytes are the GGUF files'. Each point's environment says when and with which code it "
                    "was measured."}
    return write_shrink_report(out, points + baselines, meta, settings.criteria())
