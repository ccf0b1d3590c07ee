"""The client's two seams to the swarm: a `Transport` that carries RPCs to a server, and a `Directory` that
says which servers exist and who reported whom.

`SequenceManager` talks to the swarm only through these. The hivemind implementations here are what real
clients use (libp2p streams, the DHT); `swarmllm.loopback` implements both in-process, over real server
handlers, so that sessions, failover and verification can be tested in milliseconds without processes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol, TypeAlias

from hivemind import DHT
from hivemind.p2p import P2P, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter

from swarmllm import wire
from swarmllm.dht.node import SwarmPeer
from swarmllm.dht.records import get_servers
from swarmllm.dht.reports import get_reports, publish_report
from swarmllm.protocol import Report, ServerRecord
from swarmllm.trust.membership import Membership

logger = logging.getLogger(__name__)

Request: TypeAlias = runtime_pb2.ExpertRequest
Reply: TypeAlias = runtime_pb2.ExpertResponse

# Seconds a closing stream waits for its last requests and END_OF_STREAM to be written to the local daemon.
CLOSE_FLUSH = 1.0


class Transport(Protocol):
    """Carries requests to servers by peer id. Errors surface as exceptions: a server's typed refusal arrives
    as a reply (parsed by `wire`), while an unreachable or crashed server raises (hivemind's errors,
    ConnectionError, or a closed reply stream)."""

    async def call(self, peer_id: str, name: str, request: Request) -> Reply:
        """One request, one reply."""
        ...

    async def call_split(self, peer_id: str, name: str, request: Request) -> Reply:
        """A handler that takes and returns messages split into parts (forward, backward): `request` is split
        on the way out and the reply joined on the way in."""
        ...

    async def open_stream(self, peer_id: str, name: str, requests: AsyncIterator[Request]) -> AsyncGenerator[Reply, None]:
        """A long-lived stream (inference sessions): requests are read from `requests` as they come."""
        ...

    async def close(self) -> None:
        """Release what this transport holds (for hivemind, the client's own p2p daemon, if it owns one)."""
        ...


class Directory(Protocol):
    """The swarm's shared records: servers' announcements, and reports of servers caught lying."""

    def servers(self, model: str) -> list[ServerRecord]:
        ...

    def reports(self, model: str) -> list[Report]:
        ...

    def publish_report(self, model: str, report: Report, ttl: float) -> None:
        """Without blocking: the report is stored in the background."""
        ...

    def close(self) -> None:
        ...


class HivemindTransport:
    """libp2p streams through hivemind's p2p daemon. Every request carries this peer's membership proof in a
    private swarm (the first message of a stream carries it for the whole stream)."""

    def __init__(self, p2p: P2P, peer: SwarmPeer, owns_p2p: bool):
        self.p2p, self.peer, self._owns_p2p = p2p, peer, owns_p2p
        self.membership: Membership = peer.membership

    async def call(self, peer_id: str, name: str, request: Request) -> Reply:
        return await self.p2p.call_protobuf_handler(PeerID.from_base58(peer_id), name, self.membership.stamp(request), Reply)

    async def call_split(self, peer_id: str, name: str, request: Request) -> Reply:
        stamped = self.membership.stamp(request)
        for attempt in range(2):
            replies = await self.p2p.iterate_protobuf_handler(
                PeerID.from_base58(peer_id), name, as_aiter(*wire.split(stamped)), Reply
            )
            parts = [part async for part in replies]
            if parts:
                return wire.join(parts)
            # hivemind ends a stream that closed before any reply as if it were complete. A server's handler
            # always replies, if only with an error, so the stream itself broke (seen under load on the first
            # stream call to a fresh server). These calls are stateless, so one more try is safe.
            if attempt == 0:
                logger.warning("%s at %s: the stream closed before any reply; trying once more", name, peer_id[-8:])
        raise ConnectionError(f"{name} at {peer_id[-8:]}: the stream closed twice before any reply")

    async def open_stream(self, peer_id: str, name: str, requests: AsyncIterator[Request]) -> AsyncGenerator[Reply, None]:
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), name)
        return _replies(reader, writer, self.membership.stamp_stream(requests), f"{name} at {peer_id[-8:]}")

    async def close(self) -> None:
        if self._owns_p2p:
            await self.p2p.shutdown()


async def _replies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: AsyncIterator[Request],
                   label: str) -> AsyncGenerator[Reply, None]:
    """A stream's replies, its requests sent alongside as they come; it ends as soon as the stream does.

    hivemind's `iterate_protobuf_handler` would, once the stream ends, wait for the requests to end too. A
    session's requests end only when the session closes, so a server whose stream ended without a reset
    (it crashed, and its daemon closed the stream cleanly) left the client waiting out `request_timeout`
    for a reply that could not come, instead of failing over at once.
    """

    async def send() -> None:
        try:
            async for request in requests:
                await P2P.send_protobuf(request, writer)
            await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
        except ConnectionError:
            pass  # the stream broke: the replies end, which is what the caller sees

    sending = asyncio.create_task(send())
    try:
        while True:
            try:
                reply, error = await P2P.receive_protobuf(Reply, reader)
            except asyncio.IncompleteReadError:  # the stream ended
                return
            if error is not None:
                raise P2PHandlerError(f"{label} failed: {error.message}")
            yield reply
    except GeneratorExit:
        # The caller closes the stream once its requests have ended (a session closing): let them end with
        # END_OF_STREAM, so the server ends the session itself, rather than being cancelled when its daemon
        # reports the closed stream (which cancels the session wherever it waits).
        await asyncio.wait({sending}, timeout=CLOSE_FLUSH)
        raise
    finally:
        sending.cancel()
        writer.close()


class DhtDirectory:
    """The records in hivemind's DHT (see dht/records.py and dht/reports.py for the key schema)."""

    def __init__(self, dht: DHT, owns_dht: bool):
        self.dht, self._owns_dht = dht, owns_dht

    def servers(self, model: str) -> list[ServerRecord]:
        return get_servers(self.dht, model)

    def reports(self, model: str) -> list[Report]:
        return get_reports(self.dht, model)

    def publish_report(self, model: str, report: Report, ttl: float) -> None:
        publish_report(self.dht, model, report, ttl)

    def close(self) -> None:
        if self._owns_dht:
            self.dht.shutdown()
