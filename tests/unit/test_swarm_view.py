"""The client's view of the swarm: reading never waits for the DHT once a snapshot exists."""

from __future__ import annotations

import threading

import pytest

from swarmllm.client.swarm_view import SwarmView
from swarmllm.protocol import ServerRecord


def _record(peer: str) -> ServerRecord:
    return ServerRecord(peer_id=peer, start=0, end=4, dtype="float32", cache_tokens_left=10)


class _SlowDht:
    """A DHT whose reads after the first wait until the test lets them finish."""

    def __init__(self) -> None:
        self.answers = [[_record("a")], [_record("b")]]
        self.release = threading.Event()
        self.started = threading.Event()

    def read(self) -> list[ServerRecord]:
        answer = self.answers.pop(0)
        if answer[0].peer_id != "a":
            self.started.set()
            assert self.release.wait(30)
        return answer


@pytest.mark.timeout(60)
def test_a_stale_view_is_read_at_once_and_refreshed_in_the_background() -> None:
    dht = _SlowDht()
    view = SwarmView(dht.read, period=0.0)  # every read after the first finds the snapshot stale
    assert [r.peer_id for r in view.get()] == ["a"]  # the first read waits for the DHT
    # The DHT is slow now: the stale snapshot comes back at once (this thread would hang here otherwise),
    # and a background read starts.
    assert [r.peer_id for r in view.get()] == ["a"]
    assert dht.started.wait(30)
    assert [r.peer_id for r in view.get()] == ["a"] and view.reads == 1  # still reading: one background read
    dht.release.set()
    view.wait_idle(30)
    assert view.reads == 2 and [r.peer_id for r in view.get()] == ["b"]


def test_a_forced_read_waits_for_the_dht_and_a_failed_refresh_keeps_the_snapshot() -> None:
    answers = [[_record("a")], RuntimeError("DHT down"), [_record("c")]]

    def read() -> list[ServerRecord]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    view = SwarmView(read, period=0.0)
    assert [r.peer_id for r in view.get()] == ["a"]
    assert [r.peer_id for r in view.get()] == ["a"]  # the background read fails...
    view.wait_idle(30)
    assert [r.peer_id for r in view.get(force=True)] == ["c"]  # ...and a forced one sees the DHT's answer
