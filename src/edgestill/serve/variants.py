"""Adaptive quantization in serving (Edge-LLM, docs/references.md [5]): one model loaded in several variants, e.g.
its Q8_0, Q5_K_M and Q4_K_M files, or the sliced students of a sweep, and each request served on the best variant
that the queue can afford.

    choose(job, now, queued, costs, max_wait_s)   which variant serves a request, decided when it starts
    check_memory(paths, n_ctx, budget_bytes)      do the variants fit the device's memory together

Variants are ordered best first; `order_best_first` ranks them by file size, the largest first, as the proxy for
fidelity (more bits, or more of the teacher's layers). `edgestill eval` measures what each one really keeps.

The rule `choose` applies, trying the variants best first: take the first one on which
  1. the request finishes by its deadline, and
  2. the queued requests miss no more deadlines than they would if this one ran on the fastest variant.
The queued requests are simulated in the order the scheduler will run them, each on its best variant when that
still ends by its deadline and on its fastest otherwise (Job.service_s: what this rule would then give it), with the
server's aging bound (`max_wait_s`) standing in for the deadline of a request that names none; that is the "queue
load" term. (Simulating every queued request on the fastest variant, as before 2026-12-06, assumed the queue would
run up to twice as fast as it then did, since most requests run on the best.) So an idle server serves everything on the best variant, and under load requests step down only as far
as the queue needs. When no variant meets the request's own deadline it gets the fastest (the least late).
"""

from __future__ import annotations

import math
from pathlib import Path

from edgestill.errors import EdgestillError


def _misses(queued, start: float, max_wait_s: float) -> int:
    """Queued jobs (in run order, each on its best variant when that ends in time, else on its fastest: Job.service_s)
    that would finish after their deadline, or after arrival + max_wait_s for a job without one, if the first
    started at `start`."""
    t, missed = start, 0
    for job in queued:
        due = job.deadline if job.deadline is not None else job.arrival + max_wait_s
        t += job.service_s(t, due)
        missed += t > due
    return missed


def choose(job, now: float, queued, costs: list[float], max_wait_s: float = math.inf) -> int:
    """The index of the variant (costs[i]: `job`'s predicted seconds on variant i, best variant first) to run `job`
    on, starting `now`, ahead of `queued` (the waiting jobs in run order)."""
    if not costs:
        raise ValueError("choose needs at least one variant")
    fastest = min(range(len(costs)), key=lambda i: (costs[i], i))
    floor = _misses(queued, now + costs[fastest], max_wait_s)
    for i, cost in enumerate(costs):
        end = now + cost
        if job.deadline is not None and end > job.deadline:
            continue
        if _misses(queued, end, max_wait_s) > floor:
            continue
        return i
    return fastest


def order_best_first(paths) -> list[Path]:
    """GGUF files ordered best first: the largest file first (ties by name, so the order is reproducible)."""
    return sorted((Path(p) for p in paths), key=lambda p: (-p.stat().st_size, p.name))


def check_memory(paths, n_ctx: int, budget_bytes: float, where: str) -> dict[str, dict[str, int]]:
    """Each variant's predicted memory (plan.cost.gguf_ram_bytes: mapped file, KV cache and compute buffer for
    `n_ctx`); raises when together they exceed `budget_bytes` (`where`: the budget's source, for the message)."""
    from edgestill.plan.cost import gguf_ram_bytes

    need = {str(p): gguf_ram_bytes(p, n_ctx) for p in paths}
    total = sum(n["total"] for n in need.values())
    if total > budget_bytes:
        parts = ", ".join(f"{Path(p).name} {n['total'] / 1e6:.0f} MB" for p, n in need.items())
        raise EdgestillError(f"the {len(need)} variants need {total / 1e6:.0f} MB together ({parts}, with a context of "
                             f"{n_ctx}), more than the memory budget of {budget_bytes / 1e6:.0f} MB ({where}); serve "
                             "fewer variants, lower --ctx, or raise --memory-budget")
    return need


def check_same_vocabulary(engines) -> None:
    """Variants of one model tokenize alike; refuse files that do not (they would be different models)."""
    probe = "The quick brown fox, 42 times: naïve café!"
    first = engines[0]
    ids = first.llm.tokenize(probe.encode(), add_bos=True, special=False)
    for other in engines[1:]:
        if other.llm.n_vocab() != first.llm.n_vocab() or other.llm.tokenize(probe.encode(), add_bos=True,
                                                                              special=False) != ids:
            raise EdgestillError(f"'{other.path.name}' does not share the tokenizer of '{first.path.name}' "
                                 f"({other.llm.n_vocab()} vs {first.llm.n_vocab()} tokens); variants must be the same "
                                 "model: serve them from separate servers")
