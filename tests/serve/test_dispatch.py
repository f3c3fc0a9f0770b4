"""Several nodes: the dispatcher's choice and metrics merge, the dispatcher in front of two stand-in node servers
(fast and slow), and `edgestill serve --nodes` spawning real llama.cpp worker processes on a tiny GGUF."""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack

import pytest
from test_server import SlowEngine, _post_many, running

from edgestill.serve.dispatch import Node, choose_node, merge_metrics

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
httpx = pytest.importorskip("httpx")


def test_the_node_that_finishes_earliest_and_has_room_is_chosen():
    est = [{"finish_s": 3.0}, {"finish_s": 1.0, "queue_full": True}, {"finish_s": 2.0}, None]
    assert choose_node(est) == 2
    assert choose_node([{"finish_s": 1.0}, {"finish_s": 1.0}]) == 0  # ties: the first
    assert choose_node([None, {"finish_s": 1.0, "queue_full": True}]) is None


def test_node_metrics_are_merged_by_family_with_a_node_label():
    text = ("# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n"
            "# HELP b B.\n# TYPE b gauge\nb 2\n")
    lines = merge_metrics([("n0", text), ("n1", text)])
    assert lines == ["# HELP a_total A.", "# TYPE a_total counter", 'a_total{node="n0",x="1"} 3',
                     'a_total{node="n1",x="1"} 3', "# HELP b B.", "# TYPE b gauge", 'b{node="n0"} 2', 'b{node="n1"} 2']


def _nodes(stack: ExitStack, speeds: list[float]) -> list[Node]:
    from edgestill.serve.app import create_app

    nodes = []
    for i, per_token in enumerate(speeds):
        engine = SlowEngine(per_token)
        engine.decode_tokens_per_s = 1.0 / per_token
        url = stack.enter_context(running(create_app(engine, policy="edf", capacity=4)))
        nodes.append(Node(f"n{i}", url))
    return nodes


def test_the_dispatcher_spreads_requests_and_passes_answers_through():
    from edgestill.serve.dispatch import create_dispatcher

    with ExitStack() as stack:
        nodes = _nodes(stack, [0.05, 0.02])  # n1 is 2.5x faster
        url = stack.enter_context(running(create_dispatcher(nodes)))
        alone = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=30).json()
        out = _post_many(url, {"prompt": "x", "max_tokens": 20}, 6, 0.05)  # the fast node fills, the slow one helps
        streamed = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True},
                              timeout=30).text
        hopeless = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 50, "deadline_s": 0.1},
                              timeout=30)
        bad = httpx.post(url + "/v1/completions", json={"prompt": ""}, timeout=30)
        health = httpx.get(url + "/health").json()
        metrics = httpx.get(url + "/metrics").text
    assert alone["edgestill"]["node"] == "n1"
    assert [o[0] for o in out] == [200] * 6, out
    assert {o[2]["edgestill"]["node"] for o in out} == {"n0", "n1"}
    assert streamed.rstrip().endswith("data: [DONE]") and '"node": "n1"' in streamed
    assert hopeless.status_code == 503 and "no node can meet the deadline" in hopeless.json()["error"]["message"]
    assert bad.status_code == 400 and "'prompt'" in bad.json()["error"]["message"]
    assert health["nodes_up"] == 2 and [n["name"] for n in health["nodes"]] == ["n0", "n1"]
    assert 'edgestill_dispatch_total{node="n1"}' in metrics
    assert 'edgestill_requests_total{node="n0",outcome="completed"}' in metrics
    assert metrics.count("# TYPE edgestill_requests_total counter") == 1
    assert 'edgestill_dispatch_rejected_total{reason="deadline"} 1' in metrics


def test_a_node_that_is_down_is_skipped_and_none_up_is_a_503():
    from edgestill.serve.dispatch import create_dispatcher

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = Node("dead", f"http://127.0.0.1:{sock.getsockname()[1]}")  # nothing listens there once closed
    with ExitStack() as stack:
        nodes = _nodes(stack, [0.01])
        url = stack.enter_context(running(create_dispatcher([dead, *nodes])))
        ok = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        health = httpx.get(url + "/health").json()
        metrics = httpx.get(url + "/metrics").text
    assert ok.status_code == 200 and ok.json()["edgestill"]["node"] == "n0"
    assert health["nodes_up"] == 1 and health["nodes"][0]["status"] == "down"
    assert 'edgestill_node_down_total{node="dead"} 1' in metrics
    with running(create_dispatcher([dead])) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 503 and "no serving node answered" in r.json()["error"]["message"]


def test_nodes_are_parsed_with_their_threads():
    from edgestill.errors import EdgestillError
    from edgestill.jobs.serve import parse_nodes

    assert parse_nodes("host:1,rpi5-8gb:2", 2) == [("host", 1), ("rpi5-8gb", 2)]
    assert parse_nodes("host,host", 2) == [("host", 1), ("host", 1)]
    with pytest.raises(EdgestillError, match="positive integer"):
        parse_nodes("host:0", 2)


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
def test_serve_nodes_spawns_workers_that_answer_the_openai_client_and_stop_with_it(tiny_gguf):
    from openai import OpenAI

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "edgestill.cli", "serve", str(tiny_gguf), "--port", str(port),
                             "--nodes", "host:1,host:1", "--ctx", "256", "--name", "tiny"],
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).json().get("nodes_up") == 2:
                    break
            except (httpx.HTTPError, json.JSONDecodeError):
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the nodes did not come up"
            time.sleep(0.5)
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        done = client.completions.create(model="tiny", prompt="the king", max_tokens=4, temperature=0.0)
        assert done.choices[0].text and done.model_extra["edgestill"]["node"] in ("node0-host", "node1-host")
        chunks = list(client.completions.create(model="tiny", prompt="a fair", max_tokens=4, stream=True))
        assert chunks[-1].model_extra["edgestill"]["node"].startswith("node")
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    assert proc.returncode in (0, -signal.SIGTERM, 1), err
    assert "dispatching over 2 nodes" in err
    deadline = time.monotonic() + 60  # the nodes stop with the dispatcher (a graceful shutdown each)
    while True:
        leftover = subprocess.run(["pgrep", "-f", f"edgestill.cli serve {tiny_gguf}"], capture_output=True,
                                  text=True).stdout
        if not leftover.strip() or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not leftover.strip(), f"node processes left behind: {leftover}"
