"""RPC glue: turn hivemind P2P messages into calls of `compute`, and errors into typed replies.

All torch work runs on one compute thread, so the event loop keeps serving the network (and other
sessions' messages) while a step computes. A failing request gets an `ErrorReply`; the server goes on.
Inference sessions (the `inference` stream and `push`) are served by `sessions.Sessions`. Both read the
server's state from one `ServingContext` (server/context.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.adapters import lora
from swarmllm.models.span import Span
from swarmllm.protocol import (
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_LORA_PUT,
    RPC_PUSH,
    ErrorCode,
    LoraPut,
    LoraStored,
    ServerRecord,
    SpanReply,
    SpanRequest,
)
from swarmllm.server import compute
from swarmllm.server.context import ServingContext
from swarmllm.server.limits import RateLimited
from swarmllm.server.metrics import Kind, Rpc
from swarmllm.server.replies import error_code, parse_request, unpack
from swarmllm.server.sessions import Sessions
from swarmllm.trust.membership import gate_stream, gate_unary

logger = logging.getLogger(__name__)

# The compute of a forward or backward: (span, request record, its required tensors (hidden, position ids
# and, for a backward, the output's gradient), mask, prompts, peer) -> the reply's tensors.
SpanWork = Callable[..., Awaitable[list[torch.Tensor]]]


class Handler:
    """Serves `info`, `forward`, `backward` and `lora_put` for one span, and registers its `sessions`
    (`inference` and `push`) behind the same membership gate. `record()` is the server's record now."""

    def __init__(self, context: ServingContext, record: Callable[[], ServerRecord]):
        self.context, self.record = context, record
        self.sessions = Sessions(context)  # serves `inference` and `push`
        context.metrics.watch(context.memory, lambda: self.sessions.active, context.scheduler)

    def gate(self, handler):
        """`handler` (unary) behind the membership gate, its refusals counted in the metrics."""
        return gate_unary(self.context.membership, handler, on_refuse=self._refused)

    def _refused(self) -> None:
        self.context.metrics.error(ErrorCode.NOT_MEMBER)

    async def register(self, p2p: P2P) -> None:
        # In a private swarm every handler is gated: a non-member's request is refused before it is parsed.
        unary = self.gate
        stream = partial(gate_stream, self.context.membership, on_refuse=self._refused)
        await p2p.add_protobuf_handler(RPC_INFO, unary(self.rpc_info), runtime_pb2.ExpertRequest)
        streamed: tuple[tuple[str, Rpc, Callable], ...] = (
            (RPC_FORWARD, "forward", self.forward), (RPC_BACKWARD, "backward", self.backward))
        for name, rpc, fn in streamed:
            await p2p.add_protobuf_handler(
                name, stream(self._streamed(rpc, fn)), runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
            )
        await p2p.add_protobuf_handler(RPC_LORA_PUT, unary(self.rpc_lora_put), runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(RPC_PUSH, unary(self.sessions.rpc_push), runtime_pb2.ExpertRequest)
        self.sessions.p2p = p2p
        await p2p.add_protobuf_handler(
            RPC_INFERENCE, stream(self.sessions.rpc_inference), runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )

    @property
    def active_sessions(self) -> int:
        """Inference sessions open on this server now."""
        return self.sessions.active

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        self.context.metrics.request("info")
        return wire.response(self.record())

    async def forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._span_call("forward", request, str(context.remote_id), 2, self._forward)

    async def backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._span_call("backward", request, str(context.remote_id), 3, self._backward)

    async def _span_call(self, rpc: Kind, request: runtime_pb2.ExpertRequest, peer: str, n_tensors: int,
                         work: SpanWork) -> runtime_pb2.ExpertResponse:
        """The template of a stateless call: parse, check, hold the peer's tokens, compute, count, audit, reply.
        `n_tensors`: the request's tensors before its optional mask and prompts."""
        c, began, meta, tokens = self.context, time.monotonic(), None, 0
        try:
            meta, tensors = parse_request(request, SpanRequest, c.device)
            *given, mask, prompts = unpack(tensors, n_tensors, meta.has_mask, meta.tuning.prompts)
            span = c.spans.sub_span(meta.start, meta.end)
            hidden, position_ids = given[0], given[1]
            compute.check_inputs(span, hidden, position_ids, mask)
            compute.check_prompts(span, hidden, prompts)
            batch, seq = hidden.shape[:2]
            c.limits.check_attention(batch, seq, seq)
            tokens = batch * seq
            with c.limits.tokens(peer, tokens):
                t0 = time.perf_counter()
                out = await work(span, meta, given, mask, prompts, peer)
            c.count(peer, span, tokens, rpc, time.perf_counter() - t0)
            c.audit_call(peer, rpc, (meta.start, meta.end), tokens, "ok", began)
            return wire.response(SpanReply(), *out, compression=meta.compression)
        except Exception as e:
            c.audit_call(peer, rpc, (meta.start, meta.end) if meta is not None else None, tokens, error_code(e), began)
            return c.reply_error(e)

    async def _forward(self, span: Span, meta: SpanRequest, given, mask, prompts, peer: str) -> list[torch.Tensor]:
        c, (hidden, position_ids) = self.context, given
        extras = await c.tuning.extras(meta.tuning, span, peer, prompts)
        if meta.keep is None:
            out = await c.scheduler.run(compute.forward, span, hidden, position_ids, mask, extras, peer=peer)
        else:  # its backward follows: keep the graph, so that the backward need not recompute it
            out, graph = await c.scheduler.run(compute.forward_with_graph, span, hidden, position_ids, mask, extras,
                                               peer=peer)
            c.kept.put(peer, meta.keep, graph)
        return [c.faults.tamper(out)]

    async def _backward(self, span: Span, meta: SpanRequest, given, mask, prompts, peer: str) -> list[torch.Tensor]:
        c, (hidden, position_ids, grad_out) = self.context, given
        compute.check_grad(grad_out, hidden)
        graph = c.kept.pop(peer, meta.keep) if meta.keep is not None else None
        if graph is not None and graph.hidden.shape == hidden.shape and torch.equal(graph.hidden, hidden):
            return await c.scheduler.run(compute.backward_from_graph, graph, grad_out, peer=peer)
        logger.debug("backward of %d:%d recomputes its forward (kept: %s)", meta.start, meta.end, graph is not None)
        extras = await c.tuning.extras(meta.tuning, span, peer, prompts)
        return await c.scheduler.run(compute.backward, span, hidden, position_ids, grad_out, mask, extras, peer=peer)

    async def rpc_lora_put(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Receive (part of) a client's LoRA weights; shapes are checked against the blocks before caching."""
        c = self.context
        c.metrics.request("lora_put")
        try:
            c.limits.admit(str(context.remote_id))
            meta, tensors = parse_request(request, LoraPut, c.device)
            span = c.spans.sub_span(meta.start, meta.end)  # read once: a move may clear it
            weights = lora.unflatten(tensors, meta.blocks, meta.lora.targets)
            for b in meta.blocks:
                if not meta.start <= b < meta.end:
                    raise compute.BadRequest(f"block {b} is outside the upload's range {meta.start}:{meta.end}")
                lora.check_fits(span.layers[b - span.start], b, weights[b])
            complete = c.tuning.lora_cache.put(str(context.remote_id), meta.lora, meta.start, meta.end, meta.blocks,
                                               tensors)
            return wire.response(LoraStored(complete=complete))
        except Exception as e:
            return c.reply_error(e)

    def _streamed(self, rpc: Rpc, fn):
        """Adapt a unary handler to the split-message streams that forward and backward use (see wire.split).

        Parts count against the peer's byte limit as they arrive, so an oversized or endless request is refused
        before it is held whole, and one that does not arrive within `session_timeout` is dropped. A refused
        request is still read to its end (and discarded): the caller reads the reply only once it has sent
        everything, so that is how it gets the typed refusal rather than a broken stream."""

        async def handler(requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
            c, parts = self.context, list[runtime_pb2.ExpertRequest]()
            peer, held, refusal = str(context.remote_id), 0, None
            c.metrics.request(rpc)
            try:
                try:
                    c.limits.admit(peer)
                except RateLimited as e:
                    refusal = e
                async with asyncio.timeout(c.session_timeout):
                    async for part in requests:
                        if refusal is not None:
                            continue
                        size = part.ByteSize()
                        try:
                            c.limits.hold_bytes(peer, size)
                        except RateLimited as e:
                            refusal, parts = e, []
                            c.limits.release_bytes(peer, held)
                            held = 0
                            continue
                        held += size
                        parts.append(part)
                reply = c.reply_error(refusal) if refusal is not None else await fn(wire.join(parts), context)
            except TimeoutError:
                reply = c.reply_timeout(f"request not received within {c.session_timeout}s")
            except Exception as e:
                reply = c.reply_error(e)
            finally:
                c.limits.release_bytes(peer, held)
            for part in wire.split(reply):
                yield part

        return handler
