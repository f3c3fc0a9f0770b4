"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) in front of llama.cpp engines and a scheduler.

    POST /v1/completions, /v1/chat/completions   OpenAI's request and response shapes, `stream: true` as SSE;
                                                 extension fields: `deadline_s` (seconds from arrival) and `value`
                                                 (priority, > 0), `adapter` (a LoRA loaded with --lora); the
                                                 response's `edgestill` field says which variant served it, how
                                                 long it queued and whether it met its deadline
    GET  /v1/models, /health, /metrics            the model (and `model@variant` ids); liveness and queue; Prometheus
                                                 counters

One model may be loaded in several variants (serve/variants.py: e.g. its Q8_0 and Q4_K_M files): each request gets
the best variant the queue can afford, chosen when it starts; `model: "<model>@<variant>"` pins one.

One worker generates, one request at a time, in a thread (llama.cpp is not re-entrant); the event loop only parses,
validates, queues and streams. The queue is bounded (`capacity`): past it, 429 with Retry-After. A queued request
that can no longer meet its deadline is answered 503 at once, not run; one served after its deadline says so
(`deadline_met: false`). At shutdown the running request finishes and every queued one is answered 503. Bad requests
get a 400 (or 404 for an unknown model) whose message names the field to fix.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

from edgestill.serve.cache import ResponseCache
from edgestill.serve.scheduler import Job, QueueFull, Scheduler

MAX_OUTPUT_DEFAULT = 256  # max_tokens when a request names none


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        self.message, self.status, self.param = message, status, param
        super().__init__(message)


@dataclass
class Work:
    """What the worker runs for one request, and where its output goes."""

    kind: str  # "completion" | "chat"
    kwargs: dict
    stream: bool
    prompt_tokens: int
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float | None = None
    cache_key: str | None = None  # set for deterministic requests: the finished response is kept under it
    pinned: int | None = None  # the variant the client asked for (model@variant); None: the server chooses
    variant: int = 0  # the variant that serves it, chosen when it starts
    run_predicted_s: float | None = None  # its predicted service time on that variant


@dataclass
class Rejected:
    status: int
    message: str
    retry_after_s: float | None = None


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           retry_after_s: float | None = None):
    from fastapi.responses import JSONResponse

    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status,
                        headers=headers)


