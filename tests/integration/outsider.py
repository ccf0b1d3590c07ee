"""An outsider of a private swarm, run as its own process by test_private_swarm: it knows the bootstrap
address, a server's peer id and a member's proof (as if sniffed), but not the swarm key. It tries to read
the swarm's records, announce a span, and call every RPC of the server; it prints what happened as JSON.

Usage: python -m tests.integration.outsider MODEL SERVER_PEER_ID STOLEN_PROOF INITIAL_PEER...
"""

from __future__ import annotations

import asyncio
import json
import sys

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter

from swarmllm import wire
from swarmllm.dht.node import join
from swarmllm.dht.records import announce, get_servers
from swarmllm.protocol import (
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_LORA_PUT,
    RPC_PUSH,
    OpenSession,
    ServerRecord,
    SpanRequest,
)


async def _calls(p2p, server: str, proof: str) -> dict[str, str]:
    """Each RPC once with `proof` in the uid field: the error code it got, or 'served'."""
    peer = PeerID.from_base58(server)
    hidden, positions = torch.randn(1, 4, 32), torch.arange(4)[None]
    results = {}

    def stamped(msg):
        msg.uid = proof
        return msg

    async def unary(name, msg):
        return await p2p.call_protobuf_handler(peer, name, stamped(msg), runtime_pb2.ExpertResponse)

    async def streamed(name, msgs):
        replies = await p2p.iterate_protobuf_handler(peer, name, as_aiter(*msgs), runtime_pb2.ExpertResponse)
        return [r async for r in replies][0]

    forward = wire.split(stamped(wire.request(SpanRequest(start=0, end=4), hidden, positions)))
    session = [stamped(wire.request(OpenSession(session_id="x" * 16, start=0, end=4, batch_size=1, max_length=8)))]
    for name, call in (
        ("info", unary(RPC_INFO, runtime_pb2.ExpertRequest())),
        ("forward", streamed(RPC_FORWARD, forward)),
        ("inference", streamed(RPC_INFERENCE, session)),
        ("lora_put", unary(RPC_LORA_PUT, runtime_pb2.ExpertRequest(metadata=b"{}"))),
        ("push", unary(RPC_PUSH, runtime_pb2.ExpertRequest(metadata=b"{}"))),
    ):
        try:
            reply = await asyncio.wait_for(call, 20)
            wire.parse(reply, ServerRecord if name == "info" else SpanRequest)
            results[name] = "served"
        except wire.RemoteError as e:
            results[name] = str(e.code)
        except wire.ProtocolError:
            results[name] = "served"  # a reply that is not an error: the server did the work
    return results


def main(model: str, server: str, stolen_proof: str, *initial_peers: str) -> None:
    peer = join(list(initial_peers), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        seen = [r.peer_id for r in get_servers(peer.dht, model)]
        fake = ServerRecord(peer_id=peer.peer_id, start=0, end=4, dtype="float32", cache_tokens_left=10**6,
                            step_time=1e-6, forward_tps=1e9)
        announce(peer.dht, model, fake, ttl=60)
        loop = asyncio.new_event_loop()
        p2p = loop.run_until_complete(peer.dht.replicate_p2p())
        calls = {
            "no_proof": loop.run_until_complete(_calls(p2p, server, "")),
            "forged_proof": loop.run_until_complete(_calls(p2p, server, "0" * 64)),
            "stolen_proof": loop.run_until_complete(_calls(p2p, server, stolen_proof)),
        }
        print(json.dumps({"peer_id": peer.peer_id, "seen_servers": seen, "calls": calls}), flush=True)
    finally:
        peer.dht.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
