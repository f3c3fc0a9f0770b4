"""The scheduler's orders, its aging bound (nothing starves) and its bookkeeping (nothing is lost), on random loads."""

from __future__ import annotations

import random

import pytest

from edgestill.serve.scheduler import POLICIES, Job, QueueFull, Scheduler, best_effort_order


def _jobs():
    return [Job(arrival=0.0, predicted_s=4.0, deadline=50.0, value=1.0),   # 0: first in, late deadline, low density
            Job(arrival=1.0, predicted_s=1.0, deadline=None, value=1.0),   # 1: no deadline, density 1
            Job(arrival=2.0, predicted_s=2.0, deadline=10.0, value=8.0),   # 2: earliest deadline, density 4
            Job(arrival=3.0, predicted_s=1.0, deadline=20.0, value=2.0)]   # 3: density 2


@pytest.mark.parametrize("policy, order", [("fifo", [0, 1, 2, 3]), ("edf", [2, 3, 0, 1]), ("density", [2, 3, 1, 0]),
                                           ("vdf", [2, 3, 0, 1])])  # vdf: everyone fits, so deadline order
def test_each_policy_orders_as_defined(policy, order):
    jobs = _jobs()
    s = Scheduler(policy, capacity=8, max_wait_s=1e9)
    for j in jobs:
        s.push(j)
    assert [jobs.index(s.pop(now=3.0)) for _ in jobs] == order
    assert s.pop(now=3.0) is None


def test_vdf_sets_aside_the_lowest_value_density_only_when_not_everyone_fits():
    # from t=0: deadline order is a (due 2), b (due 3), c (due 4); a + b + c = 4.5 s, so c would end at 4.5 > 4
    a = Job(arrival=0.0, predicted_s=1.5, deadline=2.0, value=1.0)   # density 0.67
    b = Job(arrival=0.0, predicted_s=1.0, deadline=3.0, value=5.0)   # density 5
    c = Job(arrival=0.0, predicted_s=2.0, deadline=4.0, value=4.0)   # density 2
    assert best_effort_order([c, b, a], start=0.0, max_wait_s=1e9) == [b, c, a]  # a set aside: b, c both fit
    assert best_effort_order([c, b, a], start=-0.5, max_wait_s=1e9) == [a, b, c]  # half a second more: all fit
    s = Scheduler("vdf", capacity=8, max_wait_s=1e9)
    for j in (a, b, c):
        s.push(j)
    assert s.ordered(0.0) == [b, c, a] and s.pop(0.0) is b
    e = Scheduler("edf", capacity=8, max_wait_s=1e9)
    for j in (a, b, c):
        e.push(j)
    assert e.pop(0.0) is a  # EDF runs a and then misses c (1.5 + 1 + 2 > 4)


@pytest.mark.parametrize("seed", range(20))
def test_vdf_order_keeps_a_feasible_set_and_is_deadline_order_when_all_fit(seed):
    rng = random.Random(seed)
    jobs = [Job(arrival=-rng.uniform(0, 5), predicted_s=rng.uniform(0.2, 3), value=rng.choice([1, 2, 5]),
                deadline=None if rng.random() < 0.2 else rng.uniform(0.5, 15)) for _ in range(rng.randint(1, 12))]
    max_wait = 12.0
    due = {j.id: j.deadline if j.deadline is not None else j.arrival + max_wait for j in jobs}
    order = best_effort_order(jobs, 0.0, max_wait)
    assert sorted(j.id for j in order) == sorted(j.id for j in jobs)  # a permutation: nothing lost
    t, on_time = 0.0, 0
    for j in order:  # the kept prefix all meets its due times
        t += j.predicted_s
        if t > due[j.id]:
            break
        on_time += 1
    kept = order[:on_time]
    assert [j.id for j in kept] == [j.id for j in sorted(kept, key=lambda j: (due[j.id], j.arrival, j.id))]
    edf = sorted(jobs, key=lambda j: (due[j.id], j.arrival, j.id))
    t, edf_feasible = 0.0, True
    for j in edf:
        t += j.predicted_s
        edf_feasible &= t <= due[j.id]
    if edf_feasible:
        assert order == edf
    # the server drops a request it cannot serve in time even alone (drop_infeasible) before it pops: of the rest,
    # the first to run always meets its due time
    alone = [j for j in jobs if j.predicted_s <= due[j.id]]
    if alone:
        first = best_effort_order(alone, 0.0, max_wait)[0]
        assert first.predicted_s <= due[first.id]


def test_a_full_queue_refuses_with_a_retry_time():
    s = Scheduler("fifo", capacity=2)
    s.push(Job(0.0, 3.0))
    s.push(Job(0.0, 5.0))
    with pytest.raises(QueueFull) as e:
        s.push(Job(0.0, 1.0))
    assert e.value.capacity == 2 and e.value.retry_after_s == pytest.approx(4.0)


