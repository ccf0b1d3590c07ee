"""The swarm snapshot for people, on made-up server records: coverage counts only servers that take new
sessions, gaps are exact [start, end) runs, speeds and round trips are in the units shown, and
`swarmllm status` prints the coverage bar, the gaps and one row per server."""

from __future__ import annotations

import pytest

from swarmllm.cli.status import render
from swarmllm.observe.snapshot import SwarmSnapshot, _live, accounts, gaps_of, model_view
from swarmllm.protocol import ServerRecord, ServerState

NOW = 1_700_000_000.0


def _server(peer_id: str, start: int, end: int, state: ServerState = ServerState.ONLINE, **kw) -> ServerRecord:
    return ServerRecord(peer_id=peer_id, start=start, end=end, dtype="float32", state=state,
                        cache_tokens_left=kw.pop("cache_tokens_left", 1000), **kw)


@pytest.mark.parametrize(("coverage", "gaps"), [
    ([], []),
    ([1, 2, 1], []),
    ([0, 0, 1, 1], [(0, 2)]),
    ([1, 1, 0], [(2, 3)]),
    ([1, 0, 0, 2, 0, 1], [(1, 3), (4, 5)]),
    ([0, 0, 0], [(0, 3)]),
])
def test_gaps_are_the_runs_of_zeros(coverage: list[int], gaps: list[tuple[int, int]]) -> None:
    assert gaps_of(coverage) == gaps


@pytest.fixture
def view():
    """8 blocks: A 0:4 and B 2:6 online; C 5:8 draining (alone on 6:8); D 0:2 joining."""
    records = [
        _server("C", 5, 8, ServerState.DRAINING),
        _server("B", 2, 6, step_time=0.01, forward_tps=1234.0, active_sessions=2, tokens_served=5000,
                started_at=NOW - 7200),
        _server("D", 0, 2, ServerState.JOINING),
        _server("A", 0, 4, step_time=0.005, started_at=NOW - 30),
    ]
    return model_view("m", 8, records, {"A": 0.0123, "B": None}, offenders=frozenset({"B"}), now=NOW)


def test_only_online_servers_cover_blocks(view) -> None:
    assert view.coverage == [1, 1, 2, 2, 1, 1, 0, 0]
    # Block 5 is also held by draining C but B covers it; 6:8 only C holds, so they are a gap.
    assert view.gaps == [(6, 8)] and not view.complete
    assert [s.peer_id for s in view.servers] == ["D", "A", "B", "C"]  # ordered by (start, end)


def test_server_rows_carry_speed_round_trip_and_reports(view) -> None:
    d, a, b, c = view.servers
    assert a.inference_tps == pytest.approx(1 / (0.005 * 4))  # 50 tokens/s through 4 blocks
    assert b.inference_tps == pytest.approx(1 / (0.01 * 4)) and b.forward_tps == 1234.0
    assert c.inference_tps == 0.0  # step time not measured
    assert a.rtt_ms == pytest.approx(12.3)
    assert b.rtt_ms is None and c.rtt_ms is None  # failed ping, and not pinged
    assert b.reported and not (a.reported or c.reported or d.reported)
    assert a.uptime == pytest.approx(30) and b.uptime == pytest.approx(7200) and c.uptime is None
    assert (b.active_sessions, b.tokens_served, b.state) == (2, 5000, ServerState.ONLINE)


def test_all_blocks_held_is_complete() -> None:
    view = model_view("m", 6, [_server("A", 0, 3), _server("B", 3, 6), _server("C", 0, 6, ServerState.DRAINING)], {})
    assert view.coverage == [1] * 6 and view.gaps == [] and view.complete


