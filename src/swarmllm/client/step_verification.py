"""Verification of an inference session's steps (`ClientConfig.verify`; the rules are in verification.py).

A checked step goes to the primary server and, at the same time, to a checker: a second server holding the
same blocks, which follows the primary's history. On a mismatch a third server decides (`verdict`): the
offender is reported and avoided, and a primary caught lying is replaced by its checker, which already
holds the session's whole history.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import torch

from swarmllm.client.routing import Hop
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.client.server_stream import ServerStream, catch_up, close_all
from swarmllm.client.verification import VerificationError, relative_error, verdict
from swarmllm.wire import Blame, blame

logger = logging.getLogger(__name__)


class StepVerifier:
    """Checks one session's steps. `open_one(stream)` opens a stream as the session opens its own (same
    tuning and prompts); `label()` names the session in logs (its id can change: see `_restart`)."""

    def __init__(self, manager: SequenceManager, open_one: Callable[[ServerStream], Awaitable[None]],
                 label: Callable[[], str]):
        self.manager, self._open_one, self._label = manager, open_one, label
        self._rng = random.Random()

    def due(self, s: ServerStream) -> bool:
        """Whether this step of `s` is checked: its first always, then the configured fraction."""
        fraction = self.manager.config.verify
        return fraction > 0 and (not s.checked_once or self._rng.random() < fraction)

    async def checker(self, s: ServerStream) -> ServerStream | None:
        """The stream checking `s`, opened on first use; None if no other server can check it now."""
        s.checked_once = True
        try:
            s.checker = s.checker or await self._open_checker(s.hop, {s.hop.peer_id})
        except Exception as e:  # the checker failed, not the primary: this step goes unchecked
            logger.warning("session %s: could not open a checker for blocks %d:%d: %r", self._label(),
                           s.hop.start, s.hop.end, e)
            s.checker = None
        return s.checker

    async def compare(self, s: ServerStream, out: torch.Tensor,
                      second: torch.Tensor | BaseException) -> tuple[torch.Tensor, ServerStream]:
        """Compare `s`'s output for this step with its checker's; on a mismatch a third server decides.
        Returns the output the majority vouches for, and the stream that holds these blocks from now on:
        `s`, or its checker if `s` was caught (then reported and closed)."""
        tolerance = self.manager.config.verify_tolerance
        checker = s.checker
        assert checker is not None  # the step was sent to it
        while isinstance(second, BaseException):  # the checker failed, not the primary: check on another one
            logger.warning("session %s: could not check blocks %d:%d on %s: %r", self._label(), s.hop.start,
                           s.hop.end, checker.hop.peer_id[-8:], second)
            self.manager.ban(checker.hop.peer_id, repr(second))
            await close_all([checker])
            s.checker = await self._open_checker(s.hop, {s.hop.peer_id})
            if s.checker is None:  # no other holder answers: this step goes unchecked (with a warning)
                return out, s
            checker = s.checker
            try:  # the new checker catches up on the whole history, this step included
                second = await catch_up(checker, s.history)
                checker.fed = len(s.history)
            except Exception as e:
                second = e
        error = relative_error(out, second)
        if error <= tolerance:
            return out, s
        logger.warning("session %s: servers %s and %s disagree on blocks %d:%d (relative error %.3g); asking a third",
                       self._label(), s.hop.peer_id[-8:], checker.hop.peer_id[-8:], s.hop.start, s.hop.end, error)
        third = await self._referee(s, checker)
        if verdict(out, second, third, tolerance, f"blocks {s.hop.start}:{s.hop.end}") == "primary":
            self.manager.report(s.hop.peer_id, s.hop.start, s.hop.end, error, tolerance)
            checker.checked_once, s.checker = True, None
            await close_all([s])
            return second, checker  # it already holds the session's whole history
        self.manager.report(checker.hop.peer_id, s.hop.start, s.hop.end, error, tolerance)
        s.checker = None
        await close_all([checker])
        return out, s

    async def _referee(self, s: ServerStream, checker: ServerStream) -> torch.Tensor | None:
        """A third server's output for the checked step; None if no other server holds the blocks."""
        try:
            referee = await self._open_checker(s.hop, {s.hop.peer_id, checker.hop.peer_id})
        except Exception as e:
            raise VerificationError(f"could not reach a third server for blocks {s.hop.start}:{s.hop.end}: {e!r}") from e
        if referee is None:
            return None
        try:
            return await catch_up(referee, s.history)  # (the history includes the step being checked)
        except Exception as e:
            raise VerificationError(f"the third server for blocks {s.hop.start}:{s.hop.end} failed: {e!r}") from e
        finally:
            await close_all([referee])

    async def _open_checker(self, hop: Hop, exclude: set[str]) -> ServerStream | None:
        """A session on another server that holds all of `hop`'s blocks in the same dtype, quantization and
        version, nearest first; one that fails to open is avoided for a while and the next is tried. None (with
        a warning) if none opens."""
        for peer in self.manager.checkers(hop.peer_id, hop.start, hop.end):
            if peer in exclude:
                continue
            stream = ServerStream(self.manager, Hop(peer, hop.start, hop.end))
            try:
                await self._open_one(stream)
                return stream
            except Exception as e:
                if blame(e) == Blame.CALLER:
                    raise  # the request, not the server: every holder would refuse it
                logger.warning("session %s: could not open a checker on %s: %r", self._label(), peer[-8:], e)
                self.manager.ban(peer, repr(e))
                await close_all([stream])
        logger.warning("session %s: no other server could check blocks %d:%d: this step is not verified",
                       self._label(), hop.start, hop.end)
        return None
