"""`edgestill serve`: a run's student (its GGUF), a sweep's students, or GGUF files behind the OpenAI-compatible server
(serve/app.py), in one variant or several (serve/variants.py: adaptive quantization).

    edgestill serve RUN                          the run's student.gguf
    edgestill serve RUN --variants q8_0,q4_k_m   + the student in llama.cpp's Q8_0 and Q4_K_M (made once, RUN/variants/)
    edgestill serve SWEEP                        every point's student.gguf of an `edgestill sweep` folder
    edgestill serve a.gguf b.gguf                these files, as variants of one model (they must share the tokenizer)
    edgestill serve RUN --nodes host:1,rpi5-8gb:1    two worker processes behind a dispatcher (serve/dispatch.py)
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgestill.errors import EdgestillError

log = logging.getLogger("edgestill")


def resolve_gguf(target: str | Path) -> Path:
    """A .gguf file as it is; a run folder -> its student.gguf, exported first (as `edgestill export RUN` does: a QAT
    run in the formats it trained in, another in f16) when the run has none yet."""
    from edgestill.models.load import check_gguf

    path = Path(target)
    if not path.exists():
        raise EdgestillError(f"'{target}' does not exist; give a run folder (edgestill shrink --out ...) or a .gguf file")
    if path.is_dir():
        gguf = path / "student.gguf"
        if not gguf.is_file():
            if not (path / "student").is_dir():
                raise EdgestillError(f"'{path}' holds no student.gguf to serve; it is not an edgestill run folder "
                                     "(no student.gguf, no student/)")
            from edgestill.config import load_config
            from edgestill.jobs.export import export_gguf_run
            from edgestill.runs import finished_run

            run = finished_run(path, "serve")
            log.info("%s has no student.gguf yet: exporting it, as `edgestill export %s` would", run, run)
            export_gguf_run(run, load_config(run / "config.yaml"))
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


def resolve_adapters(specs: list[str] | None, targets: list, base_gguf: Path) -> dict[str, Path]:
    """{adapter name: llama.cpp LoRA GGUF}: each `NAME=PATH` of --lora (PATH: a LoRA .gguf, or a PEFT adapter folder,
    converted once into edgestill's cache for `base_gguf`), and what a run folder keeps in RUN/adapters/."""
    import hashlib

    from edgestill.export.lora import export_lora_gguf
    from edgestill.models.load import cache_dir, weights_key

    pairs = []
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise EdgestillError(f"--lora '{spec}': write NAME=PATH, e.g. --lora legal=adapters/legal.gguf")
        pairs.append((name, Path(path).expanduser()))
    for target in map(Path, targets):
        if (target / "adapters").is_dir():
            pairs += [(p.stem if p.suffix == ".gguf" else p.name, p) for p in sorted((target / "adapters").iterdir())
                      if p.suffix == ".gguf" or (p / "adapter_config.json").is_file()]
    found: dict[str, Path] = {}
    for name, path in pairs:
        if name in found:
            raise EdgestillError(f"two LoRA adapters are called '{name}' ({found[name]} and {path}); rename one")
        if not path.exists():
            raise EdgestillError(f"LoRA adapter '{name}': '{path}' does not exist")
        if path.is_dir():  # a PEFT folder: llama.cpp needs its GGUF form, made once per adapter and base shape
            key = hashlib.sha256(f"{weights_key(path)}:{base_gguf.stat().st_size}".encode()).hexdigest()[:12]
            out = cache_dir() / "lora" / f"{name}-{key}.gguf"
            if not out.is_file():
                out.parent.mkdir(parents=True, exist_ok=True)
                log.info("converting LoRA adapter '%s' (%s) to llama.cpp's GGUF form -> %s", name, path, out)
                export_lora_gguf(path, base_gguf, out)
            path = out
        found[name] = path
    return found


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


def default_threads() -> int:
    """llama.cpp threads for serving: every core but one. The HTTP side (event loop, streaming, the clients on the
    same machine) needs a core; llama.cpp's threads wait for each other at every step, so when one of them loses its
    core to that work, the whole generation stalls (docs/serving.md, "Threads")."""
    import os

    return max(1, (os.cpu_count() or 2) - 1)


def parse_nodes(spec: str, threads: int) -> list[tuple[str, int]]:
    """'host:1,rpi5-8gb:1' -> [(device, threads)]; a node without ':THREADS' gets an equal share of `threads`."""
    items = [x.strip() for x in spec.split(",") if x.strip()]
    if not items:
        raise EdgestillError("--nodes needs at least one node, e.g. --nodes host:1,host:1")
    nodes = []
    for item in items:
        device, _, count = item.partition(":")
        if count:
            if not count.isdigit() or int(count) < 1:
                raise EdgestillError(f"--nodes '{item}': the threads after ':' must be a positive integer")
            n = int(count)
        else:
            n = max(1, threads // len(items))
        nodes.append((device or "host", n))
    return nodes


def _stop_with_parent() -> None:
    """In a node process, before it runs (Linux): SIGTERM it when the dispatcher's process ends, however it ends.
    uvicorn re-raises the signal that stopped it, so the dispatcher may die before its own cleanup runs."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def serve_nodes(targets, nodes: list[tuple[str, int]], host: str = "127.0.0.1", port: int = 8080, **node_kwargs) -> None:
    """One `edgestill serve` worker process per node (its own device profile, memory budget and threads) on a
    loopback port, and the dispatcher (serve/dispatch.py) in front of them on `host:port`."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from edgestill.serve.app import http_server
    from edgestill.serve.dispatch import Node, create_dispatcher

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request forwarded
    resolve_targets([Path(t) for t in targets], node_kwargs.get("variants"), 2)  # make --variants once, here
    ports = []
    for _ in nodes:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    procs, members = [], []
    try:
        for i, ((device, n_threads), node_port) in enumerate(zip(nodes, ports)):
            command = [sys.executable, "-m", "edgestill.cli", "serve", *map(str, targets), "--port", str(node_port),
                       "--threads", str(n_threads), "--policy", node_kwargs["policy"], "--queue",
                       str(node_kwargs["queue"]), "--max-wait", str(node_kwargs["max_wait_s"]), "--ctx",
                       str(node_kwargs["n_ctx"])]
            command += ["--device", device] if device != "host" else []
            if node_kwargs.get("name"):
                command += ["--name", node_kwargs["name"]]
            if node_kwargs.get("variants"):
                command += ["--variants", ",".join(node_kwargs["variants"])]
            if node_kwargs.get("budget_bytes"):
                command += ["--memory-budget", str(int(node_kwargs["budget_bytes"]))]
            if not node_kwargs.get("prefix_reuse", True):
                command.append("--no-prefix-reuse")
            for spec in node_kwargs.get("lora") or []:
                command += ["--lora", spec]
            procs.append(subprocess.Popen(command, preexec_fn=_stop_with_parent))
            members.append(Node(f"node{i}-{device}", f"http://127.0.0.1:{node_port}", device, n_threads))
        deadline = time.monotonic() + 600
        for proc, node in zip(procs, members):
            while True:
                try:
                    if httpx.get(node.url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise EdgestillError(f"serving node {node.name} stopped while starting (exit code {proc.returncode}); "
                                         "its error is printed above")
                if time.monotonic() > deadline:
                    raise EdgestillError(f"serving node {node.name} did not start within 10 minutes")
                time.sleep(0.3)
        log.info("dispatching over %d nodes (%s) on http://%s:%d", len(members),
                 ", ".join(f"{m.name}: {m.threads} thread{'s' if m.threads > 1 else ''}" for m in members), host, port)
        http_server(create_dispatcher(members), host, port).run()
    finally:
        for proc in procs:  # each node finishes its running request and answers its queued ones 503
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


def serve(targets, host: str = "127.0.0.1", port: int = 8080, policy: str = "vdf", queue: int = 32,
          max_wait_s: float = 30.0, n_ctx: int = 2048, threads: int | None = None, name: str | None = None,
          prefix_reuse: bool = True, variants: list[str] | None = None, device: str | None = None,
          budget_bytes: float | None = None, nodes: str | None = None, lora: list[str] | None = None) -> None:
    """Load the model's variants, measure their speed, and serve until interrupted (Ctrl-C: the running request
    finishes, queued ones are answered 503). With `nodes`: worker processes behind a dispatcher (serve_nodes)."""
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
    if threads is not None and threads < 1:
        raise EdgestillError("--threads must be at least 1")
    threads = threads or default_threads()
    if nodes:
        if device is not None:
            raise EdgestillError("with --nodes each node names its device (--nodes rpi5-8gb:1,host:1); drop --device")
        return serve_nodes(targets, parse_nodes(nodes, threads), host, port, policy=policy, queue=queue,
                           max_wait_s=max_wait_s, n_ctx=n_ctx, name=name, prefix_reuse=prefix_reuse, variants=variants,
                           budget_bytes=budget_bytes, lora=lora)
    model, found = resolve_targets(list(targets), variants, threads)
    adapters = resolve_adapters(lora, list(targets), next(iter(found.values())))
    if adapters:  # an adapter is trained for one model: every variant must have its layers
        from edgestill.plan.cost import StudentShape

        shapes = {variant: StudentShape.from_gguf(path) for variant, path in found.items()}
        first = next(iter(shapes))
        other = [v for v, shape in shapes.items() if shape != shapes[first]]
        if other:
            raise EdgestillError(f"LoRA adapters fit one model's layers, but variant '{other[0]}' "
                                 f"({shapes[other[0]].layers} layers) is not shaped like '{first}' "
                                 f"({shapes[first].layers} layers); serve adapters with same-shape variants only "
                                 "(e.g. --variants of one run)")
    budget, where = memory_budget(device, budget_bytes)
    need = check_memory(list(found.values()), n_ctx, budget, where)
    by_path = {path: variant for variant, path in found.items()}
    engines = []
    try:
        for path in order_best_first(found.values()):
            engines.append(Engine(path, name=by_path[path], n_ctx=n_ctx, n_threads=threads, prefix_reuse=prefix_reuse,
                                  adapters=adapters))
            e = engines[-1]
            log.info("variant '%s' (%s, %.0f MB predicted in memory): measured %.0f prefill / %.1f decode tokens/s",
                     e.name, path, need[str(path)]["total"] / 1e6, e.prefill_tokens_per_s, e.decode_tokens_per_s)
        check_same_vocabulary(engines)
        model = name or model
        log.info("serving '%s' (%d variant%s, best first: %s%s) on http://%s:%d (policy %s, queue %d)", model,
                 len(engines), "s" if len(engines) > 1 else "", ", ".join(e.name for e in engines),
                 f"; LoRA adapters: {', '.join(adapters)}" if adapters else "", host, port, policy, queue)
        http_server(create_app(engines, policy, queue, max_wait_s, name=model), host, port).run()
    finally:
        for e in engines:
            e.close()
