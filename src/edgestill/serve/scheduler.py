"""Which request runs next: FIFO, EDF or value-density-first (Edge-LLM's VDF, docs/references.md [5]), with a bounded
queue and early rejection of requests that can no longer meet their deadline.

    fifo  arrival order
    edf   earliest deadline first (requests without one after those with one, in arrival order)
    vdf   highest value / predicted cost first (value density); cost = the request's predicted service seconds

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

POLICIES = ("fifo", "edf", "vdf")


class QueueFull(Exception):
    """The queue holds `capacity` requests already: answer 429 with Retry-After."""

    def __init__(self, capacity: int, retry_after_s: float):
        self.capacity, self.retry_after_s = capacity, retry_after_s
        super().__init__(f"the server's queue is full ({capacity} requests waiting); retry in {retry_after_s:.0f} s")


@dataclass
class Job:
    """A request as the scheduler sees it. Times are seconds on one monotonic clock."""

    arrival: float
    predicted_s: float  # predicted service time (prefill + decode) on this server
    deadline: float | None = None  # absolute; None: no deadline
    value: float = 1.0  # the client's priority, > 0
    payload: object = None  # what the server needs to run it
    id: int = field(default_factory=itertools.count().__next__)

    def slack(self, now: float) -> float:
        """Seconds to spare if it started now (inf without a deadline)."""
        return math.inf if self.deadline is None else self.deadline - now - self.predicted_s


def _key(job: Job, policy: str) -> tuple:
    if policy == "fifo":
        return (job.arrival, job.id)
    if policy == "edf":
        return (math.inf if job.deadline is None else job.deadline, job.arrival, job.id)
    if policy == "vdf":
        return (-job.value / max(job.predicted_s, 1e-6), job.arrival, job.id)
    raise ValueError(f"unknown scheduling policy '{policy}'; use one of {', '.join(POLICIES)}")


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
        job = min(overdue, key=lambda j: (j.arrival, j.id)) if overdue else min(
            self._jobs.values(), key=lambda j: _key(j, self.policy))
        del self._jobs[job.id]
        return job

    def ordered(self, now: float) -> list[Job]:
        """The waiting jobs in the order `pop` would take them if nothing else arrived (as of `now`: one that becomes
        overdue later moves up then, so this is the order a look-ahead can plan with, not a promise)."""
        overdue = sorted((j for j in self._jobs.values() if now - j.arrival >= self.max_wait_s),
                         key=lambda j: (j.arrival, j.id))
        rest = sorted((j for j in self._jobs.values() if now - j.arrival < self.max_wait_s),
                      key=lambda j: _key(j, self.policy))
        return overdue + rest

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
