"""RPC glue: turn hivemind P2P messages into calls of `compute`, and errors into typed replies.

All torch work runs on one compute thread, so the event loop keeps serving the network (and other
sessions' messages) while a step computes. A failing request gets an `ErrorReply`; the server goes on.
Inference sessions (the `inference` stream and `push`) are served by `sessions.Sessions`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.adapters import lora
from swarmllm.adapters.package import AdapterError
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
    Tuning,
)
from swarmllm.server import compute
from swarmllm.server.audit import AuditLog
from swarmllm.server.cache import CacheMemory
from swarmllm.server.kept_graphs import KeptGraphs
from swarmllm.server.limits import PeerLimits, RateLimited
from swarmllm.server.lora_cache import LoraCache
from swarmllm.server.metrics import Kind, Rpc, ServerMetrics
from swarmllm.server.points import ServerPoints
from swarmllm.server.replies import error_code, error_reply, parse_request, unpack
from swarmllm.server.scheduler import Scheduler
from swarmllm.server.sessions import Sessions
from swarmllm.trust.membership import PUBLIC, Membership, gate_stream, gate_unary

logger = logging.getLogger(__name__)

NamedAdapter = tuple[lora.LoraSpec, lora.LoraWeights]


@dataclass(frozen=True)
class Override:
    """A fine-tuned version of some blocks that this server runs instead of the base weights."""

    name: str
    blocks: frozenset[int]


class Handler:
    """Serves `info`, `forward`, `backward` and `lora_put` for one span, and registers its `sessions`
    (`inference` and `push`) behind the same membership gate.

    `adapter(name)` returns a named adapter's weights for this span, fetching it first if needed.
    """

    def __init__(
        self, span: Span, memory: CacheMemory, session_timeout: float, record: Callable[[], ServerRecord],
        lora_cache: LoraCache | None = None, adapter: Callable[[str], Awaitable[NamedAdapter]] | None = None,
        override: Override | None = None, kept: KeptGraphs | None = None, scheduler: Scheduler | None = None,
        page_tokens: int = 64, audit: AuditLog | None = None, membership: Membership = PUBLIC,
        limits: PeerLimits | None = None, points: ServerPoints | None = None, metrics: ServerMetrics | None = None,
    ):
        # `span` is None while the server moves to other blocks (requests then get `not_serving`); the device
        # never changes, and every tensor a request brings is moved there as it is parsed.
        self.span: Span | None = span
        self.device = span.device
        self.memory, self.session_timeout, self.record = memory, session_timeout, record
        self.lora_cache = lora_cache if lora_cache is not None else LoraCache(256 * 2**20)
        self.kept = kept if kept is not None else KeptGraphs(max_graphs=8, ttl=60.0)
        self.adapter, self.override = adapter, override
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        self.page_tokens = page_tokens
        self.audit = audit if audit is not None else AuditLog(None)
        self.membership = membership
        self.corrupt = 0.0  # TEST ONLY: see `tamper`
        self.limits = limits if limits is not None else PeerLimits()
        self.points = points  # counts work per requester (contribution points); None: not counted
        self.p2p: P2P | None = None
        self.sessions = Sessions(self)  # serves `inference` and `push`
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.metrics.watch(memory, lambda: self.sessions.active, self.scheduler)

    def gate(self, handler):
        """`handler` (unary) behind the membership gate, its refusals counted in the metrics."""
        return gate_unary(self.membership, handler, on_refuse=self._refused)

    def _refused(self) -> None:
        self.metrics.error(ErrorCode.NOT_MEMBER)

    async def register(self, p2p: P2P) -> None:
        # In a private swarm every handler is gated: a non-member's request is refused before it is parsed.
        unary = self.gate
        stream = partial(gate_stream, self.membership, on_refuse=self._refused)
        await p2p.add_protobuf_handler(RPC_INFO, unary(self.rpc_info), runtime_pb2.ExpertRequest)
        streamed: tuple[tuple[str, Rpc, Callable], ...] = (
            (RPC_FORWARD, "forward", self.forward), (RPC_BACKWARD, "backward", self.backward))
        for name, rpc, fn in streamed:
            await p2p.add_protobuf_handler(
                name, stream(self._streamed(rpc, fn)), runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
            )
        await p2p.add_protobuf_handler(RPC_LORA_PUT, unary(self.rpc_lora_put), runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(RPC_PUSH, unary(self.sessions.rpc_push), runtime_pb2.ExpertRequest)
        self.p2p = p2p
        await p2p.add_protobuf_handler(
            RPC_INFERENCE, stream(self.sessions.rpc_inference), runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )

    @property
    def active_sessions(self) -> int:
        """Inference sessions open on this server now."""
        return self.sessions.active

    async def _compute(self, fn, *args, peer: str = ""):
        return await self.scheduler.run(fn, *args, peer=peer)

    def count(self, peer: str, span: Span, tokens: int, kind: Kind, seconds: float) -> None:
        """Record `tokens` run through `span` for `peer` in `seconds`: in the metrics, and as `peer`'s
        contribution points where this server counts them."""
        self.metrics.served(kind, tokens, seconds)
        if self.points is not None:
            self.points.count(peer, span.end - span.start, tokens)

    def reply_error(self, e: Exception) -> runtime_pb2.ExpertResponse:
        """The typed `ErrorReply` for `e` (see `replies.error_reply`), counted by its code."""
        self.metrics.error(error_code(e))
        return error_reply(e)

    def reply_timeout(self, message: str) -> runtime_pb2.ExpertResponse:
        self.metrics.error(ErrorCode.SESSION_TIMEOUT)
        return wire.error_response(ErrorCode.SESSION_TIMEOUT, message)

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        self.metrics.request("info")
        return wire.response(self.record())

    async def forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        began, meta, tokens, peer = time.monotonic(), None, 0, str(context.remote_id)
        try:
            meta, tensors = parse_request(request, SpanRequest, self.device)
            hidden, position_ids, mask, prompts = unpack(tensors, 2, meta.has_mask, meta.tuning.prompts)
            span = compute.sub_span(self.span, meta.start, meta.end)
            tokens = self._check_span_call(span, hidden, position_ids, mask, prompts)
            with self.limits.tokens(peer, tokens):
                extras = await self.extras(meta.tuning, span, peer, prompts)
                t0 = time.perf_counter()
                if meta.keep is None:
                    out = await self._compute(compute.forward, span, hidden, position_ids, mask, extras, peer=peer)
                else:
                    out, graph = await self._compute(compute.forward_with_graph, span, hidden, position_ids, mask, extras,
                                                     peer=peer)
                    self.kept.put(peer, meta.keep, graph)
            self.count(peer, span, tokens, "forward", time.perf_counter() - t0)
            self._audit(context, "forward", meta, tokens, "ok", began)
            return wire.response(SpanReply(), self.tamper(out), compression=meta.compression)
        except Exception as e:
            self._audit(context, "forward", meta, tokens, error_code(e), began)
            return self.reply_error(e)

    async def backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        began, meta, tokens, peer = time.monotonic(), None, 0, str(context.remote_id)
        try:
            meta, tensors = parse_request(request, SpanRequest, self.device)
            hidden, position_ids, grad_out, mask, prompts = unpack(tensors, 3, meta.has_mask, meta.tuning.prompts)
            span = compute.sub_span(self.span, meta.start, meta.end)
            tokens = self._check_span_call(span, hidden, position_ids, mask, prompts)
            compute.check_grad(grad_out, hidden)
            with self.limits.tokens(peer, tokens):
                graph = self.kept.pop(peer, meta.keep) if meta.keep is not None else None
                if graph is not None and graph.hidden.shape == hidden.shape and torch.equal(graph.hidden, hidden):
                    t0 = time.perf_counter()
                    grads = await self._compute(compute.backward_from_graph, graph, grad_out, peer=peer)
                else:
                    logger.debug("backward of %d:%d recomputes its forward (kept: %s)", meta.start, meta.end, graph is not None)
                    extras = await self.extras(meta.tuning, span, peer, prompts)
                    t0 = time.perf_counter()
                    grads = await self._compute(compute.backward, span, hidden, position_ids, grad_out, mask, extras,
                                                peer=peer)
            self.count(peer, span, tokens, "backward", time.perf_counter() - t0)
            self._audit(context, "backward", meta, tokens, "ok", began)
            return wire.response(SpanReply(), *grads, compression=meta.compression)
        except Exception as e:
            self._audit(context, "backward", meta, tokens, error_code(e), began)
            return self.reply_error(e)

    def _check_span_call(self, span: Span, hidden, position_ids, mask, prompts) -> int:
        """Validate a forward or backward call before anything is queued; returns its tokens."""
        compute.check_inputs(span, hidden, position_ids, mask)
        compute.check_prompts(span, hidden, prompts)
        batch, seq = hidden.shape[:2]
        self.limits.check_attention(batch, seq, seq)
        return batch * seq

    async def rpc_lora_put(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Receive (part of) a client's LoRA weights; shapes are checked against the blocks before caching."""
        self.metrics.request("lora_put")
        try:
            self.limits.admit(str(context.remote_id))
            meta, tensors = parse_request(request, LoraPut, self.device)
            span = compute.sub_span(self.span, meta.start, meta.end)  # read once: a move may clear it
            weights = lora.unflatten(tensors, meta.blocks, meta.lora.targets)
            for b in meta.blocks:
                if not meta.start <= b < meta.end:
                    raise compute.BadRequest(f"block {b} is outside the upload's range {meta.start}:{meta.end}")
                lora.check_fits(span.layers[b - span.start], b, weights[b])
            complete = self.lora_cache.put(str(context.remote_id), meta.lora, meta.start, meta.end, meta.blocks, tensors)
            return wire.response(LoraStored(complete=complete))
        except Exception as e:
            return self.reply_error(e)

    async def extras(self, tuning: Tuning, span: Span, peer: str, prompts) -> compute.Extras:
        """Resolve a request's tuning into what compute applies; refuses a mismatched block override."""
        self._check_override(tuning, span)
        if tuning.lora is not None and tuning.adapter is not None:
            raise compute.BadRequest("a request uses either client LoRA weights or a named adapter, not both")
        if tuning.lora is not None:
            ref = tuning.lora
            trainable = self.lora_cache.get(peer, ref, span.start, span.end)
            weights = lora.unflatten(trainable, range(span.start, span.end), ref.targets)
            return compute.Extras(prompts, weights, ref.alpha / ref.rank, ref.dropout, ref.seed, trainable)
        if tuning.adapter is not None:
            if self.adapter is None:
                raise compute.BadRequest("this server does not serve named adapters")
            spec, weights = await self.adapter(tuning.adapter)
            return compute.Extras(prompts, weights, spec.scaling)
        return compute.Extras(prompts)

    def _check_override(self, tuning: Tuning, span: Span) -> None:
        mine = self.override.name if self.override else None
        touches = self.override is not None and any(b in self.override.blocks for b in range(span.start, span.end))
        # A client that asks for an override must get it, and one that does not must never get it.
        if tuning.override != mine and (tuning.override is not None or touches):
            raise AdapterError(
                f"blocks {span.start}:{span.end} here run {mine or 'the base weights'}, "
                f"the request expects {tuning.override or 'the base weights'}"
            )

    def _streamed(self, rpc: Rpc, fn):
        """Adapt a unary handler to the split-message streams that forward and backward use (see wire.split).

        Parts count against the peer's byte limit as they arrive, so an oversized or endless request is refused
        before it is held whole, and one that does not arrive within `session_timeout` is dropped. A refused
        request is still read to its end (and discarded): the caller reads the reply only once it has sent
        everything, so that is how it gets the typed refusal rather than a broken stream."""

        async def handler(requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
            parts: list[runtime_pb2.ExpertRequest] = []
            peer, held, refusal = str(context.remote_id), 0, None
            self.metrics.request(rpc)
            try:
                try:
                    self.limits.admit(peer)
                except RateLimited as e:
                    refusal = e
                async with asyncio.timeout(self.session_timeout):
                    async for part in requests:
                        if refusal is not None:
                            continue
                        size = part.ByteSize()
                        try:
                            self.limits.hold_bytes(peer, size)
                        except RateLimited as e:
                            refusal, parts = e, []
                            self.limits.release_bytes(peer, held)
                            held = 0
                            continue
                        held += size
                        parts.append(part)
                reply = self.reply_error(refusal) if refusal is not None else await fn(wire.join(parts), context)
            except TimeoutError:
                reply = self.reply_timeout(f"request not received within {self.session_timeout}s")
            except Exception as e:
                reply = self.reply_error(e)
            finally:
                self.limits.release_bytes(peer, held)
            for part in wire.split(reply):
                yield part

        return handler

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        """TEST ONLY (`--test-corrupt-outputs`): what a faulty or malicious server returns, to test verification."""
        if not self.corrupt:
            return out
        return out + self.corrupt * out.float().std() * torch.randn_like(out)

    def _audit(self, context: P2PContext, rpc: str, meta: SpanRequest | None, tokens: int, outcome, began: float) -> None:
        start, end = (meta.start, meta.end) if meta is not None else (-1, -1)  # -1: the request did not parse
        self.audit.record(str(context.remote_id), rpc, start, end, tokens, str(outcome), began)
