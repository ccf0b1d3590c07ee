"""Pure route choice and block selection on synthetic swarms."""

from __future__ import annotations

import random
import time

import pytest

from swarmllm.client.routing import (
    Hop,
    MissingBlocksError,
    fastest_route,
    fewest_hops,
    holders,
    missing_blocks,
    spread_route,
)
from swarmllm.protocol import ServerRecord
from swarmllm.server.block_selection import choose_span, coverage


def rec(peer: str, start: int, end: int, free: int = 100) -> ServerRecord:
    return ServerRecord(peer_id=peer, start=start, end=end, dtype="float32", cache_tokens_left=free)


def test_fewest_hops_takes_the_furthest_reaching_server() -> None:
    records = [rec("a", 0, 10), rec("b", 0, 20), rec("c", 10, 30), rec("d", 20, 30)]
    assert fewest_hops(records, 0, 30) == [Hop("b", 0, 20), Hop("d", 20, 30)]


def test_overlapping_spans_are_redundancy_not_an_error() -> None:
    records = [rec("a", 0, 15), rec("b", 10, 30), rec("c", 5, 25)]
    route = fewest_hops(records, 0, 30)
    assert [(h.start, h.end) for h in route] == [(0, 15), (15, 30)]
    assert route[0].end == route[1].start, "hops must chain without gaps or overlaps"


def test_ties_prefer_the_server_with_more_free_cache() -> None:
    records = [rec("a", 0, 4, free=10), rec("b", 0, 4, free=500)]
    assert fewest_hops(records, 0, 4) == [Hop("b", 0, 4)]


def test_excluded_servers_are_not_used() -> None:
    records = [rec("a", 0, 4), rec("b", 0, 4)]
    assert fewest_hops(records, 0, 4, exclude=frozenset({"b"}))[0].peer_id == "a"
    with pytest.raises(MissingBlocksError):
        fewest_hops(records, 0, 4, exclude=frozenset({"a", "b"}))


def test_missing_blocks_are_named_as_ranges() -> None:
    records = [rec("a", 0, 3), rec("b", 5, 7)]
    assert missing_blocks(records, 0, 10) == [3, 4, 7, 8, 9]
    with pytest.raises(MissingBlocksError, match=r"blocks 3:5, 7:10"):
        fewest_hops(records, 0, 10)


def test_sub_range_routes_clip_hops() -> None:
    assert fewest_hops([rec("a", 0, 30)], 5, 12) == [Hop("a", 5, 12)]


def test_route_on_a_swarm_of_2000_servers_is_fast() -> None:
    rng = random.Random(0)
    records = []
    for i in range(2000):
        start = rng.randrange(0, 80)
        records.append(rec(f"p{i}", start, min(80, start + rng.randrange(1, 20))))
    records.append(rec("tail", 60, 80))
    t0 = time.perf_counter()
    route = fewest_hops(records, 0, 80)
    assert time.perf_counter() - t0 < 0.5
    assert route[0].start == 0 and route[-1].end == 80
    assert all(a.end == b.start for a, b in zip(route, route[1:]))


def test_new_server_fills_the_gap_first() -> None:
    records = [rec("a", 0, 10), rec("b", 20, 30)]
    assert choose_span(records, 30, 10) == (10, 20)


def test_new_server_adds_redundancy_where_thinnest() -> None:
    records = [rec("a", 0, 30), rec("b", 0, 15)]
    assert coverage(records, 30)[:16] == [2] * 15 + [1]
    assert choose_span(records, 30, 10) == (15, 25)


def test_num_blocks_larger_than_the_model_takes_everything() -> None:
    assert choose_span([], 4, 10) == (0, 4)


def test_holders_hold_the_whole_range_most_free_cache_first() -> None:
    records = [rec("a", 0, 4, free=5), rec("b", 2, 6, free=50), rec("c", 0, 6, free=9), rec("d", 3, 6)]
    assert [r.peer_id for r in holders(records, 2, 4)] == ["b", "c", "a"]
    assert [r.peer_id for r in holders(records, 2, 4, exclude=frozenset({"b"}))] == ["c", "a"]
    assert holders(records, 0, 6, exclude=frozenset({"c"})) == []


def timed(peer: str, start: int, end: int, step_time: float = 0.01, tps: float = 0.0) -> ServerRecord:
    return ServerRecord(peer_id=peer, start=start, end=end, dtype="float32", cache_tokens_left=100,
                        step_time=step_time, forward_tps=tps)


def brute_force_cost(records, start, end, rtts):
    """Exhaustive shortest path over (position -> position) hops, for checking the linear-time pass."""
    import functools

    @functools.cache
    def best(pos):
        if pos == end:
            return 0.0
        options = []
        for r in records:
            if r.start <= pos < r.end:
                for e in range(pos + 1, min(r.end, end) + 1):
                    options.append(rtts.get(r.peer_id, 0.05) + (e - pos) * r.step_time + best(e))
        return min(options) if options else float("inf")

    return best(start)


