"""`edgestill serve` under load: FIFO / EDF / VDF / plain value density, each with one fixed Q8_0 model and with adaptive variants, driven
over loopback by an async httpx load generator at three load levels, the last one overload.

The server is the real command (`python -m edgestill.cli serve ...`: FastAPI on uvicorn, llama.cpp underneath),
one per (policy, variants) case, all started first and kept up; each (load, seed) workload then goes through every
case in turn, in an order rotated from one workload to the next, so that the machine's drift over the hour is shared
by all cases instead of landing on the last ones. The model is the default teacher corrected on the training plays (the
reference of every other benchmark), quantized by llama.cpp:
  fixed     llama.cpp Q8_0 of the corrected teacher (what the issue's goal compares against)
  adaptive  that Q8_0, its Q4_K_M and Q4_0, and the default run's 15-layer sliced student in Q8_0; each request
            gets the best variant the queue can afford (serve/variants.py)
Each variant's fidelity (top-1 agreement and KL against the corrected teacher, on the held-out plays) comes from
quant_table.json and default_run.json, so each row also says what the adaptive answers cost in quality.

The load: Poisson arrivals of completion requests (streamed, greedy, prompts cut from the held-out plays, every
prompt different so the response cache never answers), a mix of prompt lengths (12 / 48 / 144 words) and outputs
(8 / 16 / 48 tokens), values 1, 1, 2 or 5, and a deadline of 2-8 x the request's service time alone on the Q8_0
server. That time is measured first, end to end over HTTP, one request at a time (a least-squares fit of overhead +
per prompt token + per output token). Load = arrival rate x mean service time alone: 0.6, 1.0 and 1.6 by default.

Threads: every case runs llama.cpp with `edgestill serve`'s default, every core but one (the HTTP side and the load
generator share the machine). One extra case, FIFO on one Q8_0 with a llama.cpp thread on every core, shows why. Every case sees the same arrivals (they depend only on the seed and load).

Per (load, policy, variants), over the seeds: deadline_miss_rate = requests not answered by their deadline (late,
or refused 429/503) / requests; goodput = output tokens of the requests that met their deadline / the
workload's window, from its first arrival to its last deadline (the same seconds for every case; no token after it
can count); span goodput = the same tokens / the case's own seconds from the first arrival to the last answer (the
definition of runs before 2026-12-06: a policy that serves a deferred request after its deadline lengthens its own
span, and so lowers this one, without delivering fewer tokens in time); tokens/s = all output tokens / the case's own
span; p50/p99 time to first token and
p99 time to the last, over the requests answered 200; value met = the values of the requests that met their
deadline / the values of all requests (what VDF is for); lost requests (no answer at all) and server errors (5xx other
than the deliberate 503s, and /metrics' generation failures), both of which must be 0.

    python benchmarks/serve_load.py                     # ~1.5 h on 2 cores: 9 cases x 3 loads x 3 seeds x 30 requests
    python benchmarks/serve_load.py --seeds 0 --loads 1.6 --requests 20     # a quick look
Uses the GGUFs of benchmarks/quant_table.py and the run of benchmarks/default_run.py, and makes them when missing
(the teacher's correction, ~6 min unless cached, its llama.cpp files, and the default shrink, ~15 min).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, START, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "runs" / "bench"
DEFAULT_RUN = ROOT / "runs" / "bench-default-run"
POLICIES = ("fifo", "edf", "vdf", "density")
PROMPT_WORDS = (12, 48, 144)
OUTPUT_TOKENS = (8, 16, 48)
VALUES = (1, 1, 2, 5)
SLACK = (2.0, 8.0)


# --- the variants and what each keeps ------------------------------------------------------------------------------

def variants(fidelity_blocks: int = 48) -> list[dict]:
    """The served files, best first, each with its fidelity to the corrected teacher. The teacher's llama.cpp files
    are quant_table.json's when they are on disk (with that benchmark's fidelity); otherwise (a fresh clone, or a
    teacher correction since changed) they are made here from the corrected teacher, as quant_table.py makes them,
    and their fidelity is measured here on the held-out plays from llama.cpp's logits. The student is the default
    run's (made here when missing: the default `edgestill shrink`, ~15 min), with the fidelity that run measured."""
    table = json.loads((RESULTS / "quant_table.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    qtypes = ("Q8_0", "Q4_K_M", "Q4_0")
    if all((ROOT / rows[f"llama.cpp {q}"]["gguf"]).is_file() for q in qtypes):
        out = [{"name": f"teacher-{q.lower()}", "gguf": ROOT / rows[f"llama.cpp {q}"]["gguf"],
                "top1_agreement": rows[f"llama.cpp {q}"]["top1_agreement"],
                "kl": rows[f"llama.cpp {q}"]["kl_teacher_model"], "fidelity_source": "quant_table.json (llama.cpp logits)"}
               for q in qtypes]
    else:
        out = made_teacher_variants(qtypes, fidelity_blocks)
    if not (DEFAULT_RUN / "DONE").is_file():
        print(f"making the default run in {DEFAULT_RUN} (edgestill shrink, ~15 min)", flush=True)
        subprocess.run([sys.executable, "-m", "edgestill.cli", "shrink", "--out", str(DEFAULT_RUN), "--overwrite"],
                       cwd=ROOT, check=True)
    student = DEFAULT_RUN / "student.gguf"
    if not student.is_file():
        subprocess.run([sys.executable, "-m", "edgestill.cli", "export", str(DEFAULT_RUN), "--type", "q8_0"], check=True)
    run = json.loads((DEFAULT_RUN / "metrics.json").read_text())
    out.append({"name": f"student{run['student']['num_layers']}-q8_0", "gguf": student,
                "top1_agreement": run["top1_agreement"], "kl": run["kl_teacher_student"],
                "fidelity_source": f"{DEFAULT_RUN.relative_to(ROOT)}/metrics.json (the run's PyTorch student, before "
                                   "its Q8_0 export)"})
    return out


def made_teacher_variants(qtypes, blocks: int) -> list[dict]:
    """The corrected teacher's llama.cpp files, made (quant_table.make_artifacts, no training beyond the cached
    correction) and scored here: top-1 agreement and KL against the corrected teacher on `blocks` held-out blocks."""
    from quant_table import make_artifacts

    from edgestill.config import ShrinkConfig
    from edgestill.data.corpus import corpus_blocks
    from edgestill.evaluate.gguf_eval import gguf_quality, teacher_logprobs
    from edgestill.jobs.shrink import reference_teacher
    from edgestill.models.load import load_causal_lm, resolve_model_path

    cfg = ShrinkConfig()
    original = load_causal_lm(cfg.teacher.model)
    data = corpus_blocks(cfg.data, original.tokenizer)
    reference = reference_teacher(cfg, original, data)
    made = {r["name"]: r for r in make_artifacts(reference, Path(resolve_model_path(cfg.teacher.model)), train=False)}
    test = data.test[:blocks]
    t_logp = teacher_logprobs(reference.model, test)
    out = []
    for q in qtypes:
        path = Path(made[f"llama.cpp {q}"]["gguf"])
        quality = gguf_quality(path, test, t_logp)
        print(f"  {path.name}: top-1 {quality['top1_agreement']:.3f}, KL {quality['kl_teacher_model']:.3f}", flush=True)
        out.append({"name": f"teacher-{q.lower()}", "gguf": path, "top1_agreement": quality["top1_agreement"],
                    "kl": quality["kl_teacher_model"], "fidelity_source": f"measured here (llama.cpp logits, "
                    f"{test.size:,} held-out tokens; quant_table.json's files are not on disk)"})
    return out


# --- the load --------------------------------------------------------------------------------------------------------

def prompts(n: int, seed: int) -> list[str]:
    """`n` different prompts cut from the held-out plays, of PROMPT_WORDS words."""
    from edgestill.config import ShrinkConfig
    from edgestill.data.corpus import load_documents, split_documents

    cfg = ShrinkConfig().data
    test = split_documents(load_documents(cfg.path, cfg.text_field), cfg.val_fraction, cfg.test_fraction, cfg.split_seed).test
    words = " ".join(d.text for d in test).split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.choice(PROMPT_WORDS)
        start = rng.randrange(0, len(words) - k)
        out.append(" ".join(words[start: start + k]))
    return out


def arrivals(n: int, load: float, seed: int, alone_s, count_tokens) -> list[dict]:
    """The requests of one (load, seed): arrival time, body, deadline; the same for every case. `alone_s(prompt
    tokens, max_tokens)`: a request's measured service time alone on the Q8_0 server."""
    rng = random.Random(f"{seed}:{load}")
    texts = prompts(n, seed * 7919 + round(load * 100))
    reqs = []
    for text in texts:
        max_tokens = rng.choice(OUTPUT_TOKENS)
        alone = alone_s(count_tokens(text), max_tokens)
        reqs.append({"alone_s": alone, "deadline_s": round(rng.uniform(*SLACK) * alone, 3),
                     "body": {"prompt": text, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                              "value": rng.choice(VALUES)}})
    mean_alone = statistics.mean(r["alone_s"] for r in reqs)
    t = 0.0
    for r in reqs:
        t += rng.expovariate(load / mean_alone)
        r["at"] = t
        r["body"]["deadline_s"] = r["deadline_s"]
    return reqs


async def send(client, url: str, req: dict, t0: float) -> dict:
    """One request at its arrival time; what the client saw."""
    await asyncio.sleep(max(0.0, t0 + req["at"] - time.monotonic()))
    sent = time.monotonic()
    out = {"sent": sent, "status": None, "ttft": None, "end": None, "tokens": 0, "variant": None}
    try:
        async with client.stream("POST", url + "/v1/completions", json=req["body"]) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["status"] = 500
                        continue
                    if chunk["choices"] and chunk["choices"][0].get("text"):
                        out["ttft"] = out["ttft"] or time.monotonic() - sent
                        out["tokens"] += 1
                    if "edgestill" in chunk:
                        out["variant"] = chunk["edgestill"]["variant"]
        out["end"] = time.monotonic()
    except Exception as e:  # noqa: BLE001 - a request without an answer is a lost request, and counted
        out["error"] = repr(e)
    out["met"] = out["status"] == 200 and out["end"] - sent <= req["deadline_s"]
    return out


async def drive(url: str, reqs: list[dict]) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=256)) as client:
        t0 = time.monotonic() + 0.2
        return await asyncio.gather(*(send(client, url, r, t0) for r in reqs))


