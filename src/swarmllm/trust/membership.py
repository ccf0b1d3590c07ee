"""Proof of membership on every RPC of a private swarm.

The sender puts `SwarmKey.proof(own peer id)` in the request's `uid` field (unused otherwise), on the first
message of a stream. The receiver checks it against the peer id libp2p authenticated for the connection,
before it parses anything else, so a non-member's request costs it one HMAC and nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.protocol import ErrorCode
from swarmllm.trust.swarm_key import SwarmKey

logger = logging.getLogger(__name__)


class Membership:
    """What a peer needs to talk inside its swarm: its proof to send, and the key to check others' proofs.
    In a public swarm (no key) every request is admitted and nothing is attached."""

    def __init__(self, swarm_key: SwarmKey | None, peer_id: str):
        self.swarm_key = swarm_key
        self._proof = swarm_key.proof(peer_id) if swarm_key is not None else ""

    @property
    def private(self) -> bool:
        return self.swarm_key is not None

    def stamp(self, msg: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertRequest:
        if self._proof:
            msg.uid = self._proof
        return msg

    async def stamp_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]):
        """The same stream with the proof on its first message."""
        first = True
        async for msg in requests:
            yield self.stamp(msg) if first else msg
            first = False

    def admits(self, peer_id: str, msg: runtime_pb2.ExpertRequest) -> bool:
        return self.swarm_key is None or self.swarm_key.is_member(peer_id, msg.uid)


PUBLIC = Membership(None, "")


def _refusal(what: str, peer: str, on_refuse: Callable[[], None] | None):
    """Log and count a refused non-member, and the reply it gets."""
    logger.info("refused a %s from non-member %s", what, peer[-8:])
    if on_refuse is not None:
        on_refuse()
    return wire.error_response(ErrorCode.NOT_MEMBER, "this server serves members of its private swarm only")


def gate_unary(membership: Membership, handler, on_refuse: Callable[[], None] | None = None):
    """`handler` for members only: others get NOT_MEMBER before the request is even parsed. `on_refuse` is
    called at each refusal (the server's metrics count them)."""
    if not membership.private:
        return handler

    async def gated(request, context):
        if not membership.admits(str(context.remote_id), request):
            return _refusal("request", str(context.remote_id), on_refuse)
        return await handler(request, context)

    return gated


def gate_stream(membership: Membership, handler, stream_input: bool = True,
                on_refuse: Callable[[], None] | None = None):
    """The same for a handler that streams its replies: the first message carries the proof."""
    if not membership.private:
        return handler

    async def gated(requests, context):
        peer = str(context.remote_id)
        if stream_input:
            try:
                first = await anext(requests)
            except StopAsyncIteration:
                return
            if not membership.admits(peer, first):
                yield _refusal("stream", peer, on_refuse)
                await wire.drain(requests, 1.0, max_messages=4)  # bounded: a non-member cannot make us read much
                return
            requests = _chain(first, requests)
        elif not membership.admits(peer, requests):
            yield _refusal("request", peer, on_refuse)
            return
        async for reply in handler(requests, context):
            yield reply

    return gated


async def _chain(first, rest):
    yield first
    async for msg in rest:
        yield msg
