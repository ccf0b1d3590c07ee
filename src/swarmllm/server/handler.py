"""RPC glue: turn hivemind P2P messages into calls of `compute`, and errors into typed replies.

All torch work runs on one compute thread, so the event loop keeps serving the network (and other
sessions' messages) while a step computes. A failing request gets an `ErrorReply`; the server goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
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
    OpenSession,
    Push,
    Pushed,
    ServerRecord,
    SessionOpened,
    SpanReply,
    SpanRequest,
    Step,
    StepDone,
    Tuning,
)
from swarmllm.server import compute
from swarmllm.server.audit import AuditLog
from swarmllm.server.cache import CacheFullError, CacheMemory, SessionKV, bytes_per_token
from swarmllm.server.inference import Session
from swarmllm.server.kept_graphs import KeptGraphs
from swarmllm.server.lora_cache import LoraCache, NotCached
from swarmllm.server.scheduler import Scheduler
from swarmllm.trust.membership import PUBLIC, Membership, gate_stream, gate_unary

logger = logging.getLogger(__name__)

_ERRORS = {
    compute.BadRequest: ErrorCode.BAD_REQUEST,
    compute.NotServing: ErrorCode.NOT_SERVING,
    wire.ProtocolError: ErrorCode.BAD_REQUEST,
    CacheFullError: ErrorCode.CACHE_FULL,
    compute.TooLong: ErrorCode.TOO_LONG,
    lora.LoraShapeError: ErrorCode.BAD_REQUEST,
    NotCached: ErrorCode.NOT_CACHED,
}


def _code(e: Exception) -> ErrorCode:
    if isinstance(e, AdapterError):
        return ErrorCode.ADAPTER
    return _ERRORS.get(type(e), ErrorCode.INTERNAL)


def _error(e: Exception) -> runtime_pb2.ExpertResponse:
    code = _code(e)
    if code == ErrorCode.INTERNAL:
        logger.exception("internal error while serving a request")
    return wire.error_response(code, str(e))


NamedAdapter = tuple[lora.LoraSpec, lora.LoraWeights]


@dataclass(frozen=True)
class Override:
    """A fine-tuned version of some blocks that this server runs instead of the base weights."""

    name: str
    blocks: frozenset[int]


class Handler:
    """Serves `info`, `forward`, `backward`, `inference` and `lora_put` for one span.

    `adapter(name)` returns a named adapter's weights for this span, fetching it first if needed.
    """

    def __init__(
        self, span: Span, memory: CacheMemory, session_timeout: float, record: Callable[[], ServerRecord],
        lora_cache: LoraCache | None = None, adapter: Callable[[str], Awaitable[NamedAdapter]] | None = None,
        override: Override | None = None, kept: KeptGraphs | None = None, scheduler: Scheduler | None = None,
        page_tokens: int = 64, audit: AuditLog | None = None, membership: Membership = PUBLIC,
    ):
        self.span, self.memory, self.session_timeout, self.record = span, memory, session_timeout, record
        self.lora_cache = lora_cache if lora_cache is not None else LoraCache(256 * 2**20)
        self.kept = kept if kept is not None else KeptGraphs(max_graphs=8, ttl=60.0)
        self.adapter, self.override = adapter, override
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        self.page_tokens = page_tokens
        self.audit = audit if audit is not None else AuditLog(None)
        self.membership = membership
        self.active_sessions = 0
        self.inboxes: dict[tuple[str, int], asyncio.Queue] = {}  # (session id, first block) -> step inbox
        self.p2p: P2P | None = None

    async def register(self, p2p: P2P) -> None:
        # In a private swarm every handler is gated: a non-member's request is refused before it is parsed.
        unary, stream = partial(gate_unary, self.membership), partial(gate_stream, self.membership)
        await p2p.add_protobuf_handler(RPC_INFO, unary(self.rpc_info), runtime_pb2.ExpertRequest)
        for name, fn in ((RPC_FORWARD, self.forward), (RPC_BACKWARD, self.backward)):
            await p2p.add_protobuf_handler(
                name, stream(_streamed(fn)), runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
            )
        await p2p.add_protobuf_handler(RPC_LORA_PUT, unary(self.rpc_lora_put), runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(RPC_PUSH, unary(self.rpc_push), runtime_pb2.ExpertRequest)
        self.p2p = p2p
        await p2p.add_protobuf_handler(
            RPC_INFERENCE, stream(self.rpc_inference), runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )

    async def _compute(self, fn, *args):
        return await self.scheduler.run(fn, *args)

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return wire.response(self.record())

    async def forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        began, meta, tokens = time.monotonic(), None, 0
        try:
            meta, tensors = wire.parse(request, SpanRequest)
            hidden, position_ids, mask, prompts = _unpack(tensors, 2, meta.has_mask, meta.tuning.prompts)
            span = compute.sub_span(self.span, meta.start, meta.end)
            peer = str(context.remote_id)
            extras = await self._extras(meta.tuning, span, peer, prompts)
            tokens = hidden.shape[0] * hidden.shape[1]
            if meta.keep is None:
                out = await self._compute(compute.forward, span, hidden, position_ids, mask, extras)
            else:
                out, graph = await self._compute(compute.forward_with_graph, span, hidden, position_ids, mask, extras)
                self.kept.put(peer, meta.keep, graph)
            self._audit(context, "forward", meta, tokens, "ok", began)
            return wire.response(SpanReply(), out, compression=meta.compression)
        except Exception as e:
            self._audit(context, "forward", meta, tokens, _code(e), began)
            return _error(e)

    async def backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        began, meta, tokens = time.monotonic(), None, 0
        try:
            meta, tensors = wire.parse(request, SpanRequest)
            hidden, position_ids, grad_out, mask, prompts = _unpack(tensors, 3, meta.has_mask, meta.tuning.prompts)
            tokens = hidden.shape[0] * hidden.shape[1]
            span = compute.sub_span(self.span, meta.start, meta.end)
            peer = str(context.remote_id)
            graph = self.kept.pop(peer, meta.keep) if meta.keep is not None else None
            if graph is not None and graph.hidden.shape == hidden.shape and torch.equal(graph.hidden, hidden):
                grads = await self._compute(compute.backward_from_graph, graph, grad_out)
            else:
                logger.debug("backward of %d:%d recomputes its forward (kept: %s)", meta.start, meta.end, graph is not None)
                extras = await self._extras(meta.tuning, span, peer, prompts)
                grads = await self._compute(compute.backward, span, hidden, position_ids, grad_out, mask, extras)
            self._audit(context, "backward", meta, tokens, "ok", began)
            return wire.response(SpanReply(), *grads, compression=meta.compression)
        except Exception as e:
            self._audit(context, "backward", meta, tokens, _code(e), began)
            return _error(e)

    async def rpc_lora_put(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Receive (part of) a client's LoRA weights; shapes are checked against the blocks before caching."""
        try:
            meta, tensors = wire.parse(request, LoraPut)
            compute.sub_span(self.span, meta.start, meta.end)
            weights = lora.unflatten(tensors, meta.blocks, meta.lora.targets)
            for b in meta.blocks:
                if not meta.start <= b < meta.end:
                    raise compute.BadRequest(f"block {b} is outside the upload's range {meta.start}:{meta.end}")
                lora.check_fits(self.span.layers[b - self.span.start], b, weights[b])
            complete = self.lora_cache.put(str(context.remote_id), meta.lora, meta.start, meta.end, meta.blocks, tensors)
            return wire.response(LoraStored(complete=complete))
        except Exception as e:
            return _error(e)

    async def _extras(self, tuning: Tuning, span: Span, peer: str, prompts) -> compute.Extras:
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

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One session per stream: open (admission), then steps until the client closes or goes idle.

        Admission: a session that could never fit is refused at once; otherwise it waits in the memory queue
        for its first page. Its cache then grows page by page as steps arrive (each may wait in the queue too),
        and all of it is freed when the stream ends, whatever the reason."""
        held, reader, meta, steps, pushed_first, counted, session = 0, None, None, 0, 0, False, None
        began, tokens, outcome = time.monotonic(), 0, "ok"
        try:
            first = await asyncio.wait_for(anext(requests), self.session_timeout)
            meta, tensors = wire.parse(first, OpenSession)
            span = compute.sub_span(self.span, meta.start, meta.end)
            if len(tensors) != int(meta.tuning.prompts):
                raise compute.BadRequest(f"OpenSession carries {int(meta.tuning.prompts)} tensors, got {len(tensors)}")
            extras = await self._extras(meta.tuning, span, str(context.remote_id), tensors[0] if tensors else None)
            what = f"a session of {meta.batch_size} x {meta.max_length} tokens on blocks {meta.start}:{meta.end}"
            self.memory.check_possible(bytes_per_token(span, meta.batch_size) * meta.max_length, what)
            kv = SessionKV(span, meta.batch_size, self.page_tokens)
            await self.memory.acquire(kv.page_bytes, what)
            held, kv.capacity = kv.page_bytes, self.page_tokens
            self.active_sessions, counted = self.active_sessions + 1, True
            session = Session(span, meta.batch_size, meta.max_length, kv, extras)
            logger.info("session %s opened by %s: blocks %d:%d, up to %d x %d tokens", meta.session_id[:8],
                        str(context.remote_id)[-8:], meta.start, meta.end, meta.batch_size, meta.max_length)
            yield wire.response(SessionOpened(session_id=meta.session_id, cache_tokens=kv.capacity * meta.batch_size))
            # Steps come from the client's stream and, with push, from the previous server: both feed one
            # inbox, and a step already run (pushed first, or sent first by the client) is skipped.
            inbox: asyncio.Queue = asyncio.Queue()
            reader = asyncio.create_task(_pump(requests, inbox))
            self.inboxes[(meta.session_id, meta.start)] = inbox
            last_done = -1
            while True:
                item = await asyncio.wait_for(inbox.get(), self.session_timeout)
                if item is None:
                    return  # the client closed the session
                try:
                    if isinstance(item, Exception):
                        raise item
                    step, tensors, pushed = item
                    if 0 <= step.step_id <= last_done:
                        continue  # the other copy of this step got here first
                    steps, pushed_first = steps + 1, pushed_first + pushed
                    hidden, position_ids, mask, _ = _unpack(tensors, 2, step.has_mask)
                    session.check(hidden, position_ids, mask)
                    pages = kv.pages_for(session.length + hidden.shape[1])
                    if pages:
                        await self.memory.acquire(pages * kv.page_bytes, f"step {step.step_id} of session {meta.session_id[:8]}")
                        held, kv.capacity = held + pages * kv.page_bytes, kv.capacity + pages * self.page_tokens
                    out = await self.scheduler.step(session, hidden, position_ids, mask)
                    tokens += hidden.shape[0] * hidden.shape[1]
                    last_done = max(last_done, step.step_id)
                    if step.push_to:
                        asyncio.create_task(self._push(meta, step, out, position_ids, mask))
                    yield wire.response(StepDone(step_id=step.step_id, length=session.length), out,
                                        compression=meta.compression)
                except (compute.BadRequest, compute.TooLong, wire.ProtocolError, CacheFullError) as e:
                    yield _error(e)  # the session's cache is unchanged; the client may go on
        except StopAsyncIteration:
            return
        except TimeoutError:
            outcome = ErrorCode.SESSION_TIMEOUT.value
            logger.info("session from %s timed out; freeing its cache", str(context.remote_id)[-8:])
            yield wire.error_response(ErrorCode.SESSION_TIMEOUT, f"no message for {self.session_timeout}s")
        except Exception as e:
            outcome = _code(e).value
            yield _error(e)
        finally:
            if meta is not None:
                self.audit.record(str(context.remote_id), "inference", meta.start, meta.end, tokens, outcome, began, steps)
            if session is not None:
                self.scheduler.forget(session)
            if held:
                self.memory.release(held)
            if counted:
                self.active_sessions -= 1
            if meta is not None and (meta.session_id, meta.start) in self.inboxes:
                self.inboxes.pop((meta.session_id, meta.start))
                logger.info("session %s closed after %d steps, %d of them pushed by the previous server first "
                            "(server total: %d steps in %d passes)", meta.session_id[:8], steps, pushed_first,
                            self.scheduler.steps_run, self.scheduler.passes_run)
            if reader is not None:
                reader.cancel()

    def _audit(self, context: P2PContext, rpc: str, meta: SpanRequest | None, tokens: int, outcome, began: float) -> None:
        start, end = (meta.start, meta.end) if meta is not None else (-1, -1)  # -1: the request did not parse
        self.audit.record(str(context.remote_id), rpc, start, end, tokens, str(outcome), began)

    async def _push(self, meta: OpenSession, step: Step, out, position_ids, mask) -> None:
        """Send this step's output to the next server of the route, in the session's compression. Best
        effort: if it fails, the next server gets the same input from the client a moment later."""
        nxt = Step(step_id=step.step_id, has_mask=mask is not None, push_to=step.push_to[1:])
        push = Push(session_id=meta.session_id, start=meta.end, step=nxt)
        msg = wire.request(push, out, position_ids, *([mask] if mask is not None else []), compression=meta.compression)
        self.membership.stamp(msg)
        try:
            await asyncio.wait_for(self.p2p.call_protobuf_handler(
                PeerID.from_base58(step.push_to[0]), RPC_PUSH, msg, runtime_pb2.ExpertResponse
            ), self.session_timeout)
        except Exception as e:
            logger.debug("push of step %d to %s failed: %r", step.step_id, step.push_to[0][-8:], e)

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            meta, tensors = wire.parse(request, Push)
            inbox = self.inboxes.get((meta.session_id, meta.start))
            if inbox is None:
                raise compute.NotServing(f"no session {meta.session_id[:8]} here")
            inbox.put_nowait((meta.step, tensors, True))
            return wire.response(Pushed())
        except Exception as e:
            return _error(e)


async def _pump(requests: AsyncIterator[runtime_pb2.ExpertRequest], inbox: asyncio.Queue) -> None:
    """Client messages into the session's inbox: (Step, tensors, pushed=False), an exception for a bad one,
    None at the end."""
    try:
        async for msg in requests:
            try:
                inbox.put_nowait((*wire.parse(msg, Step), False))
            except wire.ProtocolError as e:
                inbox.put_nowait(e)
    except Exception as e:  # the stream broke: the session ends as if the client had closed it
        logger.debug("session stream ended: %r", e)
    inbox.put_nowait(None)


MAX_REQUEST_BYTES = 1 << 30


def _streamed(fn):
    """Adapt a unary handler to the split-message streams that forward and backward use (see wire.split)."""

    async def handler(requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
        parts, size = [], 0
        try:
            async for part in requests:
                size += part.ByteSize()
                if size > MAX_REQUEST_BYTES:
                    raise wire.ProtocolError(f"request larger than {MAX_REQUEST_BYTES} bytes")
                parts.append(part)
            reply = await fn(wire.join(parts), context)
        except Exception as e:
            reply = _error(e)
        for part in wire.split(reply):
            yield part

    return handler


def _unpack(tensors: list, n_required: int, has_mask: bool, has_prompts: bool = False) -> tuple:
    """(required..., mask or None, prompts or None) out of a request's tensors, checking their count."""
    expected = n_required + int(has_mask) + int(has_prompts)
    if len(tensors) != expected:
        raise compute.BadRequest(f"expected {expected} tensors, got {len(tensors)}")
    mask = tensors[n_required] if has_mask else None
    prompts = tensors[-1] if has_prompts else None
    return (*tensors[:n_required], mask, prompts)
