"""`edgestill serve` over loopback: the official openai client against llama.cpp on a tiny GGUF (completions, chat
with the GGUF's template, streaming), bad requests, and overload/deadline/shutdown behaviour on a slow fake engine."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")


@contextmanager
def running(app):
    """The app on a free loopback port in a background uvicorn; yields its base URL; stops it gracefully."""
    from edgestill.serve.app import http_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = http_server(app, "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --- the real engine: llama.cpp on the tiny model, through the openai client -----------------------------------------

@pytest.fixture(scope="module")
def live(tiny_gguf):
    from edgestill.serve.app import create_app
    from edgestill.serve.engine import Engine

    engine = Engine(tiny_gguf, name="tiny", n_ctx=256, n_threads=2)
    with running(create_app(engine, policy="vdf", capacity=4)) as url:
        yield url, engine
    engine.close()


@needs_llama_cpp
def test_openai_client_completions_and_chat(live):
    from openai import OpenAI

    url, engine = live
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="the king", max_tokens=8, temperature=0.0, seed=1)
    assert done.choices[0].text and done.usage.completion_tokens <= 8
    extension = done.model_extra["edgestill"]
    assert extension["model"] == "tiny" and extension["policy"] == "vdf" and extension["deadline_met"] is True
    assert extension["cache"] == "miss"
    again = client.completions.create(model="tiny", prompt="the king", max_tokens=8, temperature=0.0, seed=1)
    assert again.choices[0].text == done.choices[0].text and again.model_extra["edgestill"]["cache"] == "hit"
    engine_again = client.completions.create(model="tiny", prompt="the king", max_tokens=8, temperature=0.0, seed=2)
    assert engine_again.model_extra["edgestill"]["cache"] == "miss"  # another seed: another request
    assert engine_again.choices[0].text == done.choices[0].text  # greedy: the same text, generated again
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=6,
                                          temperature=0.0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens == engine.count_chat(
        [{"role": "user", "content": "hello"}])


@needs_llama_cpp
def test_openai_client_streams_the_same_text(live):
    from openai import OpenAI

    url, _ = live
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    whole = client.completions.create(model="tiny", prompt="a fair", max_tokens=10, temperature=0.0).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt="a fair", max_tokens=10, temperature=0.0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].model_extra["edgestill"]["deadline_met"] is True
    pieces = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0.0, stream=True, extra_body={"value": 3}))
    assert any(p.choices and p.choices[0].delta.content for p in pieces)


@needs_llama_cpp
@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "not served here"),
    ({"prompt": ""}, 400, "'prompt' must be a non-empty string"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "more than this server generates"),
    ({"prompt": "x", "max_tokens": 0}, 400, "'max_tokens' must be a positive integer"),
    ({"prompt": "the king " * 400}, 400, "longer than the model's context"),
    ({"prompt": "x y", "max_tokens": 256}, 400, "exceed the context"),
    ({"prompt": "x", "temperature": 9}, 400, "'temperature' must be a number in"),
    ({"prompt": "x", "deadline_s": -1}, 400, "'deadline_s' must be a positive"),
    ({"prompt": "x", "value": 0}, 400, "'value'"),
])
def test_bad_requests_get_a_4xx_that_names_the_problem(live, body, status, needle):
    url, _ = live
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + "/v1/completions", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


@needs_llama_cpp
def test_health_and_prometheus_metrics(live):
    url, _ = live
    assert httpx.get(url + "/health").json()["status"] == "ok"
    text = httpx.get(url + "/metrics").text
    assert 'edgestill_requests_total{outcome="completed"}' in text and "edgestill_queue_depth 0" in text
    assert 'edgestill_rate_tokens_per_s{phase="decode"}' in text
    _, engine = live
    assert 1 < engine.decode_tokens_per_s < 1e5 and engine.prefill_tokens_per_s > 1  # measured, plausible


# --- overload, deadlines and shutdown, on a slow fake engine (no llama.cpp needed) -------------------------------

class SlowEngine:
    """Engine's interface; generates `max_tokens` tokens at `per_token_s` each."""

    name, n_ctx = "slow", 512
    prefill_tokens_per_s, decode_tokens_per_s = 1000.0, 20.0

    def __init__(self, per_token_s: float = 0.05):
        self.per_token_s = per_token_s

    def count_prompt(self, prompt):
        return len(prompt.split())

    def count_chat(self, messages):
        return sum(len(m["content"].split()) for m in messages)

    def predict_s(self, prompt_tokens, max_tokens):
        return prompt_tokens / self.prefill_tokens_per_s + max_tokens / self.decode_tokens_per_s

    def observe(self, *args):
        pass

    def finish(self, before, prompt_tokens):
        return 0

    calls = 0

    def complete(self, stream, max_tokens, **kwargs):
        type(self).calls += 1
        chunks = self._chunks(max_tokens)
        if stream:
            return chunks, []
        text = "".join(c["choices"][0]["text"] for c in chunks)
        return {"id": "x", "object": "text_completion", "model": self.name, "created": 0,
                "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": max_tokens, "total_tokens": 1 + max_tokens}}, []

    def _chunks(self, n):
        for _ in range(n):
            time.sleep(self.per_token_s)
            yield {"id": "x", "object": "text_completion", "model": self.name, "created": 0,
                   "choices": [{"index": 0, "text": " t", "finish_reason": None, "logprobs": None}]}

    chat = complete


