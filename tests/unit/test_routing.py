"""Pure route choice and block selection on synthetic swarms."""

from __future__ import annotations

import random
import time

import pytest

from swarmllm.client.routing import Hop, MissingBlocksError, fewest_hops, holders, missing_blocks
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