def summarize(reqs: list[dict], seen: list[dict], fidelity: dict) -> dict:
    ok = [s for s in seen if s["status"] == 200]
    start = min(s["sent"] for s in seen)
    stop = max(s["end"] or s["sent"] for s in seen)
    seconds = stop - start
    ttft = sorted(s["ttft"] for s in ok if s["ttft"] is not None)
    latency = sorted(s["end"] - s["sent"] for s in ok)

    def q(xs, p):
        return None if not xs else xs[min(len(xs) - 1, math.ceil(p * len(xs)) - 1)]

    served = [s["variant"] for s in ok]
    window = max(r["at"] + r["deadline_s"] for r in reqs) - min(r["at"] for r in reqs)
    met_tokens = sum(s["tokens"] for s in seen if s["met"])
    return {
        "requests": len(seen), "answered": len(ok), "met": sum(s["met"] for s in seen),
        "late": sum(s["status"] == 200 and not s["met"] for s in seen),
        "refused_429": sum(s["status"] == 429 for s in seen), "refused_503": sum(s["status"] == 503 for s in seen),
        "deadline_miss_rate": 1 - sum(s["met"] for s in seen) / len(seen),
        "value_met_fraction": sum(r["body"]["value"] for r, s in zip(reqs, seen) if s["met"])
        / sum(r["body"]["value"] for r in reqs),
        "goodput_tokens_per_s": met_tokens / window, "goodput_span_tokens_per_s": met_tokens / seconds,
        "tokens_per_s": sum(s["tokens"] for s in ok) / seconds,
        "ttft_p50_s": q(ttft, 0.5), "ttft_p99_s": q(ttft, 0.99), "latency_p99_s": q(latency, 0.99),
        "lost_requests": sum(s["status"] is None for s in seen),
        "lost_errors": [s["error"] for s in seen if "error" in s][:5],
        "server_errors": sum(s["status"] is not None and s["status"] >= 500 and s["status"] != 503 for s in seen),
        "served_by": {v: served.count(v) for v in sorted(set(served))},
        "top1_agreement_served": statistics.mean(fidelity[v] for v in served) if served else None,
        "seconds": seconds, "window_s": window,
    }