def _post(url, body, out, i):
    """POST a completion; out[i] = (status, Retry-After, JSON, when the answer came)."""
    try:
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        out[i] = (r.status_code, r.headers.get("retry-after"), r.json(), time.monotonic())
    except Exception as e:  # noqa: BLE001 - recorded, and the test fails on it
        out[i] = ("exception", None, repr(e), time.monotonic())


def _post_many(url, body, n, gap_s=0.0):
    """POST `body` n times from n threads, started `gap_s` apart; the `_post` outcomes in order."""
    out = [None] * n
    threads = [threading.Thread(target=_post, args=(url, body, out, i)) for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(gap_s)
    for t in threads:
        t.join()
    return out


def test_overload_answers_429_with_retry_after_and_loses_nothing():
    from edgestill.serve.app import create_app

    app = create_app(SlowEngine(0.2), policy="fifo", capacity=2)  # 2 s per request
    with running(app) as url:
        out = _post_many(url, {"prompt": "x", "max_tokens": 10}, 8, 0.02)
        metrics = httpx.get(url + "/metrics").text
    codes = [o[0] for o in out]
    assert "exception" not in codes and set(codes) <= {200, 429} and codes.count(200) >= 3 and 429 in codes
    assert all(o[1] is not None and int(o[1]) >= 1 for o in out if o[0] == 429)  # Retry-After
    assert all("queue is full" in o[2]["error"]["message"] for o in out if o[0] == 429)
    assert f'edgestill_requests_total{{outcome="completed"}} {codes.count(200)}' in metrics
    assert f'edgestill_requests_total{{outcome="rejected",reason="queue_full"}} {codes.count(429)}' in metrics


def test_a_hopeless_deadline_is_rejected_early_not_run():
    from edgestill.serve.app import create_app

    app = create_app(SlowEngine(0.1), policy="edf", capacity=8)
    with running(app) as url:
        out = [None] * 2
        first = threading.Thread(target=_post, args=(url, {"prompt": "x", "max_tokens": 20}, out, 0))  # ~2 s
        first.start()
        deadline = time.monotonic() + 20
        while app.state.server.running is None:  # the first request is generating
            assert time.monotonic() < deadline, "the first request never started"
            time.sleep(0.005)
        _post(url, {"prompt": "x", "max_tokens": 4, "deadline_s": 0.5}, out, 1)  # needs 0.2 s, behind ~1.9 s of work
        first.join()
    assert out[0][0] == 200 and out[1][0] == 503 and "cannot meet its deadline" in out[1][2]["error"]["message"]
    assert out[1][3] < out[0][3]  # answered while the first request still ran, not when its turn came
    with running(create_app(SlowEngine(0.05), policy="edf")) as url:  # a deadline shorter than the work itself
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 100, "deadline_s": 1.0}, timeout=30)
    assert r.status_code == 503 and "shorter than this request's predicted service time" in r.json()["error"]["message"]


def test_a_request_served_late_says_so():
    from edgestill.serve.app import create_app

    engine = SlowEngine(0.05)
    engine.decode_tokens_per_s = 1e6  # the prediction is far too optimistic: admitted, then late
    with running(create_app(engine, policy="vdf")) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 10, "deadline_s": 0.1}, timeout=30)
        metrics = httpx.get(url + "/metrics").text
    assert r.status_code == 200 and r.json()["edgestill"]["deadline_met"] is False
    assert "edgestill_deadline_missed_total 1" in metrics