def test_hopeless_deadlines_are_dropped_and_returned():
    s = Scheduler("vdf", capacity=8)
    ok, late, none = Job(0.0, 1.0, deadline=10.0), Job(0.0, 5.0, deadline=6.0), Job(0.0, 100.0)
    for j in (ok, late, none):
        s.push(j)
    assert s.drop_infeasible(now=2.0) == [late]  # 2 + 5 > 6
    assert len(s) == 2


def test_aging_serves_the_oldest_overdue_request_first():
    s = Scheduler("vdf", capacity=8, max_wait_s=10.0)
    poor = Job(arrival=0.0, predicted_s=10.0, value=0.1)
    rich = Job(arrival=5.0, predicted_s=1.0, value=10.0)
    s.push(poor)
    s.push(rich)
    assert s.pop(now=6.0) is rich  # VDF, nobody overdue
    s.push(rich2 := Job(arrival=6.0, predicted_s=1.0, value=10.0))
    assert s.pop(now=10.5) is poor and s.pop(now=10.5) is rich2  # poor waited 10.5 s >= max_wait


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(5))
def test_random_load_loses_nothing_and_starves_no_one(policy, seed):
    """Random arrivals on one server: every job leaves exactly once (run, dropped as hopeless, or refused at a full
    queue), and no job waits longer than max_wait plus the queue's worth of service (the overdue ahead of it)."""
    rng = random.Random(seed)
    max_wait, capacity = 20.0, 10
    s = Scheduler(policy, capacity=capacity, max_wait_s=max_wait)
    clock, busy_until, pushed, left, waits, longest = 0.0, 0.0, [], [], [], 0.0
    for t in sorted(rng.uniform(0, 300) for _ in range(200)) + [1e9]:
        while True:  # the server takes jobs as it frees up, until the next arrival
            start = max(busy_until, clock)
            if start > t:
                break
            left += s.drop_infeasible(start)
            job = s.pop(start)
            if job is None:
                break
            left.append(job)
            waits.append(start - job.arrival)
            busy_until = start + job.predicted_s
        if t == 1e9:
            break
        clock = t
        service = rng.choice([0.5, 1.0, 2.0, 4.0])
        longest = max(longest, service)
        job = Job(arrival=t, predicted_s=service, value=rng.choice([0.5, 1, 4]),
                  deadline=t + rng.uniform(2, 60) if rng.random() < 0.5 else None)
        pushed.append(job)
        try:
            s.push(job)
        except QueueFull:
            left.append(job)
    left += s.drain()
    assert sorted(j.id for j in left) == sorted(j.id for j in pushed)  # each exactly once
    assert min(waits) >= 0 and max(waits) <= max_wait + (capacity + 1) * longest
    assert len(waits) > 50  # the load was served, not refused wholesale


def test_a_request_is_hopeless_only_if_even_its_fastest_variant_is_late_but_is_planned_at_its_best():
    # due in 2 s; 4 s on the best variant, 1 s on the fastest: not hopeless, and VDF plans the queue with the 4 s
    stepped = Job(arrival=0.0, predicted_s=4.0, least_s=1.0, deadline=2.0, value=1.0)
    hopeless = Job(arrival=0.0, predicted_s=4.0, least_s=3.0, deadline=2.0, value=1.0)
    s = Scheduler("vdf", capacity=8, max_wait_s=1e9)
    s.push(stepped)
    s.push(hopeless)
    assert s.drop_infeasible(now=0.0) == [hopeless] and len(s) == 1
    assert stepped.slack(0.0) == pytest.approx(1.0) and Job(0.0, 4.0, deadline=2.0).slack(0.0) == pytest.approx(-2.0)
    assert s.backlog_s() == pytest.approx(4.0)
    # VDF's plan runs each on its best variant when that ends in time, else on its fastest: stepped (1 s, stepped
    # down) then rich (3 s on its best) both fit, in deadline order
    rich = Job(arrival=0.0, predicted_s=3.0, least_s=1.0, deadline=5.5, value=9.0)
    assert stepped.service_s(0.0, 2.0) == 1.0 and rich.service_s(1.0, 5.5) == 3.0
    assert best_effort_order([rich, stepped], start=0.0, max_wait_s=1e9) == [stepped, rich]
    # one variant, 2 s whatever the start, due at 2.5: after stepped it ends at 3, so the lowest density is set aside
    fixed = Job(arrival=0.0, predicted_s=2.0, deadline=2.5, value=0.1)
    assert fixed.service_s(1.0, 2.5) == 2.0
    assert best_effort_order([rich, fixed, stepped], start=0.0, max_wait_s=1e9) == [stepped, rich, fixed]
