"""Adaptive quantization in serving: the variant rule (serve/variants.choose), the memory check, the server choosing
and reporting variants (fake engines of two speeds, then two real GGUFs through the openai client), and `edgestill
serve`'s targets (a sweep folder, a run's --variants made by llama.cpp's quantizer)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import random
import threading
import time

import pytest
from conftest import tiny_overrides
from test_server import SlowEngine, _post, running

from edgestill.errors import EdgestillError
from edgestill.serve.scheduler import Job
from edgestill.serve.variants import _misses, check_memory, choose, order_best_first

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
httpx = pytest.importorskip("httpx")


# --- the rule ------------------------------------------------------------------------------------------------------

def test_an_idle_server_uses_the_best_variant():
    assert choose(Job(0.0, 1.0), 0.0, [], [4.0, 2.0, 1.0]) == 0
    assert choose(Job(0.0, 1.0, deadline=10.0), 0.0, [], [4.0, 2.0, 1.0]) == 0


def test_a_tight_deadline_steps_down_only_as_far_as_it_must():
    assert choose(Job(0.0, 1.0, deadline=3.0), 0.0, [], [4.0, 2.0, 1.0]) == 1
    assert choose(Job(0.0, 1.0, deadline=1.5), 0.0, [], [4.0, 2.0, 1.0]) == 2
    assert choose(Job(0.0, 1.0, deadline=0.5), 0.0, [], [4.0, 2.0, 1.0]) == 2  # none can: the least late


def test_the_queue_load_makes_a_request_step_down():
    queued = [Job(0.0, 1.0, deadline=3.5)]  # fits after this one on the fastest (1 + 1 <= 3.5), not after the best
    assert choose(Job(0.0, 1.0), 0.0, queued, [4.0, 2.0, 1.0]) == 1
    assert choose(Job(0.0, 1.0), 0.0, [Job(0.0, 1.0, deadline=100.0)], [4.0, 2.0, 1.0]) == 0
    # a queued request already lost whatever this one does does not drag it down
    assert choose(Job(0.0, 1.0), 0.0, [Job(0.0, 1.0, deadline=0.5)], [4.0, 2.0, 1.0]) == 0
    # without deadlines, the aging bound stands in for one
    assert choose(Job(0.0, 1.0), 0.0, [Job(0.0, 1.0)], [4.0, 2.0, 1.0], max_wait_s=3.5) == 1
    assert choose(Job(0.0, 1.0), 0.0, [Job(0.0, 1.0)], [4.0, 2.0, 1.0]) == 0
    # a queued request that can step down itself (2 s on its best, 1 s on its fastest, due at 3.5) is simulated so:
    # after this one's 2 s it still makes it on its fastest, so this one need not step down to its fastest
    assert choose(Job(0.0, 1.0), 0.0, [Job(0.0, 2.0, deadline=3.5, least_s=1.0)], [4.0, 2.0, 1.0]) == 1
    assert choose(Job(0.0, 1.0), 0.0, [Job(0.0, 2.0, deadline=3.5)], [4.0, 2.0, 1.0]) == 2


@pytest.mark.parametrize("seed", range(200))
def test_the_choice_is_the_best_variant_that_costs_no_deadline(seed):
    """On random queues: the chosen variant misses no more queued deadlines than the fastest would, meets the
    request's own deadline whenever any variant can, and no better variant does both."""
    rng = random.Random(seed)
    costs = sorted((rng.uniform(0.1, 3.0) for _ in range(rng.randint(1, 4))), reverse=True)
    now = rng.uniform(0, 5)

    def job():
        return Job(rng.uniform(0, now), rng.uniform(0.1, 2.0), deadline=rng.choice([None, now + rng.uniform(0, 8)]))

    request, queued = job(), [job() for _ in range(rng.randint(0, 6))]
    max_wait = rng.choice([math.inf, rng.uniform(1, 10)])
    i = choose(request, now, queued, costs, max_wait)
    fastest = min(range(len(costs)), key=lambda k: (costs[k], k))

    def ok(k):
        meets = request.deadline is None or now + costs[k] <= request.deadline
        return meets and _misses(queued, now + costs[k], max_wait) <= _misses(queued, now + costs[fastest], max_wait)

    if any(ok(k) for k in range(len(costs))):
        assert ok(i) and not any(ok(k) for k in range(i))
    else:
        assert i == fastest


