"""`edgestill serve`: a run's student (its GGUF) or a GGUF file behind the OpenAI-compatible server (serve/app.py)."""

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


def serve(target: str | Path, host: str = "127.0.0.1", port: int = 8080, policy: str = "vdf", queue: int = 32,
          max_wait_s: float = 30.0, n_ctx: int = 2048, threads: int = 2, name: str | None = None,
          prefix_reuse: bool = True) -> None:
    """Load the model, measure its speed, and serve until interrupted (Ctrl-C: the running request finishes, queued
    ones are answered 503)."""
    try:
        from edgestill.serve.app import create_app, http_server
    except ImportError as e:
        raise EdgestillError(f"serving needs FastAPI and uvicorn ({e.name} is missing): pip install -e '.[serve]'") from None
    from edgestill.serve.engine import Engine
    from edgestill.serve.scheduler import POLICIES

    if policy not in POLICIES:
        raise EdgestillError(f"--policy {policy} is unknown; use one of {', '.join(POLICIES)}")
    if queue < 1:
        raise EdgestillError("--queue must be at least 1")
    gguf = resolve_gguf(target)
    engine = Engine(gguf, name=name, n_ctx=n_ctx, n_threads=threads, prefix_reuse=prefix_reuse)
    log.info("serving %s as '%s' on http://%s:%d (policy %s, queue %d; measured %.0f prefill / %.1f decode tokens/s)",
             gguf, engine.name, host, port, policy, queue, engine.prefill_tokens_per_s, engine.decode_tokens_per_s)
    try:
        http_server(create_app(engine, policy, queue, max_wait_s), host, port).run()
    finally:
        engine.close()
