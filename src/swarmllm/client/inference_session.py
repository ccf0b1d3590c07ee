"""A client-side inference session: one long-lived stream per server of a route, one message per step.

Servers keep the attention caches of the session's blocks; the client sends only the new tokens' hidden
states each step. A whole step (all hops) runs as one coroutine on the I/O loop, so a step costs one
thread hand-off plus one round trip per server.

Failure: if a server is gone or refuses when the session opens, it is banned and another route is tried
(up to `max_retries`). A server that fails *mid-session* ends the session with `SessionFailedError`
(transparent failover with history replay is a later feature).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

import torch

from swarmllm import wire
from swarmllm.client import loop
from swarmllm.client.routing import Hop, MissingBlocksError
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.protocol import RPC_INFERENCE, ErrorCode, OpenSession, SessionOpened, Step, StepDone, Tuning

logger = logging.getLogger(__name__)


class SessionFailedError(RuntimeError):
    pass


class PromptTooLongError(ValueError):
    pass


_NOT_THE_SERVERS_FAULT = (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LONG, ErrorCode.SESSION_TIMEOUT)


class _HopFailed(Exception):
    """Which server of a route failed; the cause is the original error."""

    def __init__(self, hop: Hop):
        super().__init__(f"server {hop.peer_id[-8:]} (blocks {hop.start}:{hop.end}) failed")
        self.hop = hop


class _ServerStream:
    """The stream to one server: requests go through a queue, replies come from the response iterator."""

    def __init__(self, manager: SequenceManager, hop: Hop):
        self.manager, self.hop = manager, hop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.replies = None

    async def _requests(self):
        while (msg := await self.queue.get()) is not None:
            yield msg

    async def open(self, meta: OpenSession, tensors: list[torch.Tensor] = ()) -> None:
        self.queue.put_nowait(wire.request(meta, *tensors))
        self.replies = await self.manager.open_stream(self.hop.peer_id, RPC_INFERENCE, self._requests())
        wire.parse(await self._next(), SessionOpened, self.hop.peer_id)

    async def _next(self):
        try:
            return await asyncio.wait_for(anext(self.replies), self.manager.config.request_timeout)
        except StopAsyncIteration:
            raise ConnectionError(f"server {self.hop.peer_id[-8:]} closed the session") from None

    async def step(self, step_id: int, hidden, position_ids, mask) -> torch.Tensor:
        tensors = (hidden, position_ids) + ((mask,) if mask is not None else ())
        self.queue.put_nowait(wire.request(Step(step_id=step_id, has_mask=mask is not None), *tensors))
        done, (out,) = wire.parse(await self._next(), StepDone, self.hop.peer_id)
        if done.step_id != step_id:
            raise wire.ProtocolError(f"reply to step {done.step_id}, expected {step_id}")
        return out

    async def close(self) -> None:
        self.queue.put_nowait(None)
        if self.replies is not None:
            try:
                await self.replies.aclose()
            except Exception:  # the stream may already be broken; closing is best-effort
                pass


class InferenceSession:
    """A generation session over blocks `[start, end)` with server-side attention caches.

    Guarantees: `position` counts the tokens every server's cache holds; a step longer than the declared
    `max_length` is refused on the client before anything is sent. The servers' memory is released when the
    session closes (or, if the client vanishes, when it times out on the servers).
    """

    def __init__(
        self, manager: SequenceManager, start: int, end: int, max_length: int, batch_size: int | None = None,
        extras: Callable[[Hop], Awaitable[tuple[Tuning, list[torch.Tensor]]]] | None = None,
    ):
        self.manager, self.start, self.end, self.extras = manager, start, end, extras
        self.max_length, self.batch_size = max_length, batch_size
        self.session_id = uuid.uuid4().hex
        self.position = 0
        self.prefix = 0  # prompt-tuning tokens the caches hold before the first real token
        self._streams: list[_ServerStream] = []
        self._step_id = 0
        self.closed = False
        # Token history kept by `generate` to continue the session in a later call.
        self.output_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None

    @property
    def route(self) -> list[Hop]:
        return [s.hop for s in self._streams]

    def _open(self, batch_size: int) -> None:
        self.batch_size = batch_size
        retries = self.manager.config.max_retries
        full: dict[str, Exception] = {}  # servers whose cache cannot hold this session: healthy, not banned
        for attempt in range(retries + 1):
            try:
                route = self.manager.make_route(self.start, self.end, exclude=frozenset(full))
            except MissingBlocksError:
                if not full:
                    raise
                raise SessionFailedError(f"no server can hold this session: {list(full.values())[-1]}") from None
            streams = [_ServerStream(self.manager, hop) for hop in route]
            try:
                loop.run(self._open_all(streams))
                self._streams = streams
                logger.debug("session %s opened on %s", self.session_id[:8], route)
                return
            except _HopFailed as failed:
                loop.run(self._close_all(streams))
                error = failed.__cause__
                if isinstance(error, wire.RemoteError) and error.code in (ErrorCode.BAD_REQUEST, ErrorCode.ADAPTER):
                    raise error from None  # our request is wrong: no other server would accept it either
                if isinstance(error, wire.RemoteError) and error.code == ErrorCode.CACHE_FULL:
                    full[failed.hop.peer_id] = error
                    continue
                self.manager.ban(failed.hop.peer_id, repr(error))
                if attempt == retries:
                    raise SessionFailedError(
                        f"could not open a session for blocks {self.start}:{self.end} after {retries + 1} attempts; "
                        f"last error: {error}"
                    ) from error

    async def _open_all(self, streams: list[_ServerStream]) -> None:
        for s in streams:  # in order, so that a failure names the first bad server
            try:
                tuning, tensors = await self.extras(s.hop) if self.extras is not None else (Tuning(), [])
                meta = OpenSession(
                    session_id=self.session_id, start=s.hop.start, end=s.hop.end, batch_size=self.batch_size,
                    max_length=self.max_length, tuning=tuning,
                )
                await s.open(meta, tensors)
            except Exception as e:
                raise _HopFailed(s.hop) from e

    async def _step_all(self, hidden, position_ids, mask) -> torch.Tensor:
        for s in self._streams:
            try:
                hidden = await s.step(self._step_id, hidden, position_ids, mask)
            except Exception as e:
                raise _HopFailed(s.hop) from e
        return hidden

    def step(
        self,
        hidden: torch.Tensor,  # (batch, seq, hidden)
        position_ids: torch.Tensor,  # (batch, seq)
        attention_mask: torch.Tensor | None = None,  # (batch, position + seq), None if no padding
    ) -> torch.Tensor:
        if self.closed:
            raise SessionFailedError("the inference session is closed")
        if self.position + hidden.shape[1] > self.max_length:
            raise PromptTooLongError(
                f"{self.position + hidden.shape[1]} tokens exceed the session's max_length={self.max_length}"
            )
        if not self._streams:
            self._open(hidden.shape[0])
        try:
            out = loop.run(self._step_all(hidden, position_ids, attention_mask))
        except _HopFailed as failed:
            # Earlier servers of the route have already extended their caches with this step, so the
            # session cannot simply go on: it is closed, and the failing server is avoided from now on.
            self.close()
            error = failed.__cause__
            # A server that refused our request or timed out our idle session is healthy: no ban.
            if not (isinstance(error, wire.RemoteError) and error.code in _NOT_THE_SERVERS_FAULT):
                self.manager.ban(failed.hop.peer_id, repr(error))
            raise SessionFailedError(f"server {failed.hop.peer_id[-8:]} failed mid-session: {error}") from error
        self._step_id += 1
        self.position += hidden.shape[1]
        return out

    async def _close_all(self, streams: list[_ServerStream]) -> None:
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                loop.run(self._close_all(self._streams), timeout=10)
            except Exception:
                logger.debug("closing session %s", self.session_id[:8], exc_info=True)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
