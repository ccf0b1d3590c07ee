"""The client's view of the swarm: which servers hold which blocks, which are banned, and how to call them."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import AsyncGenerator, Sequence

from hivemind.proto import runtime_pb2

from swarmllm.client import loop
from swarmllm.client.config import ClientConfig
from swarmllm.client.points import ClientPoints
from swarmllm.client.routing import (
    Hop,
    MissingBlocksError,
    NoHolderError,
    Versions,
    fastest_route,
    holders,
    spread_route,
)
from swarmllm.client.transport import DhtDirectory, Directory, HivemindTransport, Transport
from swarmllm.client.verification import comparable
from swarmllm.dht.node import SwarmPeer, join_as
from swarmllm.dht.reports import reported
from swarmllm.protocol import RPC_INFO, PeerIdStr, Report, ServerRecord
from swarmllm.trust.identity import Identity

logger = logging.getLogger(__name__)


class SequenceManager:
    """Keeps a fresh list of servers for one model and turns it into routes.

    Guarantee: `make_route` returns a chain covering the requested blocks with servers that are online and
    not banned, or raises `MissingBlocksError` naming the blocks that had no server for
    `missing_blocks_timeout` seconds.
    """

    def __init__(self, config: ClientConfig, model_name: str, num_blocks: int, transport: Transport,
                 directory: Directory, identity: Identity):
        """Over any transport and directory (`join` makes the hivemind ones; `swarmllm.loopback` in-process
        ones). `identity` is who this client is to servers; its points account is `config.account` if set."""
        self.config, self.model_name, self.num_blocks = config, model_name, num_blocks
        self.transport, self.directory, self.peer_id = transport, directory, identity.peer_id
        account = Identity.load_or_create(config.account) if config.account else identity
        self.points = ClientPoints(account, self.peer_id, self._call_unbound)
        self._settler = asyncio.run_coroutine_threadsafe(self._settle_loop(), loop.get_loop())
        self._servers: list[ServerRecord] = []
        self._updated = 0.0
        self._bans: dict[str, float] = {}
        self._lock = threading.Lock()
        self.rtts: dict[str, float] = {}  # peer -> measured round trip (seconds), smoothed
        self._pinged: dict[str, float] = {}  # peer -> when it was last pinged
        self._rng = random.Random()
        self.reported: frozenset[str] = frozenset()  # servers others reported for wrong results (see dht/reports.py)
        self.verify_rng = random.Random()  # which calls are verified (ClientConfig.verify)

    @classmethod
    def join(cls, config: ClientConfig, model_name: str, num_blocks: int, peer: SwarmPeer | None = None) -> SequenceManager:
        """A manager on hivemind: over `peer`'s DHT, or a DHT node of its own (joined from the config's
        initial peers), stopped by `shutdown`."""
        own = peer is None
        peer = peer or join_as(config, client_mode=config.client_mode)
        try:
            p2p = loop.run(peer.dht.replicate_p2p(), timeout=config.request_timeout)
        except BaseException:
            if own:
                peer.dht.shutdown()
            raise
        return cls(config, model_name, num_blocks, HivemindTransport(p2p, peer, owns_p2p=own),
                   DhtDirectory(peer.dht, owns_dht=own), peer.identity)

    def servers(self, force: bool = False) -> list[ServerRecord]:
        """Online servers of the model, after the client's allowed/blocked lists; refreshed periodically."""
        with self._lock:
            if force or time.monotonic() - self._updated > self.config.update_period:
                found = self.directory.servers(self.model_name)
                allowed, blocked = set(self.config.allowed_servers or ()), set(self.config.blocked_servers)
                self._servers = [
                    r for r in found if (not allowed or r.peer_id in allowed) and r.peer_id not in blocked
                ]
                if self.config.trust_reports > 0:
                    self.reported = reported(self.directory.reports(self.model_name), self.config.trust_reports)
                self._updated = time.monotonic()
                self._ping_stale(self._servers)
            return list(self._servers)

    def snapshot(self) -> list[ServerRecord]:
        """The servers as last read, without reading the directory. Code on the shared I/O loop (opening a
        checker, a session's extras) uses this: a DHT read there would stall every session on the loop until
        the DHT answered. The routes those coroutines serve were made from a read moments before, by
        `make_route`, off the loop; only before any read at all does this read. (No lock: a read in
        progress replaces the list whole.)"""
        return list(self._servers) if self._updated else self.servers()

    def _ping_stale(self, servers: list[ServerRecord]) -> None:
        """Measure round trips to servers not pinged for `ping_period`, in the background (routes use the
        latest numbers; an unmeasured server counts as DEFAULT_RTT until its ping returns)."""
        now = time.monotonic()
        stale = [r.peer_id for r in servers if now - self._pinged.get(r.peer_id, -1e9) > self.config.ping_period]
        for peer in stale:
            self._pinged[peer] = now
        if stale:
            asyncio.run_coroutine_threadsafe(self._ping_all(stale, now), loop.get_loop())

    async def _ping_all(self, peers: Sequence[str], started: float) -> None:
        await asyncio.gather(*(self._ping(p, started) for p in peers))

    async def _ping(self, peer_id: str, started: float) -> None:
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self.call(peer_id, RPC_INFO, runtime_pb2.ExpertRequest()), self.config.ping_timeout)
            failed = False
        except Exception:
            failed = True
        # A newer ping (or a newer figure) for this peer supersedes this one: a slow answer must not overwrite it.
        if self._pinged.get(peer_id) != started:
            return
        if failed:  # unreachable: as slow as the timeout, until the next ping says otherwise
            self.rtts[peer_id] = self.config.ping_timeout
            return
        rtt = time.perf_counter() - t0
        old = self.rtts.get(peer_id)
        # A failure is not a measurement: the first answer after one replaces it instead of averaging with it.
        fresh = old is None or old >= self.config.ping_timeout
        self.rtts[peer_id] = rtt if old is None or fresh else 0.7 * old + 0.3 * rtt

    def ban(self, peer_id: str, reason: str, duration: float | None = None) -> None:
        duration = self.config.ban_time if duration is None else duration
        logger.warning("avoiding server %s for %.0fs: %s", peer_id[-8:], duration, reason)
        self._bans[peer_id] = max(self._bans.get(peer_id, 0.0), time.monotonic() + duration)
        # Its last good round trip no longer says anything: count it as unreachable until a ping answers (the
        # next refresh pings it), so that once the ban ends, routes do not go back to a dead server that an
        # equally fast live one could replace.
        self.rtts[peer_id] = self.config.ping_timeout
        self._pinged.pop(peer_id, None)

    def report(self, offender: str, start: int, end: int, error: float, tolerance: float) -> None:
        """Avoid a server caught returning wrong results, and tell the swarm with a signed report."""
        self.ban(offender, f"its outputs for blocks {start}:{end} were wrong (relative error {error:.3g} > "
                           f"{tolerance:g}, confirmed by a third server)", self.config.offender_ban_time)
        report = Report(reporter=PeerIdStr(self.peer_id), offender=PeerIdStr(offender), start=start, end=end,
                        error=min(error, 1e30), tolerance=tolerance, at=time.time())
        self.directory.publish_report(self.model_name, report, ttl=self.config.offender_ban_time)

    def banned(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(p for p, until in self._bans.items() if until > now)

    def versions(self, servers: list[ServerRecord]) -> Versions:
        """Block -> override name for the override this client asked for; its block list comes from the
        records of the servers that run it (each announces the whole list)."""
        name = self.config.block_override
        if name is None:
            return {}
        for r in servers:
            if r.override == name:
                return dict.fromkeys(r.override_blocks, name)
        # No server runs it (yet): every block is wanted in a version nobody has, so routing waits for it.
        return dict.fromkeys(range(self.num_blocks), name)

    def make_route(
        self, start: int = 0, end: int | None = None, exclude: frozenset[str] = frozenset(),
        purpose: str = "inference",
    ) -> list[Hop]:
        """A route over blocks [start, end): the fastest expected inference step (`purpose="inference"`), or
        one that spreads forward/backward batches over servers by throughput (`"forward"`). `exclude`:
        servers to skip for this route only (e.g. ones that just said their cache is full)."""
        end = self.num_blocks if end is None else end
        deadline = time.monotonic() + (0 if exclude else self.config.missing_blocks_timeout)
        force = False
        while True:
            try:
                servers = self.servers(force=force)
                excluded, versions = self.banned() | exclude, self.versions(servers)
                try:  # reported servers only while nobody else holds their blocks
                    return self._route(purpose, servers, start, end, frozenset(excluded | self.reported), versions)
                except MissingBlocksError:
                    if not self.reported:
                        raise
                return self._route(purpose, servers, start, end, frozenset(excluded), versions)
            except MissingBlocksError as e:
                if time.monotonic() >= deadline:
                    raise MissingBlocksError(
                        e.missing, waited=self.config.missing_blocks_timeout, version=self.config.block_override
                    ) from None
                logger.info("waiting for servers of blocks %s", e.missing)
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                force = True

    def holder(self, start: int, end: int, prefer_not: frozenset[str] = frozenset()) -> str:
        """A live, unbanned server holding all of `[start, end)`; raises NoHolderError if there is none.
        Reported servers, then those in `prefer_not` (they refused this call for now), are the last resort."""
        servers = self.servers()
        banned, versions = self.banned(), self.versions(servers)
        for avoid in (banned | self.reported | prefer_not, banned | self.reported, banned):
            if found := holders(servers, start, end, avoid, versions):
                break
        else:
            raise NoHolderError(f"no live server holds all of blocks {start}:{end}")
        # Spread stateless calls over the holders in proportion to their throughput.
        return self._rng.choices(found, weights=[r.forward_tps or 1.0 for r in found])[0].peer_id

    async def _settle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.settle_period)
            await self.points.settle_all()

    async def _call_unbound(self, peer_id: str, name: str, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        return await asyncio.wait_for(self.transport.call(peer_id, name, request), self.config.request_timeout)

    def _route(self, purpose: str, servers: list[ServerRecord], start: int, end: int, avoid: frozenset[str],
               versions: Versions) -> list[Hop]:
        if purpose == "forward":  # batches: spread over servers by throughput
            return spread_route(servers, start, end, self._rng, avoid, versions)
        return fastest_route(servers, start, end, self.rtts, avoid, versions)  # sessions: the fastest chain

    def checkers(self, primary: str, start: int, end: int) -> list[str]:
        """Other servers that hold all of `[start, end)` like `primary` does (same dtype, quantization and
        block version), nearest first: who can check its results (see client/verification.py)."""
        servers: dict[str, ServerRecord] = {r.peer_id: r for r in self.snapshot()}  # (called on the I/O loop)
        first = servers.get(primary)
        avoid = self.banned() | self.reported | {primary}
        found = [r for r in servers.values() if r.peer_id not in avoid and r.start <= start and end <= r.end
                 and (first is None or comparable(r, first))]
        return [r.peer_id for r in sorted(found, key=lambda r: self.rtts.get(r.peer_id, 0.05))]

    # Calls are bound to this client's points account first (see client/points.py), then carried as they are.

    async def call(self, peer_id: str, name: str, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        await self.points.bind(peer_id)
        return await self.transport.call(peer_id, name, request)

    async def call_split(self, peer_id: str, name: str, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        """Call a handler that takes and returns messages split into parts (forward, backward)."""
        await self.points.bind(peer_id)
        return await self.transport.call_split(peer_id, name, request)

    async def open_stream(self, peer_id: str, name: str, requests) -> AsyncGenerator[runtime_pb2.ExpertResponse, None]:
        await self.points.bind(peer_id)
        return await self.transport.open_stream(peer_id, name, requests)

    def override_for(self, start: int, end: int) -> str | None:
        """The override name to send with a request for blocks [start, end): only if it touches its blocks."""
        versions = self.versions(self.snapshot())  # (called on the I/O loop, as a session opens)
        return self.config.block_override if any(b in versions for b in range(start, end)) else None

    def shutdown(self) -> None:
        self._settler.cancel()
        try:  # countersign what is due, so the servers that worked for us get their points
            loop.run(self.points.settle_all(final=True), timeout=10)
        except Exception:
            logger.debug("final settlement failed", exc_info=True)
        try:
            loop.run(self.transport.close(), timeout=5)
        except Exception:  # already gone; nothing to release
            pass
        self.directory.close()
