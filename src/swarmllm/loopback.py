"""An in-process swarm: real server handlers and real clients, joined by queues instead of libp2p.

`LoopbackNetwork` stands in for both of the client's seams (client/transport.py): each `LoopbackTransport`
carries one client's requests, and the network itself is the `Directory`. Servers register their handlers
on a `LoopbackHost`, the small part of hivemind's `P2P` that `server.handler.Handler` uses, so the code
under test is the server's own. What crosses is what would cross a wire: every message is serialized and
parsed again, and each stream's server side runs as its own task, as it would in a server process.

Faults a test can inject: `kill` (a crashed server: its streams end mid-session, its calls fail) and
`stall` (a hung one: nothing it sends arrives until `resume`).

Used by unit tests of sessions, failover and verification: a step takes milliseconds on a tiny model,
with no processes and no p2p daemon. Not a transport for production: everything lives in one process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from hivemind.p2p import P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from hivemind.utils.asyncio import as_aiter

from swarmllm import wire
from swarmllm.client.transport import Reply, Request
from swarmllm.protocol import Report, ServerRecord
from swarmllm.trust.identity import Identity
from swarmllm.trust.membership import PUBLIC, Membership

logger = logging.getLogger(__name__)


class LoopbackHost:
    """One peer's endpoint: the handlers it serves, and `call_protobuf_handler` for the calls it makes itself
    (a server pushing to the next one). The subset of `hivemind.P2P` that the server's handlers use."""

    def __init__(self, network: LoopbackNetwork, identity: Identity):
        self.network, self.identity = network, identity
        self.peer_id = PeerID.from_base58(identity.peer_id)
        self.unary: dict[str, Callable] = {}
        self.streams: dict[str, Callable] = {}
        self.alive = True
        self.sending = asyncio.Event()  # cleared while stalled: replies wait for it
        self.sending.set()
        self.open: set[_Stream] = set()

    async def add_protobuf_handler(self, name: str, handler: Callable, input_protobuf_type: type, *,
                                   stream_input: bool = False, stream_output: bool = False, balanced: bool = False) -> None:
        # What this stand-in cannot do is refused by name, not ignored.
        if input_protobuf_type is not Request:
            raise NotImplementedError(f"loopback handlers take ExpertRequest only, not {input_protobuf_type.__name__}")
        if balanced:
            raise NotImplementedError("loopback has no balanced handlers (one process serves each peer)")
        if not stream_input and not stream_output:
            self.unary[name] = handler
            return

        async def streamed(requests: AsyncIterator, context: P2PContext) -> AsyncIterator:
            # As hivemind registers it: a handler of one request or one reply still talks over a stream.
            output = handler(requests if stream_input else await anext(requests), context)
            if hasattr(output, "__aiter__"):
                async for reply in output:
                    yield reply
            else:
                yield await output

        self.streams[name] = streamed

    async def call_protobuf_handler(self, peer_id: PeerID, name: str, input: Request, output_protobuf_type: type) -> Reply:
        return await self.network.call(str(self.peer_id), str(peer_id), name, input)


class _Stream:
    """One open stream: the server's side runs as a task that fills `replies`; the caller reads them."""

    def __init__(self, host: LoopbackHost):
        self.host = host
        self.requests: asyncio.Queue = asyncio.Queue()
        self.replies: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []

    def end(self) -> None:
        """The connection is gone (the caller closed it, or the server crashed): both sides stop."""
        for task in self.tasks:
            task.cancel()
        self.replies.put_nowait(None)
        self.host.open.discard(self)