def route_cost(route, records, rtts):
    by = {r.peer_id: r for r in records}
    return sum(rtts.get(h.peer_id, 0.05) + (h.end - h.start) * by[h.peer_id].step_time for h in route)


def test_fastest_route_is_optimal_on_random_swarms() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(3, 12)
        records = [timed(f"s{i}", s, rng.randint(s + 1, n), rng.uniform(0.001, 0.05))
                   for i, s in enumerate(rng.randint(0, n - 1) for _ in range(rng.randint(1, 8)))]
        records.append(timed("full", 0, n, 0.08))  # always coverable
        rtts = {r.peer_id: rng.uniform(0.001, 0.2) for r in records}
        route = fastest_route(records, 0, n, rtts)
        assert route[0].start == 0 and route[-1].end == n
        assert all(a.end == b.start for a, b in zip(route, route[1:]))
        assert route_cost(route, records, rtts) == pytest.approx(brute_force_cost(records, 0, n, rtts))


def test_fastest_route_prefers_the_low_latency_server() -> None:
    records = [timed("far", 0, 10), timed("near", 0, 10)]
    assert fastest_route(records, 0, 10, {"far": 0.1, "near": 0.005}) == [Hop("near", 0, 10)]
    # ...but not at any price: a much faster server that is a bit further away wins.
    records = [timed("slow", 0, 10, step_time=0.05), timed("fast", 0, 10, step_time=0.001)]
    assert fastest_route(records, 0, 10, {"slow": 0.001, "fast": 0.02})[0].peer_id == "fast"


def test_fastest_route_respects_exclusions_and_block_versions() -> None:
    records = [timed("a", 0, 4), timed("b", 0, 4, step_time=0.001)]
    assert fastest_route(records, 0, 4, {}, exclude=frozenset({"b"})) == [Hop("a", 0, 4)]
    over = ServerRecord(peer_id="o", start=0, end=4, dtype="float32", cache_tokens_left=1, step_time=0.0001,
                        override="ft", override_blocks=(2,))
    route = fastest_route([*records, over], 0, 4, {})
    assert all(h.peer_id != "o" or h.end <= 2 for h in route), "base clients never reach overridden block 2"
    route = fastest_route([*records, over], 0, 4, {}, versions={2: "ft"})
    assert any(h.peer_id == "o" and h.start <= 2 < h.end for h in route)


def test_fastest_route_on_2000_servers_is_fast() -> None:
    rng = random.Random(1)
    records = []
    for i in range(2000):
        s = rng.randint(0, 79)
        records.append(timed(f"s{i}", s, min(80, s + rng.randint(1, 20)), rng.uniform(0.001, 0.05)))
    rtts = {r.peer_id: rng.uniform(0.001, 0.3) for r in records}
    t0 = time.perf_counter()
    for _ in range(5):
        route = fastest_route(records, 0, 80, rtts)
    per_route = (time.perf_counter() - t0) / 5
    assert route[-1].end == 80
    assert per_route < 1.0, f"{per_route:.3f}s per route"  # generous: ~0.05 s on the CI machine


def test_spread_route_shares_load_in_proportion_to_throughput() -> None:
    records = [timed("big", 0, 4, tps=3000.0), timed("small", 0, 4, tps=1000.0)]
    rng = random.Random(2)
    picks = [spread_route(records, 0, 4, rng)[0].peer_id for _ in range(4000)]
    assert picks.count("big") / len(picks) == pytest.approx(0.75, abs=0.03)


def test_round_trips_drop_superseded_pings_and_do_not_average_failures() -> None:
    """A slow ping that lands after a newer one started (or after a figure was set) is dropped; failures
    are not averaged into round trips."""
    import asyncio

    from swarmllm.client.config import ClientConfig
    from swarmllm.client.sequence_manager import SequenceManager

    manager = SequenceManager.__new__(SequenceManager)  # no swarm: only the ping bookkeeping runs
    manager.config, manager.rtts, manager._pinged = ClientConfig(ping_timeout=0.05), {}, {}
    release = asyncio.Event()

    async def call(peer_id, rpc, request):
        await release.wait()

    manager.call = call

    async def scenario() -> None:
        manager._pinged["p"] = 1.0
        old = asyncio.create_task(manager._ping("p", 1.0))
        manager._pinged["p"], manager.rtts["p"] = 2.0, 0.0  # a newer figure while the first ping hangs
        await old  # times out after 0.05 s
        assert manager.rtts["p"] == 0.0
        await manager._ping("p", 2.0)  # the current ping's failure counts
        assert manager.rtts["p"] == 0.05
        release.set()
        await manager._ping("p", 2.0)  # the first answer after a failure replaces it (no averaging with it)
        assert 0.0 < manager.rtts["p"] < 0.7 * 0.05
        # A failed call counts the server as unreachable until a ping answers, and makes it due for a ping.
        manager._bans = {}
        manager.ban("p", "TimeoutError()")
        assert manager.rtts["p"] == 0.05 and "p" not in manager._pinged

    asyncio.run(scenario())
