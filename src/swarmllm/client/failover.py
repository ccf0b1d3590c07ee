"""Failover for an inference session: opening a route whose servers all answer, and replacing a server that
fails mid-session.

Opening: servers that fail are banned and another route is tried; servers that are full are skipped, not
banned. Mid-session: the session's streams keep every input their server took (`ServerStream.history`);
a failed server's blocks are routed to other servers, the history is replayed there to rebuild their caches,
and the step resumes at that hop. What a failure blames (`wire.blame`) decides what happens: the request
ends the session, a busy server is retried after a pause, an expired session is reopened elsewhere, and a
faulty server is banned for a while.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import torch

from swarmllm.client.routing import Hop, MissingBlocksError
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.client.server_stream import ServerStream, close_all, joined
from swarmllm.protocol import REPLAY_STEP
from swarmllm.wire import Blame, blame

logger = logging.getLogger(__name__)

# A step through streams `first, first+1, ...` with that hop's input; it raises HopFailed.
StepFrom = Callable[[int, torch.Tensor], Awaitable[torch.Tensor]]


class SessionFailedError(RuntimeError):
    pass


class HopFailed(Exception):
    """Which server of a route failed (and, mid-step, its position and input); the cause is the error."""

    def __init__(self, hop: Hop, index: int = 0, hidden_in: torch.Tensor | None = None):
        super().__init__(f"server {hop.peer_id[-8:]} (blocks {hop.start}:{hop.end}) failed")
        self.hop, self.index, self.hidden_in = hop, index, hidden_in

    @property
    def error(self) -> BaseException:
        return self.__cause__ or self  # (always raised from its cause)


class Failover:
    """Opens and repairs the routes of one session. `open_one` sends a new stream its `OpenSession`; `label`
    names the session in logs."""

    def __init__(self, manager: SequenceManager, open_one: Callable[[ServerStream], Awaitable[None]],
                 label: Callable[[], str]):
        self.manager, self._open_one, self._label = manager, open_one, label

    async def open_route(self, start: int, end: int, history: list) -> list[ServerStream]:
        """Streams over a route for blocks [start, end), opened and fed `history` (a replaced server's inputs).

        It gives up only after `max_failovers` failed routes *and* `missing_blocks_timeout` seconds, or when
        some block has had no usable server for `missing_blocks_timeout` (MissingBlocksError). Routes are
        planned in a worker thread: planning reads the directory, and may wait for missing blocks, neither of
        which may hold up the I/O loop.
        """
        config = self.manager.config
        deadline = time.monotonic() + config.missing_blocks_timeout
        full: dict[str, BaseException] = {}
        failures = 0
        while True:
            try:
                route = await asyncio.to_thread(self.manager.make_route, start, end, exclude=frozenset(full))
            except MissingBlocksError:
                if not full:
                    raise
                raise SessionFailedError(f"no server can hold this session: {list(full.values())[-1]}") from None
            streams = [ServerStream(self.manager, hop) for hop in route]
            try:
                await self._open_all(streams)
                await self._replay(streams, history)
                logger.debug("session %s: blocks %d:%d on %s", self._label(), start, end, route)
                return streams
            except HopFailed as failed:
                await close_all(streams)
                error = failed.error
                match blame(error):
                    case Blame.CALLER:
                        raise error from None  # our request is wrong: no other server would accept it either
                    case Blame.BUSY:
                        full[failed.hop.peer_id] = error
                        continue
                self.manager.ban(failed.hop.peer_id, repr(error))
                failures += 1
                if failures > config.max_failovers and time.monotonic() > deadline:
                    raise SessionFailedError(
                        f"could not open blocks {start}:{end} after {failures} failed routes in "
                        f"{config.missing_blocks_timeout:.0f}s; last error: {error}"
                    ) from error

    async def _open_all(self, streams: list[ServerStream]) -> None:
        for s in streams:  # in order, so that a failure names the first bad server
            try:
                await self._open_one(s)
            except Exception as e:
                raise HopFailed(s.hop) from e

    async def _replay(self, streams: list[ServerStream], history: list) -> None:
        """Feed a replaced server's past inputs to its replacements as one chunk, rebuilding their caches."""
        if not history:
            return
        hidden, positions, mask = joined(history)
        for s in streams:
            try:
                hidden = await s.step(REPLAY_STEP, hidden, positions, mask)
            except Exception as e:
                raise HopFailed(s.hop) from e

    async def step(self, streams: list[ServerStream], step_from: StepFrom, hidden: torch.Tensor) -> torch.Tensor:
        """`step_from(0, hidden)`; a hop that fails is replaced in `streams` and the step resumes there.

        Raises the error itself when the request is at fault (servers before it already took the step, so the
        session's caches disagree and it cannot go on), and SessionFailedError once busy servers refused the
        step `max_failovers` times or no replacement opens."""
        first, x, busy = 0, hidden, 0
        while True:
            try:
                return await step_from(first, x)
            except HopFailed as failed:
                error = failed.error
                match blame(error):
                    case Blame.CALLER:
                        raise error from None
                    case Blame.BUSY:
                        # Busy servers are not banned, so the same one may come back: bound the retries.
                        busy += 1
                        if busy > self.manager.config.max_failovers:
                            raise SessionFailedError(f"no server had room for this step: {error}") from None
                        await asyncio.sleep(min(1.0, 0.1 * busy))  # let a rate limit refill before trying again
                await self.replace(streams, failed.index, error)
                assert failed.hidden_in is not None  # a failure mid-step names its input
                first, x = failed.index, failed.hidden_in

    async def replace(self, streams: list[ServerStream], index: int, error: BaseException) -> None:
        """Swap `streams[index]` for a new route over its blocks, with its history replayed there."""
        old = streams[index]
        # A server that timed out our idle session, or had no room for it, is healthy (and may take the
        # session again later): only faulty servers are banned.
        if blame(error) == Blame.SERVER:
            self.manager.ban(old.hop.peer_id, repr(error))
        logger.warning("session %s: replacing server %s (blocks %d:%d) after %r", self._label(),
                       old.hop.peer_id[-8:], old.hop.start, old.hop.end, error)
        await close_all([old])
        streams[index : index + 1] = await self.open_route(old.hop.start, old.hop.end, old.history)