# --- one case: a server, every load and seed -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metrics(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


@contextlib.contextmanager
def serving(policy: str, files: list[Path], args, tag: str, threads: int | None = None):
    """`edgestill serve FILES` in its own process on a free loopback port; yields its URL; stops it (SIGTERM)."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = BENCH / f"serve-{tag}.log"
    command = [sys.executable, "-m", "edgestill.cli", "serve", *map(str, files), "--policy", policy, "--port", str(port),
               "--queue", str(args.queue), "--ctx", "1024", "--threads", str(threads or args.threads), "--name", "smollm2"]
    with open(log, "w") as err:
        server = subprocess.Popen(command, stderr=err, stdout=err)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start; see {log}")
                time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=60)


def calibrate(files: list[Path], args, count_tokens) -> dict:
    """A request's service time alone on the Q8_0 server, measured: every (prompt length, output) pair of the mix,
    twice, one request at a time, end to end over HTTP; least squares t = a + b x prompt tokens + c x max_tokens."""
    import httpx
    import numpy as np

    texts = prompts(60 * len(PROMPT_WORDS), seed=10_007)
    by_words = {k: iter([t for t in texts if len(t.split()) == k]) for k in PROMPT_WORDS}
    xs, ys = [], []
    with serving("fifo", files, args, "calibration") as url:
        for rep in range(3):  # the first round warms up (its times are not kept)
            for k in PROMPT_WORDS:
                for out in OUTPUT_TOKENS:
                    text = next(by_words[k])  # a new prompt every time: no prefix reuse, no cache, as in the load
                    t0 = time.monotonic()
                    r = httpx.post(url + "/v1/completions", json={"prompt": text, "max_tokens": out, "temperature": 0.0,
                                                                  "stream": True}, timeout=120)
                    assert r.status_code == 200, r.text
                    if rep:
                        ys.append(time.monotonic() - t0)
                        xs.append([1.0, count_tokens(text), out])
    for x, y in zip(xs, ys):
        print(f"  calibration: {x[1]:.0f} prompt tokens, {x[2]:.0f} out: {y:.3f} s", flush=True)
    coef, *_ = np.linalg.lstsq(np.array(xs), np.array(ys), rcond=None)
    fit = {"overhead_s": float(coef[0]), "s_per_prompt_token": float(coef[1]), "s_per_output_token": float(coef[2]),
           "requests": len(ys), "mean_s": float(np.mean(ys))}
    print(f"alone on the Q8_0: {fit['overhead_s'] * 1e3:.0f} ms + {fit['s_per_prompt_token'] * 1e3:.2f} ms/prompt token "
          f"+ {fit['s_per_output_token'] * 1e3:.1f} ms/output token", flush=True)
    return fit


def run_cases(cases: list[tuple], served: list[dict], workloads: dict, args, fidelity: dict) -> dict:
    """Every case's server started at once and kept up; each (load, seed) workload is then driven through every case
    in turn, the order rotated from one workload to the next. So a case's numbers do not depend on when in the run
    it was measured: this shared machine's speed drifts over an hour (a run that measured case after case saw the
    misses of every policy rise together as it went on)."""
    results: dict[tuple, dict] = {case: {} for case in cases}
    with contextlib.ExitStack() as stack:
        urls = {}
        for case in cases:
            policy, adaptive, threads = case
            files = [v["file"] for v in served] if adaptive else [served[0]["file"]]
            urls[case] = stack.enter_context(serving(policy, files, args, _tag(case), threads))
        for i, ((load, seed), reqs) in enumerate(workloads.items()):
            shift = i % len(cases)
            for case in cases[shift:] + cases[:shift]:
                seen = asyncio.run(drive(urls[case], reqs))
                r = results[case][(load, seed)] = summarize(reqs, seen, fidelity)
                print(f"  {_tag(case):18s} load {load} seed {seed}: miss {r['deadline_miss_rate']:.2f}, goodput "
                      f"{r['goodput_tokens_per_s']:.1f} tok/s, served by {r['served_by']}, lost {r['lost_requests']}, "
                      f"errors {r['server_errors']}", flush=True)
                time.sleep(2.0)  # the queue drains; the next case starts on an idle server
        for case in cases:
            results[case]["server_errors_metric"] = metrics(urls[case]).get("edgestill_server_errors_total", 0.0)
    return results


def _tag(case: tuple) -> str:
    policy, adaptive, threads = case
    return f"{policy}-{'adaptive' if adaptive else 'fixed'}-{threads}t"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", default="0.6,1.0,1.6")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--requests", type=int, default=30, help="requests per (load, seed)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--queue", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None,
                    help="llama.cpp threads of every case (default: edgestill serve's, every core but one)")
    ap.add_argument("--name", default="serve_load",
                    help="result name: benchmarks/results/<name>.json (default serve_load; a partial run, e.g. one load, "
                         "goes under another name so it does not replace the full table)")
    ap.add_argument("--fidelity-blocks", type=int, default=48,
                    help="held-out blocks that score the teacher's variants when they are made here (default 48)")
    ap.add_argument("--no-all-cores-case", action="store_true",
                    help="skip the extra FIFO case on one Q8_0 with a llama.cpp thread on every core")
    args = ap.parse_args()
    import os

    from edgestill.evaluate.environment import environment
    from edgestill.jobs.serve import default_threads

    args.threads = args.threads or default_threads()
    cores = os.cpu_count() or 1
    loads = [float(x) for x in args.loads.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]

    from llama_cpp import Llama

    served = variants(args.fidelity_blocks)
    fidelity = {v["name"]: v["top1_agreement"] for v in served}
    fixed = served[0]
    vocab = Llama(str(fixed["gguf"]), vocab_only=True, verbose=False)
    count = lambda text: len(vocab.tokenize(text.encode(), add_bos=True))  # noqa: E731

    # the served files must be named as the variants: link them under runs/bench/serve-variants/
    folder = BENCH / "serve-variants"
    folder.mkdir(parents=True, exist_ok=True)
    for v in served:
        link = folder / f"{v['name']}.gguf"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(v["gguf"]).resolve())
        v["file"] = link
    fit = calibrate([fixed["file"]], args, count)

    def alone_s(prompt_tokens: int, max_tokens: int) -> float:
        return fit["overhead_s"] + fit["s_per_prompt_token"] * prompt_tokens + fit["s_per_output_token"] * max_tokens

    workloads = {(load, seed): arrivals(args.requests, load, seed, alone_s, count) for load in loads for seed in seeds}
    rows = []
    cases = [(policy, adaptive, args.threads) for policy in args.policies.split(",") for adaptive in (False, True)]
    if not args.no_all_cores_case and cores != args.threads:
        cases.append(("fifo", False, cores))
    every = run_cases(cases, served, workloads, args, fidelity)
    for policy, adaptive, threads in cases:
        results = every[(policy, adaptive, threads)]
        for load in loads:
            per_seed = [results[(load, seed)] for seed in seeds]

            def mean(key):
                xs = [r[key] for r in per_seed if r[key] is not None]
                return statistics.mean(xs) if xs else None

            served_by: dict[str, int] = {}
            for r in per_seed:
                for k, n in r["served_by"].items():
                    served_by[k] = served_by.get(k, 0) + n
            rows.append({
                "load": load, "policy": policy, "adaptive": adaptive, "threads": threads,
                "variants": [v["name"] for v in served] if adaptive else [fixed["name"]],
                "requests": sum(r["requests"] for r in per_seed),
                **{k: mean(k) for k in ("deadline_miss_rate", "goodput_tokens_per_s", "goodput_span_tokens_per_s",
                                        "tokens_per_s", "ttft_p50_s",
                                        "ttft_p99_s", "latency_p99_s", "top1_agreement_served",
                                        "value_met_fraction")},
                "deadline_miss_rate_by_seed": [r["deadline_miss_rate"] for r in per_seed],
                "goodput_by_seed": [r["goodput_tokens_per_s"] for r in per_seed],
                "goodput_span_by_seed": [r["goodput_span_tokens_per_s"] for r in per_seed],
                "lost_requests": sum(r["lost_requests"] for r in per_seed),
                "lost_errors": [e for r in per_seed for e in r["lost_errors"]][:5],
                "server_errors": sum(r["server_errors"] for r in per_seed) + int(results["server_errors_metric"]),
                "late": sum(r["late"] for r in per_seed), "refused_429": sum(r["refused_429"] for r in per_seed),
                "refused_503": sum(r["refused_503"] for r in per_seed), "served_by": served_by,
                "seeds": seeds,
            })
    anchor = {}
    for load in loads:
        base = next((r for r in rows if r["load"] == load and r["policy"] == "fifo" and not r["adaptive"]
                     and r["threads"] == args.threads), None)
        if base is None:  # --policies without fifo: nothing to compare with
            continue
        for r in rows:
            if r["load"] == load and base["deadline_miss_rate"] > 0:
                r["fewer_misses_than_fifo_fixed"] = 1 - r["deadline_miss_rate"] / base["deadline_miss_rate"]
        best = next((r for r in rows if r["load"] == load and r["policy"] == "vdf" and r["adaptive"]), None)
        if best is not None:
            fewer = best.get("fewer_misses_than_fifo_fixed")
            ratio = best["goodput_tokens_per_s"] / max(base["goodput_tokens_per_s"], 1e-9)
            anchor[str(load)] = {"vdf_adaptive_fewer_misses": fewer, "goodput_ratio": ratio,
                                 "goodput_span_ratio": best["goodput_span_tokens_per_s"]
                                 / max(base["goodput_span_tokens_per_s"], 1e-9),
                                 "goal_met": fewer is not None and fewer >= 0.6 and ratio >= 1.0}
    env = environment(start=START)
    for row in rows:  # one run measures every row: each names the commit that produced it
        row["commit"], row["git_dirty"] = env.get("git_commit"), env.get("git_dirty")
    write_result(args.name, {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "what": __doc__.split("\n\n")[0],
        "variants": [{k: (str(v[k].relative_to(ROOT)) if k == "gguf" else v[k]) for k in
                      ("name", "gguf", "top1_agreement", "kl", "fidelity_source")} for v in served],
        "alone_on_q8_0": fit,
        "load_definition": "arrival rate x mean service time alone on the Q8_0 server (measured end to end: "
                           "alone_on_q8_0)",
        "workload": {"prompt_words": PROMPT_WORDS, "output_tokens": OUTPUT_TOKENS, "values": VALUES,
                     "deadline_x_alone": SLACK, "requests_per_load_and_seed": args.requests, "queue": args.queue,
                     "threads": args.threads},
        "anchor": {"edge_llm_fewer_timeouts": 0.63, "goal": "VDF + adaptive >= 60% fewer misses than FIFO on one Q8_0 "
                   "under overload, at equal or higher goodput", "measured": anchor},
        "rows": rows, "environment": env,
    })


if __name__ == "__main__":
    main()