def test_memory_check_names_the_variants_and_the_fix(tmp_path, tiny_model_dir):
    path = _tiny_gguf(tmp_path, "q8_0", tiny_model_dir)
    need = check_memory([path], 512, 1e12, "a test")[str(path)]["total"]
    with pytest.raises(EdgestillError, match=r"tiny-q8_0.gguf .* MB.*more than the memory budget of .*\(a test\).*"
                                             r"lower --ctx"):
        check_memory([path], 512, need - 1, "a test")


def _tiny_gguf(folder, tensor_type, model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgestill.export.gguf import export_gguf

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    path = folder / f"tiny-{tensor_type}.gguf"
    export_gguf(model, tokenizer, path, tensor_type=tensor_type)
    return path


def test_the_gguf_shape_and_memory_are_read_from_its_metadata(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from edgestill.plan.cost import StudentShape, gguf_ram_bytes, kv_cache_bytes

    path = _tiny_gguf(tmp_path, "q8_0", tiny_model_dir)
    shape = StudentShape.from_gguf(path)
    config = StudentShape.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    assert dataclasses.replace(shape, head_dim=None) == dataclasses.replace(config, head_dim=None)
    assert shape.dim_per_head == config.dim_per_head and shape.linear_shapes() == config.linear_shapes()
    need = gguf_ram_bytes(path, 256)
    assert need["file"] == path.stat().st_size and need["kv_cache"] == kv_cache_bytes(shape, 256)
    assert need["total"] == need["file"] + need["kv_cache"] + need["compute_buffer"]


def test_variants_are_ordered_largest_file_first(tmp_path):
    for name, size in (("a", 10), ("b", 30), ("c", 20)):
        (tmp_path / f"{name}.gguf").write_bytes(b"x" * size)
    assert [p.stem for p in order_best_first(tmp_path.glob("*.gguf"))] == ["b", "c", "a"]


# --- the server with variants (fake engines: no llama.cpp) ---------------------------------------------------------

def _two_speeds():
    big, small = SlowEngine(0.1), SlowEngine(0.02)
    big.name, small.name = "big", "small"
    big.decode_tokens_per_s, small.decode_tokens_per_s = 10.0, 50.0
    return [big, small]


def test_the_server_steps_down_under_load_and_says_which_variant_served():
    from edgestill.serve.app import create_app

    app = create_app(_two_speeds(), policy="edf", capacity=16, name="m")
    with running(app) as url:
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        alone = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=30).json()
        # 6 requests of 10 tokens at once, each due in 3 s: on the big variant (1 s each) half would be late
        out = [None] * 6
        threads = [threading.Thread(target=_post, args=(url, {"prompt": "x", "max_tokens": 10, "deadline_s": 3.0},
                                                         out, i)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pinned = httpx.post(url + "/v1/completions", json={"model": "m@small", "prompt": "x", "max_tokens": 5},
                            timeout=30).json()
        unknown = httpx.post(url + "/v1/completions", json={"model": "m@nope", "prompt": "x"}, timeout=30)
        metrics = httpx.get(url + "/metrics").text
    assert models == ["m", "m@big", "m@small"]
    assert alone["edgestill"]["variant"] == "big" and alone["edgestill"]["model"] == "m"
    assert [o[0] for o in out] == [200] * 6, out
    served = [o[2]["edgestill"]["variant"] for o in out]
    assert "small" in served and all(o[2]["edgestill"]["deadline_met"] for o in out), served
    assert pinned["edgestill"]["variant"] == "small"
    assert unknown.status_code == 404 and "'m@big'" in unknown.json()["error"]["message"]
    assert f'edgestill_variant_requests_total{{variant="small"}} {served.count("small") + 1}' in metrics
    assert 'edgestill_rate_tokens_per_s{phase="decode",variant="big"}' in metrics


def test_only_the_best_variant_answers_from_the_cache():
    from edgestill.serve.app import create_app

    engines = _two_speeds()
    with running(create_app(engines, policy="fifo", name="m")) as url:
        greedy = {"prompt": "x", "max_tokens": 3, "temperature": 0}
        first = httpx.post(url + "/v1/completions", json=greedy, timeout=30).json()
        again = httpx.post(url + "/v1/completions", json=greedy, timeout=30).json()
        small = [httpx.post(url + "/v1/completions", json={**greedy, "model": "m@small"}, timeout=30).json()
                 for _ in range(2)]
    assert (first["edgestill"]["variant"], first["edgestill"]["cache"]) == ("big", "miss")
    assert (again["edgestill"]["variant"], again["edgestill"]["cache"]) == ("big", "hit")
    assert [(s["edgestill"]["variant"], s["edgestill"]["cache"]) for s in small] == [("small", "miss"), ("small", "hit")]


# --- real variants: two GGUFs of the tiny model through the openai client -----------------------------------------

@needs_llama_cpp
def test_openai_client_against_two_real_variants(tiny_model_dir, tmp_path):
    from openai import OpenAI

    from edgestill.serve.app import create_app
    from edgestill.serve.engine import Engine
    from edgestill.serve.variants import check_same_vocabulary

    paths = order_best_first([_tiny_gguf(tmp_path, t, tiny_model_dir) for t in ("q4_0", "f16")])
    engines = [Engine(p, name=p.stem.split("-")[1], n_ctx=256) for p in paths]
    try:
        check_same_vocabulary(engines)
        with running(create_app(engines, name="tiny")) as url:
            client = OpenAI(base_url=url + "/v1", api_key="unused")
            assert [m.id for m in client.models.list().data] == ["tiny", "tiny@f16", "tiny@q4_0"]
            best = client.completions.create(model="tiny", prompt="the king", max_tokens=6, temperature=0.0)
            q4 = client.completions.create(model="tiny@q4_0", prompt="the king", max_tokens=6, temperature=0.0)
        assert best.model_extra["edgestill"]["variant"] == "f16" and q4.model_extra["edgestill"]["variant"] == "q4_0"
        assert best.choices[0].text and q4.choices[0].text
    finally:
        for e in engines:
            e.close()


# --- the command's targets -------------------------------------------------------------------------------------------

def test_a_sweep_folder_serves_its_exported_points(tmp_path, tiny_model_dir):
    from edgestill.jobs.serve import resolve_targets

    sweep = tmp_path / "sweep"
    for point, t in (("00-9MB", "f16"), ("01-3MB", "q8_0")):
        folder = sweep / "points" / point
        folder.mkdir(parents=True)
        _tiny_gguf(tmp_path, t, tiny_model_dir).rename(folder / "student.gguf")
    (sweep / "points" / "02-1MB").mkdir()  # not exported: left out
    model, found = resolve_targets([sweep])
    assert model == "sweep" and list(found) == ["00-9MB", "01-3MB"]
    empty = tmp_path / "empty"
    (empty / "points").mkdir(parents=True)
    with pytest.raises(EdgestillError, match="no exported point"):
        resolve_targets([empty])
    with pytest.raises(EdgestillError, match="give exactly one run folder"):
        resolve_targets([sweep], ["q4_0"])


@needs_llama_cpp
def test_a_runs_gguf_and_variants_are_made_once_by_llama_cpps_quantizer(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    from edgestill.cli import main
    from edgestill.jobs.serve import resolve_targets

    monkeypatch.setenv("EDGESTILL_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["distill", *tiny_overrides(tiny_model_dir, tiny_corpus, run, steps=2)]) == 0
    assert not (run / "student.gguf").exists()
    model, found = resolve_targets([run], ["q4_0", "q8_0"])
    assert model == "run" and list(found) == ["student", "q4_0", "q8_0"]
    assert found["student"] == run / "student.gguf" and found["student"].is_file()  # exported on first use
    assert found["q4_0"].stat().st_size < found["q8_0"].stat().st_size and (run / "variants" / "f16.gguf").is_file()
    stamp = found["q4_0"].stat().st_mtime_ns
    time.sleep(0.01)
    resolve_targets([run], ["q4_0"])
    assert found["q4_0"].stat().st_mtime_ns == stamp  # made once
    with pytest.raises(EdgestillError, match="not llama.cpp types"):
        resolve_targets([run], ["q9_9"])