class Server:
    """The state behind the app: the engines (one per variant, best first), scheduler, counters, the worker."""

    def __init__(self, engines, policy: str = "vdf", capacity: int = 32, max_wait_s: float = 30.0,
                 max_output_tokens: int | None = None, cache_entries: int = 256, name: str | None = None):
        self.engines = list(engines) if isinstance(engines, (list, tuple)) else [engines]
        if not self.engines:
            raise ValueError("the server needs at least one engine")
        self.engine = self.engines[0]  # tokenizes and counts for all: variants share the tokenizer
        self.name = name or self.engine.name
        names = [e.name for e in self.engines]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must differ: {names}")
        self.variant_ids = [f"{self.name}@{n}" for n in names] if len(self.engines) > 1 else []
        self.n_ctx = min(e.n_ctx for e in self.engines)
        self.adapter_names = sorted(getattr(self.engine, "adapters", None) or {})  # every variant loads the same
        self.cache = ResponseCache(cache_entries)
        self.scheduler = Scheduler(policy, capacity, max_wait_s)
        self.max_output_tokens = max_output_tokens or self.n_ctx
        self.counters: Counter = Counter()
        self.wake = asyncio.Event()
        self.stopping = False
        self.running: Job | None = None
        self.worker: asyncio.Task | None = None

    # --- validation -----------------------------------------------------------------------------------------

    def parse(self, body: dict, kind: str) -> tuple[dict, int, bool, float | None, float, int | None]:
        """(llama.cpp kwargs, prompt tokens, stream, deadline_s, value, pinned variant), or BadRequest."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        pinned = self.variant_ids.index(model) if model in self.variant_ids else None
        if pinned is None and model not in (None, "", self.name, "default"):
            served = ", ".join(f"'{m}'" for m in [self.name, *self.variant_ids])
            raise BadRequest(f"model '{model}' is not served here; this server serves {served} (GET /v1/models)",
                             404, "model")
        kwargs: dict = {}
        if kind == "completion":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise BadRequest("'prompt' must be a non-empty string", param="prompt")
            kwargs["prompt"] = prompt
            prompt_tokens = self.engine.count_prompt(prompt)
        else:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise BadRequest("'messages' must be a non-empty list of {role, content} objects with string values",
                                 param="messages")
            kwargs["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
            prompt_tokens = self.engine.count_chat(kwargs["messages"])
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is None:  # not given: what fits, up to MAX_OUTPUT_DEFAULT
            max_tokens = max(1, min(MAX_OUTPUT_DEFAULT, self.max_output_tokens, self.n_ctx - prompt_tokens))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest(f"'max_tokens' must be a positive integer, not {max_tokens!r}", param="max_tokens")
        if max_tokens > self.max_output_tokens:
            raise BadRequest(f"'max_tokens'={max_tokens} is more than this server generates per request "
                             f"({self.max_output_tokens})", param="max_tokens")
        if prompt_tokens >= self.n_ctx:
            raise BadRequest(f"the prompt is {prompt_tokens} tokens, longer than the model's context of "
                             f"{self.n_ctx}; shorten it", param="prompt" if kind == "completion" else "messages")
        if prompt_tokens + max_tokens > self.n_ctx:
            raise BadRequest(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceed the context of "
                             f"{self.n_ctx}; lower max_tokens to {self.n_ctx - prompt_tokens} or less",
                             param="max_tokens")
        kwargs["max_tokens"] = max_tokens
        adapter = body.get("adapter")
        if adapter is not None:
            if not isinstance(adapter, str) or adapter not in self.adapter_names:
                loaded = ", ".join(f"'{a}'" for a in self.adapter_names) or "none (start the server with --lora)"
                raise BadRequest(f"adapter {adapter!r} is not loaded here; loaded adapters: {loaded}", 404, "adapter")
            kwargs["adapter"] = adapter
        for key, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            if key in body and body[key] is not None:
                v = body[key]
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
                    raise BadRequest(f"'{key}' must be a number in [{lo}, {hi}], not {v!r}", param=key)
                kwargs[key] = float(v)
        if body.get("stop") is not None:
            stop = body["stop"]
            if isinstance(stop, str):
                stop = [stop]
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
                raise BadRequest("'stop' must be a string or a list of up to 4 strings", param="stop")
            kwargs["stop"] = stop
        if body.get("seed") is not None:
            if not isinstance(body["seed"], int):
                raise BadRequest("'seed' must be an integer", param="seed")
            kwargs["seed"] = body["seed"]
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false", param="stream")
        deadline_s = body.get("deadline_s")
        if deadline_s is not None and (not isinstance(deadline_s, (int, float)) or isinstance(deadline_s, bool)
                                       or not deadline_s > 0):
            raise BadRequest("'deadline_s' must be a positive number of seconds from now", param="deadline_s")
        value = body.get("value", 1.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
            raise BadRequest("'value' (the request's priority) must be a positive number", param="value")
        return kwargs, prompt_tokens, stream, deadline_s, float(value), pinned

    # --- admission and the worker -----------------------------------------------------------------------------

    def costs(self, work: Work) -> list[float]:
        """`work`'s predicted service seconds on each variant."""
        return [e.predict_s(work.prompt_tokens, work.kwargs["max_tokens"]) for e in self.engines]

    def admit(self, kind: str, kwargs: dict, prompt_tokens: int, stream: bool, deadline_s, value: float,
              pinned: int | None = None) -> Job:
        """Queue a request. The queue is planned (VDF's order, the backlog, the variant choice's look-ahead) with its
        time on the best variant it may get, the one it runs on unless the load makes it step down; whether it is
        hopeless is judged by its time on the fastest: only if no variant can serve it in time."""
        if self.stopping:
            raise QueueFull(0, 5.0)
        now = time.monotonic()
        work = Work(kind, kwargs, stream, prompt_tokens, asyncio.Queue(), asyncio.get_running_loop(), pinned=pinned)
        costs = self.costs(work)
        planned, least = (costs[pinned], costs[pinned]) if pinned is not None else (costs[0], min(costs))
        if deadline_s is not None and least > deadline_s:
            raise BadRequest(f"'deadline_s'={deadline_s} is shorter than this request's predicted service time "
                             f"({least:.2f} s for {prompt_tokens} prompt and {kwargs['max_tokens']} output tokens "
                             "here); raise deadline_s or lower max_tokens", 503, "deadline_s")
        job = Job(arrival=now, predicted_s=planned, deadline=None if deadline_s is None else now + deadline_s,
                  value=value, payload=work, least_s=least)
        self.scheduler.push(job)
        self.counters["requests_admitted"] += 1
        self.wake.set()
        return job

    def estimate(self, body: dict, kind: str) -> dict:
        """When this server would finish `body` if it arrived now (for a dispatcher choosing among nodes): its
        predicted cost on the fastest variant it may get, plus the predicted seconds of work ahead of it."""
        kwargs, prompt_tokens, _, deadline_s, _, pinned = self.parse(body, kind)
        costs = [e.predict_s(prompt_tokens, kwargs["max_tokens"]) for e in self.engines]
        cost = costs[pinned] if pinned is not None else min(costs)
        now = time.monotonic()
        running = self.running
        ahead = self.scheduler.backlog_s()
        if running is not None and running.payload.started is not None and running.payload.run_predicted_s:
            ahead += max(0.0, running.payload.started + running.payload.run_predicted_s - now)
        return {"finish_s": ahead + cost, "cost_s": cost, "backlog_s": ahead, "queue": len(self.scheduler),
                "queue_full": len(self.scheduler) >= self.scheduler.capacity or self.stopping,
                "deadline_s": deadline_s}

    def _reject(self, job: Job, status: int, message: str, reason: str) -> None:
        self.counters[f"rejected_{reason}"] += 1
        job.payload.out.put_nowait(Rejected(status, message, retry_after_s=5.0 if status in (429, 503) else None))

    def reject_hopeless(self) -> None:
        """Answer 503 now to every queued request that cannot finish by its deadline, even if it ran next."""
        now = time.monotonic()
        running = self.running
        free_at = None
        if running is not None and running.payload.started is not None:
            free_at = running.payload.started + running.payload.run_predicted_s
        for late in self.scheduler.drop_infeasible(now, free_at):
            self._reject(late, 503, f"the request cannot meet its deadline ({late.deadline - late.arrival:.1f} s): "
                         f"{late.least_s or late.predicted_s:.1f} s of work at the least, {now - late.arrival:.1f} s queued, and the server is busy "
                         f"for {max(0.0, (free_at or now) - now):.1f} s more", "deadline")

    async def run_reaper(self, every_s: float = 0.05) -> None:
        """While the worker generates, keep answering hopeless requests early instead of when their turn comes."""
        while not self.stopping:
            self.reject_hopeless()
            await asyncio.sleep(every_s)

    async def run_worker(self) -> None:
        while True:
            self.reject_hopeless()
            now = time.monotonic()
            job = self.scheduler.pop(now)
            if job is None:
                if self.stopping:
                    return
                self.wake.clear()
                await self.wake.wait()
                continue
            self.assign_variant(job, now)
            self.running = job
            try:
                await asyncio.to_thread(self._generate, job)
            finally:
                self.running = None

    def assign_variant(self, job: Job, now: float) -> None:
        """Decide, as `job` starts, which variant serves it (serve/variants.choose, unless the client pinned one)."""
        from edgestill.serve.variants import choose

        work: Work = job.payload
        costs = self.costs(work)
        if work.pinned is not None:
            work.variant = work.pinned
        elif len(costs) > 1:
            work.variant = choose(job, now, self.scheduler.ordered(now), costs, self.scheduler.max_wait_s)
        work.run_predicted_s = costs[work.variant]

    def _generate(self, job: Job) -> None:
        """Runs in the worker thread: generate, hand every chunk to the event loop, then None (or the error)."""
        work: Work = job.payload
        engine = self.engines[work.variant]
        put = lambda item: work.loop.call_soon_threadsafe(work.out.put_nowait, item)  # noqa: E731
        work.started = time.monotonic()
        first = None
        n = 0
        try:
            fn = engine.complete if work.kind == "completion" else engine.chat
            result, before = fn(work.stream, **work.kwargs)
            chunks = []  # a stream, sent one chunk behind so that the last can carry the `edgestill` field
            if work.stream:
                for chunk in result:
                    if work.cancelled.is_set():  # the client went away: stop generating for it
                        self.counters["cancelled"] += 1
                        work.cache_key = None  # an unfinished stream is not an answer to keep
                        break
                    first = first if first is not None else time.monotonic()
                    n += 1
                    if chunks:
                        put(chunks[-1])
                    chunks.append(chunk)
                last = chunks[-1] if chunks else None
            else:
                n = result["usage"]["completion_tokens"]
                last = result
            end = time.monotonic()
            reused = engine.finish(before, work.prompt_tokens)
            self.counters["prefix_reused_tokens"] += reused
            engine.observe(work.prompt_tokens, n, None if first is None else first - work.started,
                                end - work.started)
            met = job.deadline is None or end <= job.deadline
            if not work.cancelled.is_set():  # a cancelled one is counted as cancelled, not completed
                self.counters["completed"] += 1
                self.counters["variant_" + engine.name] += 1
                self.counters["adapter_" + (work.kwargs.get("adapter") or "")] += 1
            self.counters["completion_tokens"] += n
            self.counters["prompt_tokens"] += work.prompt_tokens
            if not met:
                self.counters["deadline_missed"] += 1
            if last is not None:
                put({**last, "edgestill": self.extension(job, end, met)})
            if work.pinned is not None or work.variant == 0:  # the cache answers with the best variant only
                self.cache.put(work.cache_key, chunks if work.stream else last)
        except Exception as e:  # noqa: BLE001 - a failed generation is answered, never crashes the server
            self.counters["server_errors"] += 1
            put(e)
        put(None)

    def extension(self, job: Job, end: float, met: bool) -> dict:
        w: Work = job.payload
        return {"model": self.name, "variant": self.engines[w.variant].name, "policy": self.scheduler.policy,
                "queued_s": round(w.started - job.arrival, 4), "service_s": round(end - w.started, 4),
                "predicted_s": round(w.run_predicted_s, 4), "deadline_met": met, "adapter": w.kwargs.get("adapter"),
                "cache": "miss" if w.cache_key is not None else "off"}

    def begin_shutdown(self) -> None:
        """Stop admitting and answer every queued request 503; the running one goes on."""
        self.stopping = True
        for job in self.scheduler.drain():
            self._reject(job, 503, "the server is shutting down; retry on another server or later", "shutdown")
        self.wake.set()

    async def shutdown(self) -> None:
        self.begin_shutdown()
        if self.worker is not None:
            await self.worker  # the running request finishes

    def metrics_text(self) -> str:
        c = self.counters
        lines = [
            "# HELP edgestill_requests_total Requests by outcome.", "# TYPE edgestill_requests_total counter"]
        lines.append(f'edgestill_requests_total{{outcome="admitted"}} {c["requests_admitted"]}')
        lines.append(f'edgestill_requests_total{{outcome="completed"}} {c["completed"]}')
        for reason in ("queue_full", "deadline", "shutdown", "bad_request"):
            lines.append(f'edgestill_requests_total{{outcome="rejected",reason="{reason}"}} {c["rejected_" + reason]}')
        lines.append(f'edgestill_requests_total{{outcome="cancelled"}} {c["cancelled"]}')
        lines += ["# HELP edgestill_deadline_missed_total Requests served after their deadline.",
                  "# TYPE edgestill_deadline_missed_total counter", f"edgestill_deadline_missed_total {c['deadline_missed']}",
                  "# HELP edgestill_server_errors_total Generations that failed.",
                  "# TYPE edgestill_server_errors_total counter", f"edgestill_server_errors_total {c['server_errors']}",
                  "# HELP edgestill_tokens_total Tokens processed.", "# TYPE edgestill_tokens_total counter",
                  f'edgestill_tokens_total{{kind="prompt"}} {c["prompt_tokens"]}',
                  f'edgestill_tokens_total{{kind="completion"}} {c["completion_tokens"]}',
                  "# HELP edgestill_cache_requests_total Deterministic requests looked up in the response cache.",
                  "# TYPE edgestill_cache_requests_total counter",
                  f'edgestill_cache_requests_total{{result="hit"}} {self.cache.hits}',
                  f'edgestill_cache_requests_total{{result="miss"}} {self.cache.misses}',
                  "# HELP edgestill_prefix_reused_tokens_total Prompt tokens taken from the KV cache, not evaluated.",
                  "# TYPE edgestill_prefix_reused_tokens_total counter",
                  f"edgestill_prefix_reused_tokens_total {c['prefix_reused_tokens']}",
                  "# HELP edgestill_queue_depth Requests waiting.", "# TYPE edgestill_queue_depth gauge",
                  f"edgestill_queue_depth {len(self.scheduler)}",
                  "# HELP edgestill_variant_requests_total Completed requests by the variant that served them.",
                  "# TYPE edgestill_variant_requests_total counter"]
        lines += [f'edgestill_variant_requests_total{{variant="{e.name}"}} {c["variant_" + e.name]}' for e in self.engines]
        if self.adapter_names:
            lines += ["# HELP edgestill_adapter_requests_total Completed requests by LoRA adapter (\"\": none).",
                      "# TYPE edgestill_adapter_requests_total counter"]
            lines += [f'edgestill_adapter_requests_total{{adapter="{a}"}} {c["adapter_" + a]}'
                      for a in ["", *self.adapter_names]]
            lines += ["# HELP edgestill_adapter_switches_total Times an engine changed adapter (and emptied its KV "
                      "cache).", "# TYPE edgestill_adapter_switches_total counter",
                      f"edgestill_adapter_switches_total {sum(getattr(e, 'adapter_switches', 0) for e in self.engines)}"]
        lines += ["# HELP edgestill_rate_tokens_per_s Measured rates the scheduler predicts with.",
                  "# TYPE edgestill_rate_tokens_per_s gauge"]
        for e in self.engines:
            label = f',variant="{e.name}"' if len(self.engines) > 1 else ""
            lines += [f'edgestill_rate_tokens_per_s{{phase="prefill"{label}}} {e.prefill_tokens_per_s:.3f}',
                      f'edgestill_rate_tokens_per_s{{phase="decode"{label}}} {e.decode_tokens_per_s:.3f}']
        return "\n".join(lines) + "\n"


