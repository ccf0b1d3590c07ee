"""Per-peer limits on a real server: a peer over a limit gets a typed `rate_limited` refusal (a refused
step leaves its session usable), while another peer is served exactly as usual."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.asyncio import as_aiter
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM, wire
from swarmllm.launcher import LocalSwarm, ServerSpec
from swarmllm.protocol import (
    RPC_FORWARD,
    RPC_INFERENCE,
    ErrorCode,
    OpenSession,
    SessionOpened,
    SpanReply,
    SpanRequest,
    Step,
    StepDone,
)

pytestmark = pytest.mark.swarm

WIDTH = 32
LIMITS = ("--max-sessions-per-peer", "1", "--max-tokens-in-flight-per-peer", "8",
          "--max-request-bytes-per-peer", str(64 * 2**10), "--requests-per-second-per-peer", "1",
          "--request-burst-per-peer", "4")


class Session:
    """A raw inference stream, one message and one reply at a time (as the real client talks)."""

    def __init__(self, p2p: P2P, server: PeerID):
        self.p2p, self.server = p2p, server
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.replies = None

    async def _requests(self):
        while (msg := await self.outbox.get()) is not None:
            yield msg

    async def send(self, msg: runtime_pb2.ExpertRequest, expect: type):
        if self.replies is None:
            self.replies = await self.p2p.iterate_protobuf_handler(
                self.server, RPC_INFERENCE, self._requests(), runtime_pb2.ExpertResponse)
        self.outbox.put_nowait(msg)
        return wire.parse(await anext(self.replies), expect)[0]

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        async for _ in self.replies:
            pass


def _open(session_id: str) -> runtime_pb2.ExpertRequest:
    return wire.request(OpenSession(session_id=session_id, start=0, end=4, batch_size=1, max_length=32))


def _step(step_id: int, tokens: int, past: int) -> runtime_pb2.ExpertRequest:
    return wire.request(Step(step_id=step_id), torch.randn(1, tokens, WIDTH), torch.arange(past, past + tokens)[None])


async def _forward(p2p: P2P, server: PeerID, tokens: int) -> SpanReply:
    msg = wire.request(SpanRequest(start=0, end=4), torch.randn(1, tokens, WIDTH), torch.arange(tokens)[None])
    replies = await p2p.iterate_protobuf_handler(server, RPC_FORWARD, as_aiter(*wire.split(msg)), runtime_pb2.ExpertResponse)
    return wire.parse(wire.join([r async for r in replies]), SpanReply)[0]


def test_a_peer_over_its_limits_is_refused_while_others_are_served(tiny_llama_dir) -> None:
    ids = torch.randint(1, 90, (1, 5))
    local = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval().generate(ids, max_new_tokens=3, do_sample=False)

    with LocalSwarm(str(tiny_llama_dir), [ServerSpec("0:4", LIMITS)]) as swarm:
        server_id = swarm.server_lines["server0"].split(" peer ")[1].split()[0]

        def other_peer_generates() -> torch.Tensor:
            model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama_dir), initial_peers=swarm.initial_peers)
            try:
                return model.generate(ids, max_new_tokens=3, do_sample=False)
            finally:
                model.sequence_manager.shutdown()

        async def scenario() -> None:
            # The server's own addresses, not the bootstrap's: through the bootstrap alone, the first call can
            # come before this peer's routing table knows the server ("failed to find any peer in table").
            own = swarm.server_lines["server0"].split(" at ")[1].split()
            p2p = await P2P.create(initial_peers=own, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            server = PeerID.from_base58(server_id)
            try:
                # Request size: 600 tokens of float32 are 75 KiB, over the 64 KiB this peer may send at once.
                with pytest.raises(wire.RemoteError, match="bytes") as refused:
                    await _forward(p2p, server, 600)
                assert refused.value.code == ErrorCode.RATE_LIMITED

                # Sessions: one at a time. Tokens in flight: a step of 9 is refused, and the session goes on.
                first = Session(p2p, server)
                assert isinstance(await first.send(_open("first"), SessionOpened), SessionOpened)
                with pytest.raises(wire.RemoteError, match="9 tokens exceeds") as refused:
                    await first.send(_step(0, 9, 0), StepDone)
                assert refused.value.code == ErrorCode.RATE_LIMITED
                assert (await first.send(_step(1, 3, 0), StepDone)).length == 3
                with pytest.raises(wire.RemoteError, match="1 sessions open") as refused:
                    await Session(p2p, server).send(_open("second"), SessionOpened)
                assert refused.value.code == ErrorCode.RATE_LIMITED

                # Another peer, meanwhile, is served, with exact results.
                assert torch.equal(await asyncio.to_thread(other_peer_generates), local)

                # Rate: bursts of 4, then 1 per second. However much the bucket refilled meanwhile, calls in
                # quick succession empty it within 4 calls.
                with pytest.raises(wire.RemoteError, match="requests/s") as refused:
                    for _ in range(5):
                        await _forward(p2p, server, 4)
                assert refused.value.code == ErrorCode.RATE_LIMITED

                # Limits are released: once the session closed and the bucket refilled, the peer is served again.
                await first.close()
                await asyncio.sleep(1.2)
                again = Session(p2p, server)
                assert isinstance(await again.send(_open("again"), SessionOpened), SessionOpened)
                assert (await again.send(_step(0, 8, 0), StepDone)).length == 8
                await again.close()
            finally:
                await p2p.shutdown()

        began = time.monotonic()
        asyncio.run(scenario())
        assert swarm.servers["server0"].proc.poll() is None
        assert time.monotonic() - began < 60
