"""Several nodes (Edge-LLM's set of edge nodes, docs/references.md [5]): a dispatcher in front of `edgestill serve`
workers, each a process with its own device profile, memory budget and threads.

For each request the dispatcher asks every node when it would finish it (`POST /v1/edgestill/estimate`: the node's
own prediction, from its measured rates, its queue and its running request) and sends it to the node that finishes
it earliest; that node is also the one most likely to meet the deadline. When even the earliest node cannot meet the
request's deadline, the dispatcher answers 503 at once, as one server does. A full node is skipped; when all are full:
429 with Retry-After. A node that does not answer is skipped and counted; when none answers: 503.

The answer is the node's, passed through (streamed as it comes); its `edgestill` field also names the `node`.
`/metrics` holds the dispatcher's counters and every node's metrics with a `node` label; `/health` lists the nodes.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from dataclasses import dataclass

from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here


@dataclass
class Node:
    name: str
    url: str  # http://host:port
    device: str = "host"
    threads: int = 1


def choose_node(estimates: list[dict | None]) -> int | None:
    """The node (index) that finishes the request earliest, among those that answered and have room; None: none."""
    open_ = [i for i, e in enumerate(estimates) if e is not None and not e.get("queue_full")]
    return min(open_, key=lambda i: (estimates[i]["finish_s"], i)) if open_ else None


def _with_node(payload: dict, node: str) -> dict:
    if isinstance(payload.get("edgestill"), dict):
        payload["edgestill"]["node"] = node
    return payload


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def merge_metrics(texts: list[tuple[str, str]]) -> list[str]:
    """The nodes' Prometheus texts as one, `node="<name>"` added to every sample, each metric family's samples kept
    together under one HELP/TYPE (the text format requires it)."""
    families: dict[str, dict[str, list[str]]] = {}
    for node, text in texts:
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                entry = families.setdefault(family, {"comments": [], "samples": []})
                if line not in entry["comments"]:
                    entry["comments"].append(line)
                continue
            m = _SAMPLE.match(line)
            if not m or family is None:
                continue
            name, labels, value = m.groups()
            inner = f'node="{node}"' + ("," + labels[1:-1] if labels and labels != "{}" else "")
            families[family]["samples"].append(f"{name}{{{inner}}} {value}")
    return [line for entry in families.values() for line in entry["comments"] + entry["samples"]]


def create_dispatcher(nodes: list[Node], timeout_s: float = 600.0):
    """The FastAPI app that spreads requests over `nodes` (each an `edgestill serve` server)."""
    import httpx
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    from edgestill.serve.app import error_response

    counters: Counter = Counter()
    state: dict = {}

    async def lifespan(app):
        state["client"] = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0),
                                            limits=httpx.Limits(max_connections=1024))
        yield
        await state["client"].aclose()

    from contextlib import asynccontextmanager

    app = FastAPI(title="edgestill serve (dispatcher)", lifespan=asynccontextmanager(lifespan))
    app.state.nodes, app.state.counters = nodes, counters

    async def ask(node: Node, kind: str, body: dict):
        """(estimate, None) or (None, the node's 4xx response) or (None, None) when the node is down."""
        try:
            r = await state["client"].post(node.url + "/v1/edgestill/estimate", json={"kind": kind, "request": body},
                                           timeout=10.0)
        except httpx.HTTPError:
            counters[f"node_down_{node.name}"] += 1
            return None, None
        if r.status_code == 200:
            return r.json(), None
        if 400 <= r.status_code < 500:
            return None, r
        counters[f"node_down_{node.name}"] += 1
        return None, None

    async def handle(request: Request, path: str, kind: str):
        raw = await request.body()
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            counters["rejected_bad_request"] += 1
            return error_response(400, f"the request body is not valid JSON ({e})")
        if not isinstance(body, dict):
            counters["rejected_bad_request"] += 1
            return error_response(400, "the request body must be a JSON object")
        answers = await asyncio.gather(*(ask(n, kind, body) for n in nodes))
        for _, bad in answers:
            if bad is not None:  # the request itself is bad: every node would say the same
                counters["rejected_bad_request"] += 1
                return Response(bad.content, bad.status_code, media_type="application/json")
        estimates = [e for e, _ in answers]
        if all(e is None for e in estimates):
            counters["rejected_no_node"] += 1
            return error_response(503, "no serving node answered; check the nodes (GET /health)", "server_error",
                          retry_after_s=5.0)
        i = choose_node(estimates)
        if i is None:
            counters["rejected_queue_full"] += 1
            return error_response(429, f"every node's queue is full ({len(nodes)} nodes); retry later", "rate_limit_error",
                          retry_after_s=max(1.0, min(e["backlog_s"] for e in estimates if e is not None)))
        best = estimates[i]
        if best["deadline_s"] is not None and best["finish_s"] > best["deadline_s"]:
            counters["rejected_deadline"] += 1
            return error_response(503, f"no node can meet the deadline ({best['deadline_s']:.1f} s): the earliest, "
                               f"{nodes[i].name}, finishes it in {best['finish_s']:.1f} s", "server_error",
                          param="deadline_s")
        node = nodes[i]
        counters[f"dispatched_{node.name}"] += 1
        client = state["client"]
        try:
            upstream = await client.send(client.build_request("POST", node.url + path, content=raw,
                                                              headers={"content-type": "application/json"}),
                                         stream=True)
        except httpx.HTTPError as e:
            counters[f"node_down_{node.name}"] += 1
            return error_response(502, f"node {node.name} failed to take the request ({e.__class__.__name__}); retry",
                          "server_error", retry_after_s=1.0)
        headers = {k: v for k, v in upstream.headers.items() if k.lower() == "retry-after"}
        if upstream.status_code != 200 or not body.get("stream"):
            content = await upstream.aread()
            await upstream.aclose()
            if upstream.status_code == 200:
                return JSONResponse(_with_node(json.loads(content), node.name))
            return Response(content, upstream.status_code, headers=headers, media_type="application/json")

        async def relay():
            try:
                async for line in upstream.aiter_lines():
                    if line.startswith("data: {") and '"edgestill"' in line:
                        line = "data: " + json.dumps(_with_node(json.loads(line[6:]), node.name))
                    yield line + "\n"
            finally:
                await upstream.aclose()  # a client that went away: the node sees it and stops generating

        return StreamingResponse(relay(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "/v1/completions", "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "/v1/chat/completions", "chat")

    async def get_all(path: str):
        async def one(n):
            try:
                r = await state["client"].get(n.url + path, timeout=5.0)
                return r if r.status_code == 200 else None
            except httpx.HTTPError:
                return None
        return await asyncio.gather(*(one(n) for n in nodes))

    @app.get("/v1/models")
    async def models():
        for r in await get_all("/v1/models"):
            if r is not None:
                return r.json()
        return error_response(503, "no serving node answered", "server_error", retry_after_s=5.0)

    @app.get("/health")
    async def health():
        answers = await get_all("/health")
        listed = [{"name": n.name, "url": n.url, "device": n.device, "threads": n.threads,
                   **(r.json() if r is not None else {"status": "down"})} for n, r in zip(nodes, answers)]
        up = sum(r is not None for r in answers)
        return {"status": "ok" if up else "down", "nodes_up": up, "nodes": listed}

    @app.get("/metrics")
    async def metrics():
        lines = ["# HELP edgestill_dispatch_total Requests the dispatcher sent to each node.",
                 "# TYPE edgestill_dispatch_total counter"]
        lines += [f'edgestill_dispatch_total{{node="{n.name}"}} {counters["dispatched_" + n.name]}' for n in nodes]
        lines += ["# HELP edgestill_dispatch_rejected_total Requests the dispatcher answered itself, by reason.",
                  "# TYPE edgestill_dispatch_rejected_total counter"]
        lines += [f'edgestill_dispatch_rejected_total{{reason="{r}"}} {counters["rejected_" + r]}'
                  for r in ("bad_request", "deadline", "queue_full", "no_node")]
        lines += ["# HELP edgestill_node_down_total Times a node did not answer.",
                  "# TYPE edgestill_node_down_total counter"]
        lines += [f'edgestill_node_down_total{{node="{n.name}"}} {counters["node_down_" + n.name]}' for n in nodes]
        lines += merge_metrics([(n.name, r.text) for n, r in zip(nodes, await get_all("/metrics")) if r is not None])
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app
