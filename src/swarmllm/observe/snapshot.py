"""A snapshot of the swarm for people: what `swarmllm status` prints and the web monitor draws.

`collect()` reads the DHT (the model index, every model's server records, reports, adapters and points
receipts) and pings each server once; the ping's reply is the server's live record, which replaces the
DHT's (up to announce_ttl/3 old), so sessions and tokens served are current. `model_view()` turns one
model's records into coverage and gaps and is pure, so it is unit-tested on made-up records. The snapshot is a typed, versioned record, served as JSON by
`GET /api/swarm` and printed by `swarmllm status --json`, so scripts read one format.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.adapters.records import get_names
from swarmllm.client import loop
from swarmllm.dht.node import SwarmPeer
from swarmllm.dht.points import get_receipts
from swarmllm.dht.records import get_all_servers, get_models
from swarmllm.dht.reports import get_reports, reported
from swarmllm.points import Ledger
from swarmllm.protocol import RPC_INFO, Receipt, Record, ServerRecord, ServerState


class ServerView(Record):
    peer_id: str
    start: int
    end: int
    state: ServerState
    dtype: str
    quant: str
    # Decode speed one session sees through this span alone (1 / (seconds per block x blocks)), and the
    # forward/backward throughput per block; both measured by the server on its own blocks at start.
    inference_tps: float
    forward_tps: float
    rtt_ms: float | None  # round trip from the observer; None when the ping failed or was not tried
    cache_tokens_left: int
    active_sessions: int
    tokens_served: int
    uptime: float | None  # seconds online; None from servers that do not say
    adapters: tuple[str, ...]
    software_version: str
    reported: bool  # others reported it for wrong results (see dht/reports.py)


class ModelView(Record):
    name: str
    num_blocks: int
    servers: list[ServerView]
    coverage: list[int]  # per block: how many online servers hold it
    gaps: list[tuple[int, int]]  # [start, end) runs of blocks no online server holds
    complete: bool  # every block is held: clients can run the model


class AdapterView(Record):
    name: str
    model: str
    kind: str
    size: int
    publisher: str


class AccountView(Record):
    account: str
    balance: float
    served: int  # block-tokens of work it did for others
    used: int  # block-tokens of work others did for it


class SwarmSnapshot(Record):
    at: float  # wall-clock time it was taken
    models: list[ModelView]
    adapters: list[AdapterView]
    points: list[AccountView]

    def model(self, name: str) -> ModelView | None:
        return next((m for m in self.models if m.name == name), None)


def gaps_of(coverage: list[int]) -> list[tuple[int, int]]:
    """Runs of zeros in `coverage` as [start, end) pairs."""
    gaps, start = [], None
    for block, n in enumerate([*coverage, 1]):
        if n == 0 and start is None:
            start = block
        elif n > 0 and start is not None:
            gaps.append((start, block))
            start = None
    return gaps


def model_view(name: str, num_blocks: int, records: Iterable[ServerRecord], rtts: dict[str, float | None],
               offenders: frozenset[str] = frozenset(), now: float | None = None) -> ModelView:
    """One model's servers, coverage and gaps. Only ONLINE servers count as coverage: a draining or
    joining server takes no new sessions. `num_blocks` 0 (unknown) falls back to the highest span end."""
    records = sorted(records, key=lambda r: (r.start, r.end, r.peer_id))
    num_blocks = max([num_blocks, *(r.end for r in records)]) if records else num_blocks
    coverage = [0] * num_blocks
    for r in records:
        if r.state == ServerState.ONLINE:
            for b in range(r.start, min(r.end, num_blocks)):
                coverage[b] += 1
    now = time.time() if now is None else now
    servers = [
        ServerView(
            peer_id=r.peer_id, start=r.start, end=r.end, state=r.state, dtype=r.dtype, quant=r.quant,
            inference_tps=1.0 / (r.step_time * (r.end - r.start)) if r.step_time > 0 else 0.0,
            forward_tps=r.forward_tps, rtt_ms=None if (rtt := rtts.get(r.peer_id)) is None else rtt * 1e3,
            cache_tokens_left=r.cache_tokens_left, active_sessions=r.active_sessions, tokens_served=r.tokens_served,
            uptime=max(0.0, now - r.started_at) if r.started_at else None, adapters=r.adapters,
            software_version=r.software_version, reported=r.peer_id in offenders,
        )
        for r in records
    ]
    gaps = gaps_of(coverage)
    return ModelView(name=name, num_blocks=num_blocks, servers=servers, coverage=coverage, gaps=gaps,
                     complete=num_blocks > 0 and not gaps)


def accounts(receipts: list[Receipt]) -> list[AccountView]:
    """Every account's balance, work served and work used, from the valid receipts; richest first."""
    ledger = Ledger.from_receipts(receipts)
    served: dict[str, int] = {}
    used: dict[str, int] = {}
    for r in ledger.receipts():
        served[r.server] = served.get(r.server, 0) + r.total_work
        used[r.client] = used.get(r.client, 0) + r.total_work
    rows = sorted(ledger.balances().items(), key=lambda kv: -kv[1])
    return [AccountView(account=a, balance=b, served=served.get(a, 0), used=used.get(a, 0)) for a, b in rows]