def create_app(engines, policy: str = "vdf", capacity: int = 32, max_wait_s: float = 30.0,
               max_output_tokens: int | None = None, cache_entries: int = 256, name: str | None = None):
    """The FastAPI app serving `engines`: one serve/engine.Engine (or anything with its methods), or a list of the
    same model's variants, best first. `name`: the model id (default: the first engine's); `cache_entries`: the
    response cache's size (0: off)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    server = Server(engines, policy, capacity, max_wait_s, max_output_tokens, cache_entries, name)

    @asynccontextmanager
    async def lifespan(app):
        server.worker = asyncio.create_task(server.run_worker())
        reaper = asyncio.create_task(server.run_reaper())
        yield
        await server.shutdown()
        reaper.cancel()

    app = FastAPI(title="edgestill serve", lifespan=lifespan)
    app.state.server = server

    async def handle(request: Request, kind: str):
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            server.counters["rejected_bad_request"] += 1
            return error_response(400, f"the request body is not valid JSON ({e})")
        try:
            kwargs, prompt_tokens, stream, deadline_s, value, pinned = server.parse(body, kind)
            served_as = server.name if pinned is None else server.variant_ids[pinned]
            key = server.cache.key(served_as, kind, kwargs, stream)
            cached = server.cache.get(key)
            if cached is not None:  # a repeated deterministic request: answered now, not queued
                return cached_response(cached, stream, pinned or 0, kwargs)
            job = server.admit(kind, kwargs, prompt_tokens, stream, deadline_s, value, pinned)
            job.payload.cache_key = key
        except BadRequest as e:
            server.counters["rejected_deadline" if e.status == 503 else "rejected_bad_request"] += 1
            kind_ = {404: "not_found_error", 503: "server_error"}.get(e.status, "invalid_request_error")
            return error_response(e.status, e.message, kind_, e.param, retry_after_s=None)
        except QueueFull as e:
            server.counters["rejected_queue_full"] += 1
            if server.stopping:
                return error_response(503, "the server is shutting down", "server_error", retry_after_s=5.0)
            return error_response(429, str(e), "rate_limit_error", retry_after_s=e.retry_after_s)
        work: Work = job.payload
        first = await work.out.get()
        if isinstance(first, Rejected):
            return error_response(first.status, first.message, "server_error", retry_after_s=first.retry_after_s)
        if isinstance(first, Exception):
            return error_response(500, f"generation failed: {first}", "server_error")
        if not stream:
            await work.out.get()  # the closing None
            return JSONResponse(first)

        async def events():
            item = first
            try:
                while item is not None:
                    if isinstance(item, Exception):  # failed mid-stream: the client gets an error event
                        yield f"data: {json.dumps({'error': {'message': str(item), 'type': 'server_error'}})}\n\n"
                    else:
                        yield f"data: {json.dumps(item)}\n\n"
                    item = await work.out.get()
                yield "data: [DONE]\n\n"
            finally:
                work.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    def cached_response(cached, stream: bool, variant: int, kwargs: dict):
        ext = {"model": server.name, "variant": server.engines[variant].name, "policy": server.scheduler.policy,
               "queued_s": 0.0, "adapter": kwargs.get("adapter"),               "service_s": 0.0, "cache": "hit", "deadline_met": True}
        if not stream:
            return JSONResponse({**cached, "edgestill": ext})

        async def replay():
            for i, chunk in enumerate(cached):
                yield f"data: {json.dumps({**chunk, 'edgestill': ext} if i == len(cached) - 1 else chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(replay(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.post("/v1/edgestill/estimate")
    async def estimate(request: Request):
        """For a dispatcher (serve/dispatch.py): `{"kind": "completion" | "chat", "request": <its body>}` -> when
        this server would finish it. A bad request gets the same 4xx as the request itself would."""
        try:
            body = json.loads(await request.body() or b"null")
            kind = body["kind"] if body.get("kind") in ("completion", "chat") else None
            if kind is None:
                raise BadRequest("'kind' must be 'completion' or 'chat'", param="kind")
            return server.estimate(body.get("request"), kind)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            return error_response(400, f"the estimate body is not a JSON object ({e})")
        except BadRequest as e:
            kind_ = {404: "not_found_error", 503: "server_error"}.get(e.status, "invalid_request_error")
            return error_response(e.status, e.message, kind_, e.param)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "edgestill"}
                                           for m in [server.name, *server.variant_ids]]}

    @app.get("/health")
    async def health():
        return {"status": "stopping" if server.stopping else "ok", "model": server.name,
                "variants": [e.name for e in server.engines], "adapters": server.adapter_names,
                "queue": len(server.scheduler),
                "running": server.running is not None, "policy": server.scheduler.policy}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    return app


def http_server(app, host: str = "127.0.0.1", port: int = 8080):
    """A uvicorn server for `app` whose shutdown (Ctrl-C, SIGTERM) first answers the queued requests 503 and lets the
    running one finish; plain uvicorn would wait for every open connection, so queued requests would still run."""
    import uvicorn

    class Graceful(uvicorn.Server):
        async def shutdown(self, sockets=None):
            server = getattr(app.state, "server", None)  # a dispatcher has none: its nodes stop themselves
            if server is not None:
                server.begin_shutdown()
            await super().shutdown(sockets)

    return Graceful(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
