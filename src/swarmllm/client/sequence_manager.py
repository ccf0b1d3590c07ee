"""The client's view of the swarm: which servers hold which blocks, which are banned, and how to call them."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter

from swarmllm import wire
from swarmllm.client import loop
from swarmllm.client.config import ClientConfig
from swarmllm.client.routing import (
    Hop,
    MissingBlocksError,
    NoHolderError,
    Versions,
    fastest_route,
    holders,
    spread_route,
)
from swarmllm.dht.node import SwarmPeer, join
from swarmllm.dht.records import get_servers
from swarmllm.protocol import RPC_INFO, ServerRecord

logger = logging.getLogger(__name__)


class SequenceManager:
    """Keeps a fresh list of servers for one model and turns it into routes.

    Guarantee: `make_route` returns a chain covering the requested blocks with servers that are online and
    not banned, or raises `MissingBlocksError` naming the blocks that had no server for
    `missing_blocks_timeout` seconds.
    """

    def __init__(self, config: ClientConfig, model_name: str, num_blocks: int, peer: SwarmPeer | None = None):
        self.config, self.model_name, self.num_blocks = config, model_name, num_blocks
        self._own_dht = peer is None
        self.peer = peer or join(config.initial_peers, identity=config.identity, swarm_key=config.swarm_key,
                                 host_maddrs=config.host_maddrs, client_mode=config.client_mode)
        self.dht, self.membership = self.peer.dht, self.peer.membership
        self.p2p: P2P = loop.run(self.dht.replicate_p2p(), timeout=config.request_timeout)
        self._servers: list[ServerRecord] = []
        self._updated = 0.0
        self._bans: dict[str, float] = {}
        self._lock = threading.Lock()
        self.rtts: dict[str, float] = {}  # peer -> measured round trip (seconds), smoothed
        self._pinged: dict[str, float] = {}  # peer -> when it was last pinged
        self._rng = random.Random()

    def servers(self, force: bool = False) -> list[ServerRecord]:
        """Online servers of the model, after the client's allowed/blocked lists; refreshed periodically."""
        with self._lock:
            if force or time.monotonic() - self._updated > self.config.update_period:
                found = get_servers(self.dht, self.model_name)
                allowed, blocked = set(self.config.allowed_servers or ()), set(self.config.blocked_servers)
                self._servers = [
                    r for r in found if (not allowed or r.peer_id in allowed) and r.peer_id not in blocked
                ]
                self._updated = time.monotonic()
                self._ping_stale(self._servers)
            return list(self._servers)

    def _ping_stale(self, servers: list[ServerRecord]) -> None:
        """Measure round trips to servers not pinged for `ping_period`, in the background (routes use the
        latest numbers; an unmeasured server counts as DEFAULT_RTT until its ping returns)."""
        now = time.monotonic()
        stale = [r.peer_id for r in servers if now - self._pinged.get(r.peer_id, -1e9) > self.config.ping_period]
        for peer in stale:
            self._pinged[peer] = now
        if stale:
            asyncio.run_coroutine_threadsafe(self._ping_all(stale), loop.get_loop())

    async def _ping_all(self, peers: list[str]) -> None:
        await asyncio.gather(*(self._ping(p) for p in peers))

    async def _ping(self, peer_id: str) -> None:
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self.call(peer_id, RPC_INFO, runtime_pb2.ExpertRequest()), self.config.ping_timeout)
        except Exception:  # unreachable: as slow as the timeout, until the next ping says otherwise
            self.rtts[peer_id] = self.config.ping_timeout
            return
        rtt = time.perf_counter() - t0
        old = self.rtts.get(peer_id)
        self.rtts[peer_id] = rtt if old is None else 0.7 * old + 0.3 * rtt

    def ban(self, peer_id: str, reason: str) -> None:
        logger.warning("avoiding server %s for %.0fs: %s", peer_id[-8:], self.config.ban_time, reason)
        self._bans[peer_id] = time.monotonic() + self.config.ban_time

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
                if purpose == "forward":
                    return spread_route(servers, start, end, self._rng, excluded, versions)
                return fastest_route(servers, start, end, self.rtts, excluded, versions)
            except MissingBlocksError as e:
                if time.monotonic() >= deadline:
                    raise MissingBlocksError(
                        e.missing, waited=self.config.missing_blocks_timeout, version=self.config.block_override
                    ) from None
                logger.info("waiting for servers of blocks %s", e.missing)
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                force = True

    def holder(self, start: int, end: int) -> str:
        """A live, unbanned server holding all of `[start, end)`; raises NoHolderError if there is none."""
        servers = self.servers()
        found = holders(servers, start, end, self.banned(), self.versions(servers))
        if not found:
            raise NoHolderError(f"no live server holds all of blocks {start}:{end}")
        # Spread stateless calls over the holders in proportion to their throughput.
        return self._rng.choices(found, weights=[r.forward_tps or 1.0 for r in found])[0].peer_id

    async def call(self, peer_id: str, name: str, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        return await self.p2p.call_protobuf_handler(
            PeerID.from_base58(peer_id), name, self.membership.stamp(request), runtime_pb2.ExpertResponse
        )

    async def call_split(self, peer_id: str, name: str, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        """Call a handler that takes and returns messages split into parts (forward, backward)."""
        replies = await self.p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer_id), name, as_aiter(*wire.split(self.membership.stamp(request))),
            runtime_pb2.ExpertResponse
        )
        return wire.join([part async for part in replies])

    async def open_stream(self, peer_id: str, name: str, requests) -> object:
        return await self.p2p.iterate_protobuf_handler(
            PeerID.from_base58(peer_id), name, self.membership.stamp_stream(requests), runtime_pb2.ExpertResponse
        )

    def override_for(self, start: int, end: int) -> str | None:
        """The override name to send with a request for blocks [start, end): only if it touches its blocks."""
        versions = self.versions(self.servers())
        return self.config.block_override if any(b in versions for b in range(start, end)) else None

    def shutdown(self) -> None:
        if self._own_dht:
            try:
                loop.run(self.p2p.shutdown(), timeout=5)
            except Exception:  # already gone; nothing to release
                pass
            self.dht.shutdown()
