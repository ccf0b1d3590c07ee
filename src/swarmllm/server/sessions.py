"""Inference sessions: the `inference` stream and the `push` RPC that feeds it, for one server.

A session lives as long as its stream. Its steps arrive in one inbox, from the client's stream and (with
push) from the previous server of the route, and a step already run is skipped, whichever copy came first.
It reads the server's state from a `ServingContext` (server/context.py), as `Handler` does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.protocol import (
    RPC_PUSH,
    ErrorCode,
    OpenSession,
    Push,
    Pushed,
    SessionOpened,
    Step,
    StepDone,
)
from swarmllm.server import compute
from swarmllm.server.cache import CacheFullError, SessionKV
from swarmllm.server.context import ServingContext
from swarmllm.server.inference import Session
from swarmllm.server.limits import PeerLimits, RateLimited
from swarmllm.server.replies import error_code, parse_request, unpack

logger = logging.getLogger(__name__)

# A session survives these in one of its steps: nothing was run, and its cache is as before the step.
_STEP_ERRORS = (compute.BadRequest, compute.TooLong, wire.ProtocolError, CacheFullError, RateLimited)
# Steps waiting in a session's inbox. An honest client has one in flight (two with push), so this never
# slows it; a flooding one waits for the transport instead of filling the server's memory.
INBOX_STEPS = 8
# Seconds a refused session's stream stays open for the client to close its side: closing ours first would
# break the pipe of a client still sending, and it would see that instead of the typed refusal.
REFUSAL_GRACE = 1.0


class Sessions:
    """Serves `inference` and `push` for a server, and counts the sessions open on it.

    It reads the span from the context at each session's opening, so a server whose span changes (a
    rebalance) serves its next sessions on the new span. Every session it admits is
    counted in `active` until its stream ends, and everything the session held is released by then.
    """

    def __init__(self, context: ServingContext):
        self.context = context
        self.p2p: P2P | None = None  # set when registered: pushes to the next server go through it
        self.active = 0
        # Pushes in flight: the event loop keeps only weak references to tasks, so one held nowhere else could
        # be collected before it runs.
        self._pushes: set[asyncio.Task] = set()
        self.inboxes: dict[tuple[str, int], asyncio.Queue] = {}  # (session id, first block) -> step inbox

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One session per stream: open (admission), then steps until the client closes or goes idle.

        Admission: a peer over its session or rate limit is refused first. A session that could never fit is
        refused at once; otherwise it waits in the memory queue for its first page. Its cache then grows page
        by page as steps arrive (each may wait in the queue too), and all of it is freed when the stream
        ends, whatever the reason. A refused step leaves the session as it was."""
        c = self.context
        inbox: asyncio.Queue | None = None
        peer, meta, live, reader, counted = str(context.remote_id), None, None, None, False
        began, outcome = time.monotonic(), "ok"
        c.metrics.request("inference")
        try:
            c.limits.admit(peer)
            c.limits.open_session(peer)
            counted = True
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result, and drops a cancellation
            # (the client's stream closed), when both come at once; the session then ran on until it timed out.
            async with asyncio.timeout(c.session_timeout):
                first = await anext(requests)
            meta, tensors = parse_request(first, OpenSession, c.device)
            live = await self._open(meta, tensors, peer)
            self.active += 1
            logger.info("session %s opened by %s: blocks %d:%d, up to %d x %d tokens", meta.session_id[:8],
                        peer[-8:], meta.start, meta.end, meta.batch_size, meta.max_length)
            yield wire.response(SessionOpened(session_id=meta.session_id, cache_tokens=live.kv.capacity * meta.batch_size))
            # Steps come from the client's stream and, with push, from the previous server: both feed one
            # inbox, and a step already run (pushed first, or sent first by the client) is skipped.
            inbox = asyncio.Queue(INBOX_STEPS)
            reader = asyncio.create_task(_pump(requests, inbox, c.limits, peer, c.device))
            self.inboxes[(meta.session_id, meta.start)] = inbox
            while True:
                async with asyncio.timeout(c.session_timeout):
                    item = await inbox.get()
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
            yield c.reply_timeout(f"no message for {c.session_timeout}s")
        except Exception as e:
            outcome = error_code(e).value
            yield c.reply_error(e)
            if reader is None:  # refused before its steps were read: let the client close its side first
                await wire.drain(requests, REFUSAL_GRACE)
        finally:
            if reader is not None:
                reader.cancel()
            if counted:
                c.limits.close_session(peer)
            if meta is not None:
                c.audit.record(peer, "inference", meta.start, meta.end, live.tokens if live else 0, outcome, began,
                               live.steps if live else 0)
            if live is not None:
                self._close(live, inbox, peer)

    async def _open(self, meta: OpenSession, tensors: list, peer: str) -> _Live:
        """Admit a session: check what it declares, resolve its tuning, then wait for its first cache page."""
        c = self.context
        span, pool = c.spans.sub_span(meta.start, meta.end), c.spans.pool
        if len(tensors) != int(meta.tuning.prompts):
            raise compute.BadRequest(f"OpenSession carries {int(meta.tuning.prompts)} tensors, got {len(tensors)}")
        prompts = tensors[0] if tensors else None
        compute.check_prompt_shape(span, meta.batch_size, meta.max_length, prompts)
        extras = await c.tuning.extras(meta.tuning, span, peer, prompts)
        what = f"a session of {meta.batch_size} x {meta.max_length} tokens on blocks {meta.start}:{meta.end}"
        assert pool is not None  # it comes with the span
        c.memory.check_possible(pool.bytes_for(meta.batch_size, meta.max_length), what)  # before any per-row state
        kv = SessionKV(pool, span, meta.batch_size, limit=meta.max_length)
        await kv.reserve(c.memory, 1, what)  # its first page
        return _Live(meta, Session(span, meta.batch_size, meta.max_length, kv, extras))

    async def _step(self, live: _Live, item, peer: str) -> runtime_pb2.ExpertResponse | None:
        """Run one inbox item of a session; the reply for the client, or None when there is none: a copy of
        a step already run, or a pushed copy that was refused (the client's own copy follows)."""
        c = self.context
        if isinstance(item, Exception):
            return c.reply_error(item)  # the client's message was malformed or over a limit; the session goes on
        step, tensors, pushed, nbytes = item
        session, meta = live.session, live.meta
        try:
            if 0 <= step.step_id <= live.last_done:
                return None  # the other copy of this step got here first
            live.steps, live.pushed_first = live.steps + 1, live.pushed_first + pushed
            hypo_ids = tensors[-1] if step.has_hypo_ids and tensors else None
            hidden, position_ids, mask, _ = unpack(tensors[:-1] if step.has_hypo_ids else tensors, 2, step.has_mask)
            # Everything is checked before anything changes, so that a refused step leaves the session as it
            # was: a rewind (`keep`) and a beam reorder take effect only once the step is admitted.
            past = session.length if step.keep is None else step.keep
            if not 0 <= past <= session.length:
                raise compute.BadRequest(f"keep={step.keep}, but the session holds {session.length} tokens")
            session.check(hidden, position_ids, mask, past)
            batch, q = hidden.shape[:2]  # (checked above: a malformed tensor is a bad request, not an error)
            if hypo_ids is not None:
                compute.check_hypo_ids(hypo_ids, session.batch_size)
            if len(step.push_to) >= session.span.config.num_hidden_layers:  # a route has fewer hops than blocks
                raise compute.BadRequest(f"push_to names {len(step.push_to)} servers")
            c.limits.check_attention(batch, c.scheduler.chunk_size(session, q), past + q)
            with c.limits.tokens(peer, batch * q):
                await live.kv.prepare(c.memory, past, past + q, None if hypo_ids is None else hypo_ids.tolist(),
                                      f"step {step.step_id} of session {meta.session_id[:8]}")
                t0 = time.perf_counter()
                out = c.faults.tamper(await c.scheduler.step(session, hidden, position_ids, mask, peer=peer))
                c.count(peer, session.span, batch * q, "inference", time.perf_counter() - t0)
        except _STEP_ERRORS as e:
            if pushed:
                logger.debug("pushed step %d of session %s refused: %s", step.step_id, meta.session_id[:8], e)
                return None
            return c.reply_error(e)  # the session's cache is unchanged; the client may go on
        finally:
            c.limits.release_bytes(peer, nbytes)
        live.tokens += batch * q
        live.last_done = max(live.last_done, step.step_id)
        if step.push_to:
            push = asyncio.create_task(self._push(meta, step, out, position_ids, mask))
            self._pushes.add(push)
            push.add_done_callback(self._pushes.discard)
        return wire.response(StepDone(step_id=step.step_id, length=session.length), out, compression=meta.compression)

    def _close(self, live: _Live, inbox: asyncio.Queue | None, peer: str) -> None:
        """Free everything a session held: its cache, its place in the scheduler, its waiting steps' bytes."""
        c, meta = self.context, live.meta
        c.scheduler.forget(live.session)
        live.kv.release(c.memory)
        self.active -= 1
        key = (meta.session_id, meta.start)
        # Only this stream's own inbox: a client that reopened the session here may already have a new one.
        if inbox is not None and self.inboxes.get(key) is inbox:
            del self.inboxes[key]
        while inbox is not None and not inbox.empty():
            item = inbox.get_nowait()
            if isinstance(item, tuple):
                c.limits.release_bytes(peer, item[3])
        logger.info("session %s closed after %d steps, %d of them pushed by the previous server first "
                    "(server total: %d steps in %d passes)", meta.session_id[:8], live.steps, live.pushed_first,
                    c.scheduler.steps_run, c.scheduler.passes_run)

    async def _push(self, meta: OpenSession, step: Step, out, position_ids, mask) -> None:
        """Send this step's output to the next server of the route, in the session's compression. Best
        effort: if it fails, the next server gets the same input from the client a moment later."""
        c = self.context
        nxt = Step(step_id=step.step_id, has_mask=mask is not None, push_to=step.push_to[1:])
        push = Push(session_id=meta.session_id, start=meta.end, step=nxt)
        msg = wire.request(push, out, position_ids, *([mask] if mask is not None else []), compression=meta.compression)
        c.membership.stamp(msg)
        assert self.p2p is not None  # registered before any session could open
        try:
            await asyncio.wait_for(self.p2p.call_protobuf_handler(
                PeerID.from_base58(step.push_to[0]), RPC_PUSH, msg, runtime_pb2.ExpertResponse
            ), c.session_timeout)
        except Exception as e:
            logger.debug("push of step %d to %s failed: %r", step.step_id, step.push_to[0][-8:], e)

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Take a step pushed by the previous server of a session's route into that session's inbox."""
        self.context.metrics.request("push")
        try:
            self.context.limits.admit(str(context.remote_id))
            meta, tensors = parse_request(request, Push, self.context.device)
            unpack(tensors, 2, meta.step.has_mask)  # the rest is checked when the session runs the step
            inbox = self.inboxes.get((meta.session_id, meta.start))
            if inbox is None:
                raise compute.NotServing(f"no session {meta.session_id[:8]} here")
            try:
                inbox.put_nowait((meta.step, tensors, True, 0))
            except asyncio.QueueFull:  # a push only saves time: the client's own copy of the step follows
                raise RateLimited(f"session {meta.session_id[:8]} has {inbox.qsize()} steps waiting") from None
            return wire.response(Pushed())
        except Exception as e:
            return self.context.reply_error(e)


@dataclass
class _Live:
    """An open session on this server, with what its stream must release when it ends."""

    meta: OpenSession
    session: Session
    steps: int = 0
    pushed_first: int = 0
    tokens: int = 0
    last_done: int = -1  # the highest step id run

    @property
    def kv(self) -> SessionKV:
        return self.session.kv


async def _pump(requests: AsyncIterator[runtime_pb2.ExpertRequest], inbox: asyncio.Queue, limits: PeerLimits,
                peer: str, device: torch.device) -> None:
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
            item: tuple | wire.ProtocolError
            try:
                item = (*parse_request(msg, Step, device), False, size)
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