@pytest.mark.parametrize(("num_blocks", "spans", "expected_blocks", "gaps"), [
    (0, [(2, 5), (0, 2)], 5, []),  # unknown size: the highest end
    (0, [(1, 4)], 4, [(0, 1)]),
    (10, [(0, 8)], 10, [(8, 10)]),  # known size: the missing tail shows
    (4, [(0, 6)], 6, []),  # a record past the announced size widens the view
    (3, [], 3, [(0, 3)]),  # no servers at all
])
def test_the_number_of_blocks(num_blocks, spans, expected_blocks, gaps) -> None:
    records = [_server(f"S{i}", a, b) for i, (a, b) in enumerate(spans)]
    view = model_view("m", num_blocks, records, {})
    assert view.num_blocks == expected_blocks == len(view.coverage)
    assert view.gaps == gaps and view.complete == (not gaps)


def test_nothing_known_is_not_complete() -> None:
    view = model_view("m", 0, [], {})
    assert view.coverage == [] and view.gaps == [] and not view.complete


def test_no_receipts_no_accounts() -> None:
    assert accounts([]) == []


def _snapshot(*views) -> SwarmSnapshot:
    return SwarmSnapshot(at=NOW, models=list(views), adapters=[], points=[])


def _rows(text: str, peer_id: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip().startswith(peer_id + " ")]


def test_render_shows_gaps_the_bar_and_each_server(view) -> None:
    text = render(_snapshot(view))
    assert "1 model(s), 4 server(s)" in text
    assert "m: 6/8 blocks covered; NO SERVER for blocks 6:8" in text
    assert "coverage |112211!!|" in text
    for peer_id, span, state in [("A", "0:4", "online"), ("B", "2:6", "online"), ("C", "5:8", "draining"),
                                 ("D", "0:2", "joining")]:
        [row] = _rows(text, peer_id)
        assert span in row and state in row
    [b] = _rows(text, "B")
    assert b.endswith("REPORTED") and " 25.0 " in b and "2h" in b
    [a] = _rows(text, "A")
    assert "12.3" in a and "30s" in a and "REPORTED" not in a


def test_render_a_complete_model_and_several_gaps() -> None:
    full = model_view("full", 3, [_server("A", 0, 3)] + [_server(f"R{i}", 1, 2) for i in range(10)], {})
    holes = model_view("holes", 6, [_server("A", 1, 2), _server("B", 4, 5)], {})
    text = render(_snapshot(full, holes))
    assert "full: all 3 blocks covered" in text
    assert "coverage |191|" in text  # 11 servers on block 1 show as 9
    assert "holes: 2/6 blocks covered; NO SERVER for blocks 0:1, 2:4, 5:6" in text
    assert "coverage |!1!!1!|" in text
    assert len(_rows(text, "R0")) == 1 and "2 model(s), 13 server(s)" in text


def test_render_an_empty_swarm() -> None:
    text = render(_snapshot())
    assert "0 model(s), 0 server(s)" in text and "no server has announced a model (yet)" in text


def test_render_a_model_nobody_serves_yet() -> None:
    # `collect(models=[...])` shows the API's model even before any server announced it: 0 blocks known.
    text = render(_snapshot(model_view("smol", 0, [], {})))
    assert "smol: no server holds any block (the number of blocks is unknown)" in text
    assert "NO SERVER for blocks" not in text and "coverage ||" in text


def test_live_records_from_pings_replace_the_dhts_for_the_same_span() -> None:
    dht = [_server("a", 0, 10, active_sessions=0), _server("b", 10, 20, active_sessions=0),
           _server("c", 20, 30, active_sessions=0), _server("d", 0, 30, active_sessions=0)]
    pings = {
        "a": (0.001, _server("a", 0, 10, active_sessions=3)),  # live: replaces
        "b": (0.001, _server("b", 5, 15, active_sessions=2)),  # moved since it announced: the DHT's stays
        "c": None,  # did not answer
        "d": (0.001, None),  # answered with no readable record
    }
    assert [r.active_sessions for r in _live(dht, pings)] == [3, 0, 0, 0]
    assert [(r.start, r.end) for r in _live(dht, pings)] == [(0, 10), (10, 20), (20, 30), (0, 30)]
