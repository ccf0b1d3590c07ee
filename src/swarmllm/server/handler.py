"""RPC glue: turn hivemind P2P messages into calls of `compute`, and errors into typed replies.

All torch work runs on one compute thread, so the event loop keeps serving the network (and other
sessions' messages) while a step computes. A failing request gets an `ErrorReply`; the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from swarmllm.server.limits import PeerLimits, RateLimited
from swarmllm.server.lora_cache import LoraCache, NotCached, UploadsFull
from swarmllm.server.points import ServerPoints
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
    RateLimited: ErrorCode.RATE_LIMITED,
    UploadsFull: ErrorCode.RATE_LIMITED,
}
# A session survives these in one of its steps: nothing was run, and its cache is as before the step.
_STEP_ERRORS = (compute.BadRequest, compute.TooLong, wire.ProtocolError, CacheFullError, RateLimited)
# Steps waiting in a session's inbox. An honest client has one in flight (two with push), so this never
# slows it; a flooding one waits for the transport instead of filling the server's memory.
INBOX_STEPS = 8
# Seconds a refused session's stream stays open for the client to close its side: closing ours first would
# break the pipe of a client still sending, and it would see that instead of the typed refusal.
REFUSAL_GRACE = 1.0


def _code(e: Exception) -> ErrorCode:
    if isinstance(e, AdapterError):
        return ErrorCode.ADAPTER
    return next((_ERRORS[c] for c in type(e).__mro__ if c in _ERRORS), ErrorCode.INTERNAL)


def _error(e: Exception) -> runtime_pb2.ExpertResponse:
    code = _code(e)
    if code == ErrorCode.INTERNAL:
        logger.exception("internal error while serving a request")
    return wire.error_response(code, str(e))


def _parse(msg, cls):
    """`wire.parse` of a request: an ErrorReply where a request belongs is malformed, not a remote failure."""
    try:
        return wire.parse(msg, cls)
    except wire.RemoteError:
        raise wire.ProtocolError(f"expected {cls.__name__}, got an ErrorReply") from None


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
        limits: PeerLimits | None = None, points: ServerPoints | None = None,
    ):
        self.span, self.memory, self.session_timeout, self.record = span, memory, session_timeout, record
        self.lora_cache = lora_cache if lora_cache is not None else LoraCache(256 * 2**20)
        self.kept = kept if kept is not None else KeptGraphs(max_graphs=8, ttl=60.0)
        self.adapter, self.override = adapter, override
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        self.page_tokens = page_tokens
        self.audit = audit if audit is not None else AuditLog(None)
        self.membership = membership
        self.corrupt = 0.0  # TEST ONLY: see `_tamper`
        self.limits = limits if limits is not None else PeerLimits()
        self.points = points  # counts work per requester (contribution points); None: not counted
        self.active_sessions = 0
        self.inboxes: dict[tuple[str, int], asyncio.Queue] = {}  # (session id, first block) -> step inbox
        self.p2p: P2P | None = None

    async def register(self, p2p: P2P) -> None:
        # In a private swarm every handler is gated: a non-member's request is refused before it is parsed.
        unary, stream = partial(gate_unary, self.membership), partial(gate_stream, self.membership)
        await p2p.add_protobuf_handler(RPC_INFO, unary(self.rpc_info), runtime_pb2.ExpertRequest)
        for name, fn in ((RPC_FORWARD, self.forward), (RPC_BACKWARD, self.backward)):
            await p2p.add_protobuf_handler(
                name, stream(self._streamed(fn)), runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
            )
        await p2p.add_protobuf_handler(RPC_LORA_PUT, unary(self.rpc_lora_put), runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(RPC_PUSH, unary(self.rpc_push), runtime_pb2.ExpertRequest)
        self.p2p = p2p
        await p2p.add_protobuf_handler(
            RPC_INFERENCE, stream(self.rpc_inference), runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )

    async def _compute(self, fn, *args, peer: str = ""):
        return await self.scheduler.run(fn, *args, peer=peer)

    def _count(self, peer: str, span: Span, tokens: int) -> None:
        if self.points is not None:
            self.points.count(peer, span.end - span.start, tokens)

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return wire.response(self.record())

    async def forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        began, meta, tokens, peer = time.monotonic(), None, 0, str(context.remote_id)
        try:
            meta, tensors = _parse(request, SpanRequest)
            hidden, position_ids, mask, prompts = _unpack(tensors, 2, meta.has_mask, meta.tuning.prompts)
            span = compute.sub_span(self.span, meta.start, meta.end)
            tokens = self._check_span_call(span, hidden, position_ids, mask, prompts)
            with self.limits.tokens(peer, tokens):
                extras = await self._extras(meta.tuning, span, peer, prompts)
                if meta.keep is None:
                    out = await self._compute(compute.forward, span, hidden, position_ids, mask, extras, peer=peer)
                else:
                    out, graph = await self._compute(compute.forward_with_graph, span, hidden, position_ids, mask, extras,
                                                     peer=peer)
                    self.kept.put(peer, meta.keep, graph)
            self._count(peer, span, tokens)
            self._audit(context, "forward", meta, tokens, "ok", began)
            return wire.response(SpanReply(), self._tamper(out), compression=meta.compression)
        except Exception as e:
            self._audit(context, "forward", meta, tokens, _code(e), began)
            return _error(e)

    async def backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        began, meta, tokens, peer = time.monotonic(), None, 0, str(context.remote_id)
        try:
            meta, tensors = _parse(request, SpanRequest)
            hidden, position_ids, grad_out, mask, prompts = _unpack(tensors, 3, meta.has_mask, meta.tuning.prompts)
            span = compute.sub_span(self.span, meta.start, meta.end)
            tokens = self._check_span_call(span, hidden, position_ids, mask, prompts)
            compute.check_grad(grad_out, hidden)
            with self.limits.tokens(peer, tokens):
                graph = self.kept.pop(peer, meta.keep) if meta.keep is not None else None
                if graph is not None and graph.hidden.shape == hidden.shape and torch.equal(graph.hidden, hidden):
                    grads = await self._compute(compute.backward_from_graph, graph, grad_out, peer=peer)
                else:
                    logger.debug("backward of %d:%d recomputes its forward (kept: %s)", meta.start, meta.end, graph is not None)
                    extras = await self._extras(meta.tuning, span, peer, prompts)
                    grads = await self._compute(compute.backward, span, hidden, position_ids, grad_out, mask, extras,
                                                peer=peer)
            self._count(peer, span, tokens)
            self._audit(context, "backward", meta, tokens, "ok", began)
            return wire.response(SpanReply(), *grads, compression=meta.compression)
        except Exception as e:
            self._audit(context, "backward", meta, tokens, _code(e), began)
            return _error(e)

    def _check_span_call(self, span: Span, hidden, position_ids, mask, prompts) -> int:
        """Validate a forward or backward call before anything is queued; returns its tokens."""
        compute.check_inputs(span, hidden, position_ids, mask)
        compute.check_prompts(span, hidden, prompts)
        batch, seq = hidden.shape[:2]
        self.limits.check_attention(batch, seq, seq)
        return batch * seq

    async def rpc_lora_put(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Receive (part of) a client's LoRA weights; shapes are checked against the blocks before caching."""
        try:
            self.limits.admit(str(context.remote_id))
            meta, tensors = _parse(request, LoraPut)
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

        Admission: a peer over its session or rate limit is refused first. A session that could never fit is
        refused at once; otherwise it waits in the memory queue for its first page. Its cache then grows page
        by page as steps arrive (each may wait in the queue too), and all of it is freed when the stream
        ends, whatever the reason. A refused step leaves the session as it was."""
        peer, meta, live, reader, inbox, counted = str(context.remote_id), None, None, None, None, False
        began, outcome = time.monotonic(), "ok"
        try:
            self.limits.admit(peer)
            self.limits.open_session(peer)
            counted = True
            first = await asyncio.wait_for(anext(requests), self.session_timeout)
            meta, tensors = _parse(first, OpenSession)
            live = await self._open(meta, tensors, peer)
            self.active_sessions += 1
            logger.info("session %s opened by %s: blocks %d:%d, up to %d x %d tokens", meta.session_id[:8],
                        peer[-8:], meta.start, meta.end, meta.batch_size, meta.max_length)
            yield wire.response(SessionOpened(session_id=meta.session_id, cache_tokens=live.kv.capacity * meta.batch_size))
            # Steps come from the client's stream and, with push, from the previous server: both feed one
            # inbox, and a step already run (pushed first, or sent first by the client) is skipped.
            inbox = asyncio.Queue(INBOX_STEPS)
            reader = asyncio.create_task(_pump(requests, inbox, self.limits, peer))
            self.inboxes[(meta.session_id, meta.start)] = inbox
            while True:
                item = await asyncio.wait_for(inbox.get(), self.session_timeout)
                if item is None:
                    return  # the client closed the session
                reply = await self._step(live, item, peer)
                if reply is not None:
                    yield reply
        except StopAsyncIteration:
            return
        except TimeoutError:
            outcome = ErrorCode.SESSION_TIMEOUT.value
            logger.info("session from %s timed out; freeing its cache", peer[-8:])
            yield wire.error_response(ErrorCode.SESSION_TIMEOUT, f"no message for {self.session_timeout}s")
        except Exception as e:
            outcome = _code(e).value
            yield _error(e)
            if reader is None:  # refused before its steps were read: let the client close its side first
                await _drain(requests, REFUSAL_GRACE)
        finally:
            if reader is not None:
                reader.cancel()
            if counted:
                self.limits.close_session(peer)
            if meta is not None:
                self.audit.record(peer, "inference", meta.start, meta.end, live.tokens if live else 0, outcome, began,
                                  live.steps if live else 0)
            if live is not None:
                self._close(live, inbox, peer)

    async def _open(self, meta: OpenSession, tensors: list, peer: str) -> _Live:
        """Admit a session: check what it declares, resolve its tuning, then wait for its first cache page."""
        span = compute.sub_span(self.span, meta.start, meta.end)
        if len(tensors) != int(meta.tuning.prompts):
            raise compute.BadRequest(f"OpenSession carries {int(meta.tuning.prompts)} tensors, got {len(tensors)}")
        prompts = tensors[0] if tensors else None
        compute.check_prompt_shape(span, meta.batch_size, meta.max_length, prompts)
        extras = await self._extras(meta.tuning, span, peer, prompts)
        what = f"a session of {meta.batch_size} x {meta.max_length} tokens on blocks {meta.start}:{meta.end}"
        self.memory.check_possible(bytes_per_token(span, meta.batch_size) * meta.max_length, what)
        kv = SessionKV(span, meta.batch_size, self.page_tokens)
        await self.memory.acquire(kv.page_bytes, what)
        kv.capacity = self.page_tokens
        return _Live(meta, Session(span, meta.batch_size, meta.max_length, kv, extras), held=kv.page_bytes)

    async def _step(self, live: _Live, item, peer: str) -> runtime_pb2.ExpertResponse | None:
        """Run one inbox item of a session; the reply for the client, or None when there is none: a copy of
        a step already run, or a pushed copy that was refused (the client's own copy follows)."""
        if isinstance(item, Exception):
            return _error(item)  # the client's message was malformed or over a limit; the session goes on
        step, tensors, pushed, nbytes = item
        session, meta = live.session, live.meta
        try:
            if 0 <= step.step_id <= live.last_done:
                return None  # the other copy of this step got here first
            live.steps, live.pushed_first = live.steps + 1, live.pushed_first + pushed
            hidden, position_ids, mask, _ = _unpack(tensors, 2, step.has_mask)
            session.check(hidden, position_ids, mask)
            if len(step.push_to) >= self.span.config.num_hidden_layers:  # a route has fewer hops than blocks
                raise compute.BadRequest(f"push_to names {len(step.push_to)} servers")
            batch, q = hidden.shape[:2]
            # A long step runs in chunks (see Scheduler.step), except one that must run alone.
            chunk = q if session.batch_key(q) is None else min(q, self.scheduler.prefill_chunk)
            self.limits.check_attention(batch, chunk, session.length + q)
            with self.limits.tokens(peer, batch * q):
                pages = live.kv.pages_for(session.length + q)
                if pages:
                    await self.memory.acquire(pages * live.kv.page_bytes, f"step {step.step_id} of session {meta.session_id[:8]}")
                    live.held, live.kv.capacity = live.held + pages * live.kv.page_bytes, live.kv.capacity + pages * self.page_tokens
                out = self._tamper(await self.scheduler.step(session, hidden, position_ids, mask, peer=peer))
                self._count(peer, session.span, batch * q)
        except _STEP_ERRORS as e:
            if pushed:
                logger.debug("pushed step %d of session %s refused: %s", step.step_id, meta.session_id[:8], e)
                return None
            return _error(e)  # the session's cache is unchanged; the client may go on
        finally:
            self.limits.release_bytes(peer, nbytes)
        live.tokens += batch * q
        live.last_done = max(live.last_done, step.step_id)
        if step.push_to:
            asyncio.create_task(self._push(meta, step, out, position_ids, mask))
        return wire.response(StepDone(step_id=step.step_id, length=session.length), out, compression=meta.compression)

    def _close(self, live: _Live, inbox: asyncio.Queue | None, peer: str) -> None:
        """Free everything a session held: its cache, its place in the scheduler, its waiting steps' bytes."""
        meta = live.meta
        self.scheduler.forget(live.session)
        self.memory.release(live.held)
        self.active_sessions -= 1
        key = (meta.session_id, meta.start)
        # Only this stream's own inbox: a client that reopened the session here may already have a new one.
        if inbox is not None and self.inboxes.get(key) is inbox:
            del self.inboxes[key]
        while inbox is not None and not inbox.empty():
            item = inbox.get_nowait()
            if isinstance(item, tuple):
                self.limits.release_bytes(peer, item[3])
        logger.info("session %s closed after %d steps, %d of them pushed by the previous server first "
                    "(server total: %d steps in %d passes)", meta.session_id[:8], live.steps, live.pushed_first,
                    self.scheduler.steps_run, self.scheduler.passes_run)

    def _streamed(self, fn):
        """Adapt a unary handler to the split-message streams that forward and backward use (see wire.split).

        Parts count against the peer's byte limit as they arrive, so an oversized or endless request is refused
        before it is held whole, and one that does not arrive within `session_timeout` is dropped. A refused
        request is still read to its end (and discarded): the caller reads the reply only once it has sent
        everything, so that is how it gets the typed refusal rather than a broken stream."""

        async def handler(requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
            peer, parts, held, refusal = str(context.remote_id), [], 0, None
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
                reply = _error(refusal) if refusal is not None else await fn(wire.join(parts), context)
            except TimeoutError:
                reply = wire.error_response(ErrorCode.SESSION_TIMEOUT, f"request not received within {self.session_timeout}s")
            except Exception as e:
                reply = _error(e)
            finally:
                self.limits.release_bytes(peer, held)
            for part in wire.split(reply):
                yield part

        return handler

    def _tamper(self, out: torch.Tensor) -> torch.Tensor:
        """TEST ONLY (`--test-corrupt-outputs`): what a faulty or malicious server returns, to test verification."""
        if not self.corrupt:
            return out
        return out + self.corrupt * out.float().std() * torch.randn_like(out)

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
            self.limits.admit(str(context.remote_id))
            meta, tensors = _parse(request, Push)
            _unpack(tensors, 2, meta.step.has_mask)  # the rest is checked when the session runs the step
            inbox = self.inboxes.get((meta.session_id, meta.start))
            if inbox is None:
                raise compute.NotServing(f"no session {meta.session_id[:8]} here")
            try:
                inbox.put_nowait((meta.step, tensors, True, 0))
            except asyncio.QueueFull:  # a push only saves time: the client's own copy of the step follows
                raise RateLimited(f"session {meta.session_id[:8]} has {inbox.qsize()} steps waiting") from None
            return wire.response(Pushed())
        except Exception as e:
            return _error(e)


@dataclass
class _Live:
    """An open session on this server, with what its stream must release when it ends."""

    meta: OpenSession
    session: Session
    held: int  # cache bytes granted to it
    steps: int = 0
    pushed_first: int = 0
    tokens: int = 0
    last_done: int = -1  # the highest step id run

    @property
    def kv(self) -> SessionKV:
        return self.session.kv


async def _pump(requests: AsyncIterator[runtime_pb2.ExpertRequest], inbox: asyncio.Queue, limits: PeerLimits,
                peer: str) -> None:
    """Client messages into the session's inbox: (Step, tensors, pushed=False, bytes held against the peer's
    limit), an exception for a malformed or refused one, None at the end. It waits while the inbox is full,
    so that a client sending faster than its steps run is held back by the transport."""
    try:
        async for msg in requests:
            size = msg.ByteSize()
            try:
                limits.hold_bytes(peer, size)
            except RateLimited as e:
                await inbox.put(e)
                continue
            try:
                item = (*_parse(msg, Step), False, size)
            except wire.ProtocolError as e:
                limits.release_bytes(peer, size)
                item = e
            try:
                await inbox.put(item)
            except BaseException:  # cancelled while waiting: the session is over, and so is this step
                limits.release_bytes(peer, size if isinstance(item, tuple) else 0)
                raise
    except Exception as e:  # the stream broke: the session ends as if the client had closed it
        logger.debug("session stream ended: %r", e)
    await inbox.put(None)


async def _drain(requests: AsyncIterator[runtime_pb2.ExpertRequest], seconds: float) -> None:
    """Read and drop what a refused client still sends, until it closes its side or `seconds` pass."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(seconds):
            async for _ in requests:
                pass


def _unpack(tensors: list, n_required: int, has_mask: bool, has_prompts: bool = False) -> tuple:
    """(required..., mask or None, prompts or None) out of a request's tensors, checking their count."""
    expected = n_required + int(has_mask) + int(has_prompts)
    if len(tensors) != expected:
        raise compute.BadRequest(f"expected {expected} tensors, got {len(tensors)}")
    mask = tensors[n_required] if has_mask else None
    prompts = tensors[-1] if has_prompts else None
    return (*tensors[:n_required], mask, prompts)