def test_shutdown_finishes_the_running_request_and_answers_the_queued():
    from edgestill.serve.app import create_app

    out = [None] * 3
    app = create_app(SlowEngine(0.2), policy="fifo", capacity=8)  # 20 tokens: 4 s, so shutdown comes mid-request
    state = app.state.server
    with running(app) as url:
        threads = [threading.Thread(target=_post, args=(url, {"prompt": "x", "max_tokens": 20}, out, i)) for i in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        deadline = time.monotonic() + 20
        while not (state.running is not None and len(state.scheduler) == 2):  # one running, two queued
            assert time.monotonic() < deadline, "the requests never reached the server"
            time.sleep(0.01)
    for t in threads:
        t.join()
    codes = [o[0] for o in out]
    assert codes.count(200) == 1 and codes.count(503) == 2, out
    assert all("shutting down" in o[2]["error"]["message"] for o in out if o[0] == 503)


# --- the command line ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, needle", [
    (lambda tmp: tmp / "nope", "does not exist"),
    (lambda tmp: (tmp / "run" / "student").mkdir(parents=True) or tmp / "run", "is not a finished edgestill run"),
    (lambda tmp: tmp.joinpath("bad.gguf").write_bytes(b"not a gguf") and tmp / "bad.gguf", "gguf"),
])
def test_serve_refuses_what_it_cannot_serve_in_one_line(tmp_path, capsys, make, needle):
    from edgestill.cli import main

    assert main(["serve", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgestill: error:") and needle.lower() in err[0].lower()


def test_deterministic_repeats_come_from_the_cache_sampled_ones_never():
    from edgestill.serve.app import create_app

    engine = SlowEngine(0.01)
    SlowEngine.calls = 0
    with running(create_app(engine, policy="fifo")) as url:
        greedy = {"prompt": "x", "max_tokens": 5, "temperature": 0}
        a = httpx.post(url + "/v1/completions", json=greedy, timeout=30).json()
        b = httpx.post(url + "/v1/completions", json=greedy, timeout=30).json()
        streamed = [httpx.post(url + "/v1/completions", json={**greedy, "stream": True}, timeout=30).text
                    for _ in range(2)]
        sampled = [httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 5, "temperature": 0.7},
                              timeout=30).json() for _ in range(2)]
        metrics = httpx.get(url + "/metrics").text
    assert (a["edgestill"]["cache"], b["edgestill"]["cache"]) == ("miss", "hit") and a["choices"] == b["choices"]
    assert '"cache": "miss"' in streamed[0] and '"cache": "hit"' in streamed[1]
    assert streamed[0].replace('"cache": "miss"', "") .count("data: ") == streamed[1].count("data: ")
    assert [s["edgestill"]["cache"] for s in sampled] == ["off", "off"]
    assert SlowEngine.calls == 4  # greedy once, streamed once, sampled twice
    assert 'edgestill_cache_requests_total{result="hit"} 2' in metrics


@needs_llama_cpp
def test_a_shared_prompt_prefix_is_taken_from_the_kv_cache_and_the_answer_is_unchanged(tiny_gguf):
    """Two prompts that share their start: the second evaluates only its new tokens, and generates what an engine
    that starts every request from an empty state generates."""
    from edgestill.serve.engine import Engine

    shared = "the king and the queen walked " * 6
    fresh = Engine(tiny_gguf, n_ctx=256, prefix_reuse=False)
    reusing = Engine(tiny_gguf, n_ctx=256, prefix_reuse=True)
    try:
        outputs = {}
        for name, engine in (("fresh", fresh), ("reusing", reusing)):
            texts = []
            for prompt in (shared + "to the", shared + "into a"):
                result, before = engine.complete(False, prompt=prompt, max_tokens=8, temperature=0.0)
                engine.finish(before, engine.count_prompt(prompt))
                texts.append(result["choices"][0]["text"])
            outputs[name] = (texts, engine.last_reused_tokens)
        assert outputs["fresh"][0] == outputs["reusing"][0]
        assert outputs["fresh"][1] == 0 and outputs["reusing"][1] >= fresh.count_prompt(shared) - 2
    finally:
        fresh.close()
        reusing.close()
