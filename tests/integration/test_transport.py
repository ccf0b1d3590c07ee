"""The hivemind transport over two real p2p daemons: a stream that the server ends is seen to end at once,
while the client's requests are still open (as an inference session's always are)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

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
