"""Priority by contribution points: the pure policy, then a real scheduler whose compute thread is held busy
so that tasks of a contributor and of a free rider queue up behind it."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

from swarmllm.models.span import span_from_model
from swarmllm.points.priority import PriorityPolicy
from swarmllm.server.scheduler import Scheduler
from tests.unit.test_batching import _args, _Sequence, _session
from tests.unit.test_span_exact import _model

BALANCES = {"rich": 100.0, "modest": 5.0, "new": 0.0, "debtor": -50.0}


def _drain(policy: PriorityPolicy, queue: list[str]) -> list[str]:
    order = []
    while queue:
        order.append(queue.pop(policy.pick(queue)))
    return order


def test_higher_balance_first_and_arrival_order_within_a_balance() -> None:
    policy = PriorityPolicy(BALANCES.__getitem__, newcomer_share=0.0)
    queue = ["modest", "rich", "modest", "rich"]
    assert policy.pick(queue) == 1
    assert _drain(policy, queue) == ["rich", "rich", "modest", "modest"]
    # Nobody has points: plain FIFO.
    assert _drain(PriorityPolicy(lambda peer: 0.0), ["a", "b", "a", "c"]) == ["a", "b", "a", "c"]
    # Only newcomers and debtors: the share has nobody to protect them from, and balance still orders them.
    assert _drain(PriorityPolicy(BALANCES.__getitem__), ["debtor", "new"]) == ["new", "debtor"]


def test_newcomers_get_their_share_exactly_and_never_starve() -> None:
    policy = PriorityPolicy(BALANCES.__getitem__, newcomer_share=0.2)
    assert policy.max_wait == 5
    # A stream of contributor tasks that never ends: the free riders' tasks still run, one every 5 picks.
    queue, newcomer_runs = ["debtor", "new", "debtor"], []
    for n in range(1, 1001):
        queue += ["rich", "modest"]
        peer = queue.pop(policy.pick(queue))
        if peer in ("debtor", "new"):
            newcomer_runs.append((n, peer))
            if len(newcomer_runs) < 3:
                queue.append("new")  # keep one newcomer task waiting for a while
    assert newcomer_runs[:3] == [(5, "debtor"), (10, "new"), (15, "debtor")], "oldest newcomer task first"
    assert all(b - a <= policy.max_wait for (a, _), (b, _) in zip(newcomer_runs, newcomer_runs[1:]))
    assert len(newcomer_runs) == 5  # every newcomer task ran, each within 5 picks of the previous one


def test_the_share_is_at_least_its_fraction_of_contended_picks() -> None:
    for share in (0.1, 0.2, 1 / 3, 0.5, 1.0):
        policy = PriorityPolicy(BALANCES.__getitem__, newcomer_share=share)
        queue = ["rich"] * 1000 + ["new"] * 1000
        picks = [queue.pop(policy.pick(queue)) for _ in range(600)]
        assert picks.count("new") == math.floor(600 * share + 1e-9), share
    assert PriorityPolicy(BALANCES.__getitem__, newcomer_share=0.0).max_wait == math.inf
    with pytest.raises(ValueError):
        PriorityPolicy(BALANCES.__getitem__, newcomer_share=1.5)
    with pytest.raises(ValueError):
        PriorityPolicy(BALANCES.__getitem__).pick([])


def test_a_broken_balance_never_picks_outside_the_queue() -> None:
    policy = PriorityPolicy(lambda peer: {"a": math.nan, "b": -math.inf}[peer])
    assert policy.pick(["b", "a"]) == 1  # nan counts as 0, above -inf
    assert policy.pick(["b"]) == 0


def test_picking_among_thousands_of_tasks_looks_up_each_peer_once() -> None:
    """A pick costs one pass over the queue plus one balance lookup per distinct peer (the lookup is the
    expensive part: a ledger read), never one per task. Counted, not timed: a timed bound fails on a busy
    machine."""
    balances = {f"peer{i}": float(i % 7 - 2) for i in range(500)}
    lookups: list[str] = []

    def balance(peer: str) -> float:
        lookups.append(peer)
        return balances[peer]

    policy = PriorityPolicy(balance)
    queue = [f"peer{(i * 37) % 500}" for i in range(10_000)]
    for _ in range(200):
        waiting = len(set(queue))
        before = len(lookups)
        queue.pop(policy.pick(queue))
        assert len(lookups) - before == waiting
    assert policy.newcomer_picks == 40


def _busy_scheduler(balance, share: float = 0.2):
    """A scheduler whose compute thread is held by a first task until the returned event is set."""
    scheduler = Scheduler(balance=balance, newcomer_share=share)
    started, release = threading.Event(), threading.Event()
    scheduler.call(lambda: (started.set(), release.wait(10)))
    assert started.wait(10)
    return scheduler, release


def test_the_scheduler_runs_a_contributors_tasks_first_and_still_serves_the_free_rider() -> None:
    order: list[str] = []
    scheduler, release = _busy_scheduler(BALANCES.__getitem__)
    try:
        futures = [scheduler.call(order.append, f"new{i}", peer="new") for i in range(5)]
        futures += [scheduler.call(order.append, f"rich{i}", peer="rich") for i in range(5)]
        release.set()
        for f in futures:
            f.result(10)
    finally:
        release.set()
        scheduler.shutdown()
    # 1 pick in 5 goes to the free rider while the contributor waits; then the free rider has the thread.
    assert order == ["rich0", "rich1", "rich2", "rich3", "new0", "rich4", "new1", "new2", "new3", "new4"]


def test_without_balances_the_scheduler_stays_fifo() -> None:
    order: list[str] = []
    scheduler, release = _busy_scheduler(None)
    try:
        futures = [
            scheduler.call(order.append, f"{peer}{i}", peer=peer)
            for i in range(3)
            for peer in ("new", "rich")
        ]
        release.set()
        for f in futures:
            f.result(10)
    finally:
        release.set()
        scheduler.shutdown()
    assert order == ["new0", "rich0", "new1", "rich1", "new2", "rich2"]
    assert scheduler.policy is None


def test_a_failing_balance_lookup_falls_back_to_fifo() -> None:
    def balance(peer: str) -> float:
        raise KeyError(peer)

    order: list[str] = []
    scheduler, release = _busy_scheduler(balance)
    try:
        futures = [scheduler.call(order.append, peer, peer=peer) for peer in ("new", "rich")]
        release.set()
        for f in futures:
            f.result(10)
    finally:
        release.set()
        scheduler.shutdown()
    assert order == ["new", "rich"]


def test_a_free_riders_step_still_joins_the_contributors_batch() -> None:
    model = _model("llama")
    span = span_from_model(model, 0, model.config.num_hidden_layers)
    seqs = [_Sequence(model, 4, 0, s) for s in (1, 2, 3)]
    scheduler, release = _busy_scheduler(BALANCES.__getitem__)

    async def main():
        sessions = [_session(span) for _ in seqs]
        peers = ["new", "rich", "new"]
        tasks = [
            asyncio.create_task(scheduler.step(s, *_args(q.step(s, 0, 4)), peer=p))
            for s, q, p in zip(sessions, seqs, peers)
        ]
        await asyncio.sleep(0.05)  # all three are queued behind the busy thread
        release.set()
        return await asyncio.gather(*tasks)

    try:
        outs = asyncio.run(main())
    finally:
        release.set()
        scheduler.shutdown()
    assert scheduler.passes_run == 1, (
        "the contributor's step leads, the free riders' compatible steps join it"
    )
    for i, (seq, out) in enumerate(zip(seqs, outs)):
        seq.check(out, 0, 4, f"session {i}")
