"""The hivemind transport over two real p2p daemons: a stream that the server ends is seen to end at once,
while the client's requests are still open (as an inference session's always are); a client that closes a
stream ends its requests first; a split call whose stream broke before any reply is tried once more."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.client.transport import HivemindTransport
from swarmllm.trust.membership import PUBLIC

pytestmark = pytest.mark.swarm

NAME = "swarmllm.test.one_reply"


async def _one_reply_then_end(requests, context: P2PContext):
    """Answers the first request, takes the second and ends the stream without answering it: a server that
    died mid-step, whose daemon closed the stream cleanly."""
    replied = False
    async for request in requests:
        if replied:
            return
        yield runtime_pb2.ExpertResponse(metadata=request.metadata)
        replied = True


def test_a_stream_the_server_ends_ends_for_the_client_while_its_requests_are_still_open() -> None:
    async def scenario() -> None:
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        await server.add_protobuf_handler(NAME, _one_reply_then_end, runtime_pb2.ExpertRequest, stream_input=True,
                                          stream_output=True)
        client = await P2P.create(initial_peers=[str(a) for a in await server.get_visible_maddrs()],
                                  host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        transport = HivemindTransport(client, SimpleNamespace(membership=PUBLIC), owns_p2p=True)
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (msg := await outbox.get()) is not None:  # never None here: the session stays open
                yield msg

        try:
            replies = await transport.open_stream(server.peer_id.to_base58(), NAME, requests())
            outbox.put_nowait(runtime_pb2.ExpertRequest(metadata=b"step 0"))
            assert (await asyncio.wait_for(anext(replies), 30)).metadata == b"step 0"
            outbox.put_nowait(runtime_pb2.ExpertRequest(metadata=b"step 1"))
            # The server took step 1 and ended the stream: the client learns it now, not after a request timeout
            # (hivemind's own iterator waits for the requests to end first, which here is never).
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(anext(replies), 30)
        finally:
            await transport.close()
            await server.shutdown()

    asyncio.run(scenario())


async def _pair(name: str, handler):
    """A server daemon serving `handler` as a stream handler, and a client transport connected to it."""
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    await server.add_protobuf_handler(name, handler, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)
    client = await P2P.create(initial_peers=[str(a) for a in await server.get_visible_maddrs()],
                              host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    return server, HivemindTransport(client, SimpleNamespace(membership=PUBLIC), owns_p2p=True)


def test_closing_a_stream_ends_its_requests_before_the_stream() -> None:
    """A session closes by ending its requests and closing the replies at once. The server must see the requests
    end (END_OF_STREAM), and so end the session itself, rather than be cancelled when its daemon reports the
    closed stream."""
    seen: asyncio.Queue = asyncio.Queue()

    async def echo(requests, context: P2PContext):
        try:
            async for request in requests:
                yield runtime_pb2.ExpertResponse(metadata=request.metadata)
            seen.put_nowait("requests ended")
        except asyncio.CancelledError:
            seen.put_nowait("cancelled")
            raise

    async def scenario() -> None:
        server, transport = await _pair(NAME + ".echo", echo)
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (msg := await outbox.get()) is not None:
                yield msg

        try:
            replies = await transport.open_stream(server.peer_id.to_base58(), NAME + ".echo", requests())
            outbox.put_nowait(runtime_pb2.ExpertRequest(metadata=b"step 0"))
            assert (await asyncio.wait_for(anext(replies), 30)).metadata == b"step 0"
            outbox.put_nowait(None)  # as ServerStream.close does
            await replies.aclose()
            assert await asyncio.wait_for(seen.get(), 30) == "requests ended"
        finally:
            await transport.close()
            await server.shutdown()

    asyncio.run(scenario())


def test_a_split_call_whose_stream_breaks_before_any_reply_is_tried_once_more() -> None:
    calls = []

    async def flaky(requests, context: P2PContext):
        """Drops the first call's stream without a word, and answers every later one."""
        parts = [part async for part in requests]
        calls.append(len(parts))
        if len(calls) > 1:
            for part in wire.split(wire.join(parts)):
                yield runtime_pb2.ExpertResponse(metadata=part.metadata, tensors=part.tensors)

    async def silent(requests, context: P2PContext):
        async for _ in requests:
            pass
        return
        yield  # an async generator that never replies

    async def scenario() -> None:
        server, transport = await _pair(NAME + ".flaky", flaky)
        await server.add_protobuf_handler(NAME + ".silent", silent, runtime_pb2.ExpertRequest, stream_input=True,
                                          stream_output=True)
        peer = server.peer_id.to_base58()
        try:
            reply = await transport.call_split(peer, NAME + ".flaky", runtime_pb2.ExpertRequest(metadata=b"forward"))
            assert reply.metadata == b"forward" and len(calls) == 2
            with pytest.raises(ConnectionError, match="closed twice before any reply"):
                await transport.call_split(peer, NAME + ".silent", runtime_pb2.ExpertRequest(metadata=b"forward"))
        finally:
            await transport.close()
            await server.shutdown()

    asyncio.run(scenario())
