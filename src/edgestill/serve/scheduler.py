"""Which request runs next: FIFO, EDF or value-density-first (Edge-LLM's VDF, docs/references.md [5]), with a bounded
queue and early rejection of requests that can no longer meet their deadline.

    fifo     arrival order
    edf      earliest deadline first (requests without one after those with one, in arrival order)
    vdf      value density decides who is served when not everyone can be: the queue runs in deadline order while
             every request in it is predicted to meet its deadline; when some would miss, the requests of lowest
             value / predicted cost are set aside (deferred, not refused) until the rest all fit (Locke's best-effort
             rule, docs/references.md [locke1986]). A request without a deadline counts as due at max_wait_s.
    density  highest value / predicted cost first, always (the plain value-density order; kept as an ablation)

Why vdf is not the plain density order: measured under overload (benchmarks/serve_load.py, 35ebd0d) the plain order
missed twice as many deadlines as EDF (13% against 6.7%), because it runs a cheap request with a late deadline ahead
of a dear one that is about to expire. Deadline order is optimal while everything fits (no policy then misses
fewer); value density only matters for choosing what to give up.

Nothing waits forever: a request that has waited `max_wait_s` goes ahead of every policy's order (oldest first), so
a low-value request under VDF or a deadline-less one under EDF is served, late but served. Nothing is lost either:
every request pushed leaves the queue exactly once, popped to run or rejected with a reason (`drop_infeasible`, a
full queue at `push`, `drain` at shutdown); tests/serve/test_scheduler.py checks both properties on random loads.

The scheduler is plain Python and single-threaded: the server (serve/app.py) calls it from its event loop.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

POLICIES = ("fifo", "edf", "vdf", "density")


class QueueFull(Exception):
    """The queue holds `capacity` requests already: answer 429 with Retry-After."""

    def __init__(self, capacity: int, retry_after_s: float):
        self.capacity, self.retry_after_s = capacity, retry_after_s
        super().__init__(f"the server's queue is full ({capacity} requests waiting); retry in {retry_after_s:.0f} s")


@dataclass
class Job:
    """A request as the scheduler sees it. Times are seconds on one monotonic clock."""

    arrival: float
    predicted_s: float  # predicted service time (prefill + decode) on this server: what the queue is planned with
    deadline: float | None = None  # absolute; None: no deadline
    value: float = 1.0  # the client's priority, > 0
    payload: object = None  # what the server needs to run it
    id: int = field(default_factory=itertools.count().__next__)
    least_s: float | None = None  # the least service time it could get (its fastest variant); None: predicted_s

    def service_s(self, start: float, due: float) -> float:
        """Its time if it starts at `start`: on its best variant (`predicted_s`) when that still ends by `due`, else
        on its fastest (`least_s`), as the adaptive variant choice would run it (one variant: the same either way)."""
        if self.least_s is None or start + self.predicted_s <= due:
            return self.predicted_s
        return self.least_s

    def slack(self, now: float) -> float:
        """Seconds to spare if it started now on the fastest it could run (inf without a deadline)."""
        least = self.predicted_s if self.least_s is None else self.least_s
        return math.inf if self.deadline is None else self.deadline - now - least


def _density(job: Job) -> tuple:
    return (-job.value / max(job.predicted_s, 1e-6), job.arrival, job.id)


def _key(job: Job, policy: str) -> tuple:
    if policy == "fifo":
        return (job.arrival, job.id)
    if policy == "edf":
        return (math.inf if job.deadline is None else job.deadline, job.arrival, job.id)
    if policy == "density":
        return _density(job)
    raise ValueError(f"unknown scheduling policy '{policy}'; use one of {', '.join(POLICIES)}")


def best_effort_order(jobs, start: float, max_wait_s: float) -> list[Job]:
    """Locke's best-effort order of `jobs` for a server free at `start`: deadline order (due = deadline, or arrival +
    max_wait_s without one) over the requests that can all meet their due time together, then the ones set aside to
    make that so, by value density. Setting aside: walk the deadline order; at the first request that would finish
    late, remove the one of lowest value density among it and those before it, and walk again."""
    due = {j.id: j.deadline if j.deadline is not None else j.arrival + max_wait_s for j in jobs}
    kept = sorted(jobs, key=lambda j: (due[j.id], j.arrival, j.id))
    aside: list[Job] = []
    while True:
        t, late = start, None
        for i, job in enumerate(kept):
            t += job.service_s(t, due[job.id])
            if t > due[job.id]:
                late = i
                break
        if late is None:
            return kept + sorted(aside, key=_density)
        victim = max(kept[:late + 1], key=_density)  # the largest key: the lowest value density
        kept.remove(victim)
        aside.append(victim)


class Scheduler:
    """A bounded queue ordered by `policy`, with an aging bound `max_wait_s`."""

    def __init__(self, policy: str = "vdf", capacity: int = 32, max_wait_s: float = 30.0):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy '{policy}'; use one of {', '.join(POLICIES)}")
        if capacity < 1 or max_wait_s <= 0:
            raise ValueError("the queue needs a capacity of at least 1 and a positive max_wait_s")
        self.policy, self.capacity, self.max_wait_s = policy, capacity, max_wait_s
        self._jobs: dict[int, Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def backlog_s(self) -> float:
        """Predicted seconds of work waiting."""
        return sum(j.predicted_s for j in self._jobs.values())

    def push(self, job: Job) -> None:
        if len(self._jobs) >= self.capacity:
            raise QueueFull(self.capacity, max(1.0, self.backlog_s() / max(len(self._jobs), 1)))
        self._jobs[job.id] = job

    def pop(self, now: float) -> Job | None:
        """The next job to run (None: empty): the oldest that has waited max_wait_s, else the policy's first."""
        if not self._jobs:
            return None
        overdue = [j for j in self._jobs.values() if now - j.arrival >= self.max_wait_s]
        if overdue:
            job = min(overdue, key=lambda j: (j.arrival, j.id))
        elif self.policy == "vdf":
            job = best_effort_order(list(self._jobs.values()), now, self.max_wait_s)[0]
        else:
            job = min(self._jobs.values(), key=lambda j: _key(j, self.policy))
        del self._jobs[job.id]
        return job

    def ordered(self, now: float) -> list[Job]:
        """The waiting jobs in the order `pop` would take them if nothing else arrived (as of `now`: one that becomes
        overdue later moves up then, so this is the order a look-ahead can plan with, not a promise)."""
        overdue = sorted((j for j in self._jobs.values() if now - j.arrival >= self.max_wait_s),
                         key=lambda j: (j.arrival, j.id))
        rest = [j for j in self._jobs.values() if now - j.arrival < self.max_wait_s]
        if self.policy == "vdf":
            start = now + sum(j.predicted_s for j in overdue)
            return overdue + best_effort_order(rest, start, self.max_wait_s)
        return overdue + sorted(rest, key=lambda j: _key(j, self.policy))

    def drop_infeasible(self, now: float, free_at: float | None = None) -> list[Job]:
        """Remove and return the jobs that would miss their deadline even if they started next, as soon as the
        server is free (`free_at`: when the running job is predicted to end; None: now)."""
        start = now if free_at is None else max(now, free_at)
        late = [j for j in self._jobs.values() if j.slack(start) < 0]
        for j in late:
            del self._jobs[j.id]
        return late

    def drain(self) -> list[Job]:
        """Remove and return every waiting job (shutdown: each is answered, none dropped silently)."""
        jobs = sorted(self._jobs.values(), key=lambda j: (j.arrival, j.id))
        self._jobs.clear()
        return jobs