async def ping_all(p2p: P2P, peer: SwarmPeer, peer_ids: Iterable[str], timeout: float
                   ) -> dict[str, tuple[float, ServerRecord | None] | None]:
    """One `info` call to each server: (round trip in seconds, the record it returned, which is live where
    the DHT's is up to announce_ttl/3 old), or None for a server that did not answer. A returned record
    that names another peer is dropped (a server speaks for itself only)."""

    async def ping(peer_id: str) -> tuple[str, tuple[float, ServerRecord | None] | None]:
        t0 = time.perf_counter()
        try:
            request = peer.membership.stamp(runtime_pb2.ExpertRequest())
            reply = await asyncio.wait_for(p2p.call_protobuf_handler(
                PeerID.from_base58(peer_id), RPC_INFO, request, runtime_pb2.ExpertResponse), timeout)
        except Exception:  # unreachable, refused or slow: shown as unknown, never as fast
            return peer_id, None
        rtt = time.perf_counter() - t0
        try:
            live, _ = wire.parse(reply, ServerRecord, peer_id)
        except Exception:  # an older or broken server: its round trip still counts
            return peer_id, (rtt, None)
        return peer_id, (rtt, live if live.peer_id == peer_id else None)

    return dict(await asyncio.gather(*(ping(p) for p in set(peer_ids))))


def _live(records: list[ServerRecord], pings: dict) -> list[ServerRecord]:
    """Each record replaced by the one its server just returned, if that covers the same span (a server
    that just moved is shown where the DHT has it until its next announcement)."""
    out = []
    for r in records:
        live = (pings.get(r.peer_id) or (None, None))[1]
        out.append(live if live is not None and (live.start, live.end) == (r.start, r.end) else r)
    return out


def collect(peer: SwarmPeer, p2p: P2P | None = None, models: Iterable[str] | None = None,
            ping_timeout: float = 2.0) -> SwarmSnapshot:
    """Read the whole swarm (blocking: the DHT calls wait). `models`: names to show even if the index does
    not list them (e.g. the model an API serves, while all its servers are down). Pings need `p2p`, the
    peer's libp2p handle, and run on the client's I/O loop."""
    dht = peer.dht
    known = get_models(dht)
    for name in models or ():
        known.setdefault(name, 0)
    records = {name: get_all_servers(dht, name) for name in sorted(known)}
    rtts: dict[str, float | None] = {}
    if p2p is not None:
        ids = [r.peer_id for rs in records.values() for r in rs if r.state != ServerState.OFFLINE]
        pings = loop.run(ping_all(p2p, peer, ids, ping_timeout), timeout=ping_timeout + 5)
        rtts = {p: None if ping is None else ping[0] for p, ping in pings.items()}
        records = {name: _live(rs, pings) for name, rs in records.items()}
    views = [model_view(name, known[name], rs, rtts, reported(get_reports(dht, name), 1)) for name, rs in records.items()]
    adapters = [AdapterView(name=a.name, model=a.model, kind=a.kind, size=a.size, publisher=a.publisher)
                for a in sorted(get_names(dht).values(), key=lambda a: a.name)]
    return SwarmSnapshot(at=time.time(), models=views, adapters=adapters, points=accounts(get_receipts(dht)))
