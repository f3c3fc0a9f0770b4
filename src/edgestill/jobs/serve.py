"""`edgestill serve`: a run's student (its GGUF), a sweep's students, or GGUF files behind the OpenAI-compatible server
(serve/app.py), in one variant or several (serve/variants.py: adaptive quantization).

    edgestill serve RUN                          the run's student.gguf
    edgestill serve RUN --variants q8_0,q4_k_m   + the student in llama.cpp's Q8_0 and Q4_K_M (made once, RUN/variants/)
    edgestill serve SWEEP                        every point's student.gguf of an `edgestill sweep` folder
    edgestill serve a.gguf b.gguf                these files, as variants of one model (they must share the tokenizer)
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgestill.errors import EdgestillError

log = logging.getLogger("edgestill")


def resolve_gguf(target: str | Path) -> Path:
    """A .gguf file as it is; a run folder -> its student.gguf."""
    from edgestill.models.load import check_gguf

    path = Path(target)
    if not path.exists():
        raise EdgestillError(f"'{target}' does not exist; give a run folder (edgestill shrink --out ...) or a .gguf file")
    if path.is_dir():
        gguf = path / "student.gguf"
        if not gguf.is_file():
            hint = (f"export it first: edgestill export {path} --type q8_0" if (path / "student").is_dir()
                    else "it is not an edgestill run folder (no student.gguf, no student/)")
            raise EdgestillError(f"'{path}' holds no student.gguf to serve; {hint}")
        path = gguf
    check_gguf(path)
    return path


def make_variants(run_dir: Path, types: list[str], threads: int = 2) -> dict[str, Path]:
    """{type: GGUF} of the run's student in llama.cpp's formats `types` (e.g. q8_0, q4_k_m), made once under
    RUN/variants/: the student exported in f16, then llama.cpp's quantizer. A QAT run's own student.gguf keeps the
    formats it trained in; these are llama.cpp's quantizations of the same weights."""
    from edgestill.config import load_config
    from edgestill.jobs.export import export_gguf_run
    from edgestill.runs import finished_run
    from edgestill.runtime.llamacpp import QUANT_TYPES, llamacpp_quantize

    unknown = [t for t in types if t.upper() not in QUANT_TYPES]
    if unknown:
        raise EdgestillError(f"--variants {','.join(unknown)}: not llama.cpp types; choose from "
                             f"{', '.join(t.lower() for t in QUANT_TYPES)}")
    run_dir = finished_run(run_dir, "serve")
    folder = run_dir / "variants"
    folder.mkdir(exist_ok=True)
    source = folder / "f16.gguf"
    made = {}
    for t in types:
        out = folder / f"{t.lower()}.gguf"
        if not out.is_file():
            if not source.is_file():
                log.info("exporting %s's student in f16 once, the source of its variants", run_dir)
                export_gguf_run(run_dir, load_config(run_dir / "config.yaml"), "f16", source)
            if t.upper() != "F16":
                log.info("quantizing the student to %s with llama.cpp -> %s", t.upper(), out)
                llamacpp_quantize(source, out, t.upper(), n_threads=threads)
        made[t.lower()] = out
    return made


def resolve_targets(targets: list, variants: list[str] | None = None, threads: int = 2) -> tuple[str, dict[str, Path]]:
    """(the model id, {variant name: GGUF}) for the command line's targets."""
    targets = [Path(t) for t in targets]
    if not targets:
        raise EdgestillError("give a run folder, a sweep folder or a .gguf file to serve")
    found: dict[str, Path] = {}

    def add(name: str, path: Path) -> None:
        if name in found:
            raise EdgestillError(f"two variants would both be called '{name}' ({found[name]} and {path}); rename one")
        found[name] = path

    for target in targets:
        if target.is_dir() and (target / "points").is_dir() and not (target / "student").exists():  # a sweep
            points = sorted(p for p in (target / "points").iterdir() if (p / "student.gguf").is_file())
            if not points:
                raise EdgestillError(f"sweep '{target}' has no exported point (points/*/student.gguf); export the "
                                     "points you want to serve with edgestill export")
            for p in points:
                add(p.name, resolve_gguf(p))
        else:
            path = resolve_gguf(target)
            add("student" if target.is_dir() else path.stem, path)
    if variants:
        runs = [t for t in targets if t.is_dir() and (t / "student").is_dir()]
        if len(targets) != 1 or len(runs) != 1:
            raise EdgestillError("--variants makes llama.cpp quantizations of one run's student; give exactly one run "
                                 "folder with it")
        for t, path in make_variants(runs[0], variants, threads).items():
            add(t, path)
    first = targets[0]
    model = first.name if first.is_dir() else first.stem
    return model, found


def memory_budget(device: str | None, budget_bytes: float | None) -> tuple[float, str]:
    """(bytes the variants may use together, where that figure comes from)."""
    if budget_bytes is not None:
        if budget_bytes <= 0:
            raise EdgestillError("--memory-budget must be positive, e.g. 2GB")
        return budget_bytes, "--memory-budget"
    if device is not None and device != "host":
        from edgestill.plan.load import load_device

        profile = load_device(device)
        return profile.ram_bytes.value, f"device {profile.name}'s ram_bytes"
    from edgestill.plan.hostbench import available_ram_bytes

    return available_ram_bytes(), "this machine's available memory"


def serve(targets, host: str = "127.0.0.1", port: int = 8080, policy: str = "vdf", queue: int = 32,
          max_wait_s: float = 30.0, n_ctx: int = 2048, threads: int = 2, name: str | None = None,
          prefix_reuse: bool = True, variants: list[str] | None = None, device: str | None = None,
          budget_bytes: float | None = None) -> None:
    """Load the model's variants, measure their speed, and serve until interrupted (Ctrl-C: the running request
    finishes, queued ones are answered 503)."""
    try:
        from edgestill.serve.app import create_app, http_server
    except ImportError as e:
        raise EdgestillError(f"serving needs FastAPI and uvicorn ({e.name} is missing): pip install -e '.[serve]'") from None
    from edgestill.serve.engine import Engine
    from edgestill.serve.scheduler import POLICIES
    from edgestill.serve.variants import check_memory, check_same_vocabulary, order_best_first

    if policy not in POLICIES:
        raise EdgestillError(f"--policy {policy} is unknown; use one of {', '.join(POLICIES)}")
    if queue < 1:
        raise EdgestillError("--queue must be at least 1")
    if isinstance(targets, (str, Path)):
        targets = [targets]
    model, found = resolve_targets(list(targets), variants, threads)
    budget, where = memory_budget(device, budget_bytes)
    need = check_memory(list(found.values()), n_ctx, budget, where)
    by_path = {path: variant for variant, path in found.items()}
    engines = []
    try:
        for path in order_best_first(found.values()):
            engines.append(Engine(path, name=by_path[path], n_ctx=n_ctx, n_threads=threads, prefix_reuse=prefix_reuse))
            e = engines[-1]
            log.info("variant '%s' (%s, %.0f MB predicted in memory): measured %.0f prefill / %.1f decode tokens/s",
                     e.name, path, need[str(path)]["total"] / 1e6, e.prefill_tokens_per_s, e.decode_tokens_per_s)
        check_same_vocabulary(engines)
        model = name or model
        log.info("serving '%s' (%d variant%s, best first: %s) on http://%s:%d (policy %s, queue %d)", model,
                 len(engines), "s" if len(engines) > 1 else "", ", ".join(e.name for e in engines), host, port, policy,
                 queue)
        http_server(create_app(engines, policy, queue, max_wait_s, name=model), host, port).run()
    finally:
        for e in engines:
            e.close()
