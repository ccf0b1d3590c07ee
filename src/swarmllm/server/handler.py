"""RPC glue: turn hivemind P2P messages into calls of `compute`, and errors into typed replies.

All torch work runs on one compute thread, so the event loop keeps serving the network (and other
sessions' messages) while a step computes. A failing request gets an `ErrorReply`; the server goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.models.span import Span
from swarmllm.protocol import (
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    ErrorCode,
    OpenSession,
    ServerRecord,
    SessionOpened,
    SpanReply,
    SpanRequest,
    Step,
    StepDone,
)
from swarmllm.server import compute
from swarmllm.server.cache import CacheBudget, CacheFullError

logger = logging.getLogger(__name__)

_ERRORS = {
    compute.BadRequest: ErrorCode.BAD_REQUEST,
    wire.ProtocolError: ErrorCode.BAD_REQUEST,
    CacheFullError: ErrorCode.CACHE_FULL,
    compute.TooLong: ErrorCode.TOO_LONG,
}


def _error(e: Exception) -> runtime_pb2.ExpertResponse:
    code = _ERRORS.get(type(e), ErrorCode.INTERNAL)
    if code == ErrorCode.INTERNAL:
        logger.exception("internal error while serving a request")
    return wire.error_response(code, str(e))


class Handler:
    """Serves `info`, `forward`, `backward` and `inference` for one span."""

    def __init__(self, span: Span, budget: CacheBudget, session_timeout: float, record: Callable[[], ServerRecord]):
        self.span, self.budget, self.session_timeout, self.record = span, budget, session_timeout, record
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.active_sessions = 0

    async def register(self, p2p: P2P) -> None:
        await p2p.add_protobuf_handler(RPC_INFO, self.rpc_info, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(RPC_FORWARD, self.rpc_forward, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(RPC_BACKWARD, self.rpc_backward, runtime_pb2.ExpertRequest)
        await p2p.add_protobuf_handler(
            RPC_INFERENCE, self.rpc_inference, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )

    async def _compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return wire.response(self.record())

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            meta, tensors = wire.parse(request, SpanRequest)
            hidden, position_ids, mask = _unpack(tensors, 2, meta.has_mask)
            span = compute.sub_span(self.span, meta.start, meta.end)
            out = await self._compute(compute.forward, span, hidden, position_ids, mask)
            return wire.response(SpanReply(), out)
        except Exception as e:
            return _error(e)

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            meta, tensors = wire.parse(request, SpanRequest)
            hidden, position_ids, grad_out, mask = _unpack(tensors, 3, meta.has_mask)
            span = compute.sub_span(self.span, meta.start, meta.end)
            grad_in = await self._compute(compute.backward, span, hidden, position_ids, grad_out, mask)
            return wire.response(SpanReply(), grad_in)
        except Exception as e:
            return _error(e)

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One session per stream: open (admission), then steps until the client closes or goes idle."""
        reserved = 0
        try:
            first = await asyncio.wait_for(anext(requests), self.session_timeout)
            meta, _ = wire.parse(first, OpenSession)
            span = compute.sub_span(self.span, meta.start, meta.end)
            self.budget.reserve(meta.batch_size * meta.max_length)
            reserved = meta.batch_size * meta.max_length
            self.active_sessions += 1
            session = compute.SessionCache(span, meta.batch_size, meta.max_length)
            logger.info("session %s opened by %s: blocks %d:%d, %d tokens", meta.session_id[:8],
                        str(context.remote_id)[-8:], meta.start, meta.end, reserved)
            yield wire.response(SessionOpened(session_id=meta.session_id, cache_tokens=reserved))
            while True:
                try:
                    msg = await asyncio.wait_for(anext(requests), self.session_timeout)
                except StopAsyncIteration:
                    return  # the client closed the session
                try:
                    step, tensors = wire.parse(msg, Step)
                    hidden, position_ids, mask = _unpack(tensors, 2, step.has_mask)
                    out = await self._compute(session.step, hidden, position_ids, mask)
                    yield wire.response(StepDone(step_id=step.step_id, length=session.length), out)
                except (compute.BadRequest, compute.TooLong, wire.ProtocolError) as e:
                    yield _error(e)  # the session's cache is unchanged; the client may go on
        except StopAsyncIteration:
            return
        except TimeoutError:
            logger.info("session from %s timed out; freeing its cache", str(context.remote_id)[-8:])
            yield wire.error_response(ErrorCode.SESSION_TIMEOUT, f"no message for {self.session_timeout}s")
        except Exception as e:
            yield _error(e)
        finally:
            if reserved:
                self.budget.release(reserved)
                self.active_sessions -= 1


def _unpack(tensors: list, n_required: int, has_mask: bool) -> tuple:
    expected = n_required + int(has_mask)
    if len(tensors) != expected:
        raise compute.BadRequest(f"expected {expected} tensors, got {len(tensors)}")
    mask = tensors[n_required] if has_mask else None
    return (*tensors[:n_required], mask)