class LoopbackNetwork:
    """Peers in one process, and the directory of their records. Runs on whichever event loop calls it."""

    def __init__(self) -> None:
        self.hosts: dict[str, LoopbackHost] = {}
        self._records: dict[str, dict[str, Callable[[], ServerRecord]]] = {}  # model -> peer -> its record now
        self._reports: dict[str, dict[str, tuple[Report, float]]] = {}  # model -> "reporter/offender" -> (report, expiry)
        self.calls: list[tuple[str, str, str]] = []  # (caller, callee, rpc) of every call and stream, in order
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop that carries the messages

    # --- peers and faults ---

    def host(self, identity: Identity | None = None) -> LoopbackHost:
        host = LoopbackHost(self, identity or Identity.ephemeral())
        self.hosts[str(host.peer_id)] = host
        return host

    def transport(self, identity: Identity, membership: Membership = PUBLIC) -> LoopbackTransport:
        return LoopbackTransport(self, identity.peer_id, membership)

    def announce(self, model: str, peer_id: str, record: Callable[[], ServerRecord]) -> None:
        """List a server under `model`; `record()` is read at each lookup, so the listing is always current."""
        self._records.setdefault(model, {})[peer_id] = record

    # Faults may be injected from any thread (a test's, between two steps); they take effect on the event loop
    # that carries the messages, in order with what the client sends after them.

    def kill(self, peer_id: str) -> None:
        """The server crashes: its streams end where they are, and calls to it fail from now on. Its record
        stays listed, as a dead server's stays in the DHT until it expires."""
        host = self.hosts[peer_id]
        host.alive = False

        def crash() -> None:
            for stream in list(host.open):
                stream.end()

        self._on_loop(crash)

    def stall(self, peer_id: str) -> None:
        """The server hangs: it still takes requests, but nothing it sends arrives until `resume`."""
        self._on_loop(self.hosts[peer_id].sending.clear)

    def resume(self, peer_id: str) -> None:
        self._on_loop(self.hosts[peer_id].sending.set)

    def _on_loop(self, fn: Callable[[], object]) -> None:
        loop = self._loop
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None or here is loop:
            fn()
        else:  # asyncio's queues, events and tasks are not thread-safe
            loop.call_soon_threadsafe(fn)

    # --- the Directory (client/transport.py) ---

    def servers(self, model: str) -> list[ServerRecord]:
        return [record() for record in self._records.get(model, {}).values()]

    def reports(self, model: str) -> list[Report]:
        now = time.monotonic()
        return [report for report, expiry in self._reports.get(model, {}).values() if expiry > now]

    def publish_report(self, model: str, report: Report, ttl: float) -> None:
        """Kept for `ttl` seconds, as the DHT keeps it."""
        self._reports.setdefault(model, {})[f"{report.reporter}/{report.offender}"] = (report, time.monotonic() + ttl)

    def close(self) -> None:
        pass

    # --- carrying messages ---

    def _reach(self, caller: str, peer_id: str, name: str) -> LoopbackHost:
        self._loop = asyncio.get_running_loop()
        self.calls.append((caller, peer_id, name))
        host = self.hosts.get(peer_id)
        if host is None or not host.alive:
            raise P2PDaemonError(f"failed to reach peer {peer_id}")  # what the p2p daemon says of a gone peer
        return host

    async def call(self, caller: str, peer_id: str, name: str, request: Request) -> Reply:
        host = self._reach(caller, peer_id, name)
        if name not in host.unary:
            raise P2PHandlerError(f"no handler {name} at {peer_id}")
        context = P2PContext(handle_name=name, local_id=host.peer_id, remote_id=PeerID.from_base58(caller))
        try:
            reply = await host.unary[name](Request.FromString(request.SerializeToString()), context)
        except Exception as e:  # hivemind reports a handler's exception to the caller as this
            raise P2PHandlerError(f"Failed to call handler `{name}` at {peer_id}: {e}") from e
        await host.sending.wait()
        if not host.alive:
            raise P2PDaemonError(f"peer {peer_id} went away")
        return Reply.FromString(reply.SerializeToString())

    async def stream(self, caller: str, peer_id: str, name: str, requests: AsyncIterator[Request]) -> AsyncGenerator[Reply, None]:
        host = self._reach(caller, peer_id, name)
        if name not in host.streams:
            raise P2PHandlerError(f"no handler {name} at {peer_id}")
        context = P2PContext(handle_name=name, local_id=host.peer_id, remote_id=PeerID.from_base58(caller))
        stream = _Stream(host)
        host.open.add(stream)
        stream.tasks = [asyncio.create_task(_send(requests, stream.requests)),
                        asyncio.create_task(_serve(host, host.streams[name](_received(stream.requests), context),
                                                   stream.replies, name))]
        return _read(stream)


class LoopbackTransport:
    """One client's `Transport` (client/transport.py) over a `LoopbackNetwork`."""

    def __init__(self, network: LoopbackNetwork, peer_id: str, membership: Membership = PUBLIC):
        self.network, self.peer_id, self.membership = network, peer_id, membership

    async def call(self, peer_id: str, name: str, request: Request) -> Reply:
        return await self.network.call(self.peer_id, peer_id, name, self.membership.stamp(request))

    async def call_split(self, peer_id: str, name: str, request: Request) -> Reply:
        replies = await self.network.stream(self.peer_id, peer_id, name, as_aiter(*wire.split(self.membership.stamp(request))))
        return wire.join([part async for part in replies])

    async def open_stream(self, peer_id: str, name: str, requests: AsyncIterator[Request]) -> AsyncGenerator[Reply, None]:
        return await self.network.stream(self.peer_id, peer_id, name, self.membership.stamp_stream(requests))

    async def close(self) -> None:
        pass


async def _send(requests: AsyncIterator[Request], queue: asyncio.Queue) -> None:
    """The caller's side of a stream: each request is serialized as it is sent; None marks the end."""
    async for request in requests:
        queue.put_nowait(request.SerializeToString())
    queue.put_nowait(None)


async def _received(queue: asyncio.Queue) -> AsyncIterator[Request]:
    while (data := await queue.get()) is not None:
        yield Request.FromString(data)


async def _serve(host: LoopbackHost, replies: AsyncIterator[Reply], out: asyncio.Queue, name: str) -> None:
    """The server's side of a stream, as its own task; a handler's exception reaches the caller as hivemind's
    error, and the stream then ends."""
    try:
        async for reply in replies:
            data = reply.SerializeToString()
            await host.sending.wait()
            out.put_nowait(data)
    except Exception as e:
        logger.debug("loopback handler %s failed", name, exc_info=True)
        out.put_nowait(P2PHandlerError(f"Failed to call handler `{name}` at {host.peer_id}: {e}"))
    out.put_nowait(None)


async def _read(stream: _Stream) -> AsyncGenerator[Reply, None]:
    """The caller's reading side. Closing it (or the reader going away) ends the stream on both sides."""
    try:
        while (item := await stream.replies.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield Reply.FromString(item)
    finally:
        stream.end()



