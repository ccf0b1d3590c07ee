"""A client-side inference session: one long-lived stream per server of a route, one message per step.

Servers keep the attention caches of the session's blocks; the client sends only the new tokens' hidden
states each step. A whole step (all hops, and any failover it needs) runs as one coroutine on the I/O
loop, so a step costs one thread hand-off plus one round trip per server; `step` is the one synchronous
facade. Route planning, which reads the directory and may wait for servers, runs in a worker thread.

Failure: if a server is gone or refuses when the session opens, it is banned and another route is tried
(up to `max_retries`). A server that fails *mid-session* (crash, stall past `request_timeout`, error, or
its idle timeout) is replaced: the client keeps every input it sent to each server, routes that server's
blocks to other servers, replays the history there to rebuild their caches, and continues the step.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence

import torch
from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.client import loop
from swarmllm.client.positions import default_positions
from swarmllm.client.routing import Hop, MissingBlocksError
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.client.session_base import SessionBase
from swarmllm.client.verification import VerificationError, relative_error, verdict
from swarmllm.protocol import (
    BUSY_ERRORS,
    CALLER_ERRORS,
    REPLAY_STEP,
    RPC_INFERENCE,
    ErrorCode,
    OpenSession,
    SessionId,
    SessionOpened,
    Step,
    StepDone,
    Tuning,
)

logger = logging.getLogger(__name__)


class SessionFailedError(RuntimeError):
    pass


class PromptTooLongError(ValueError):
    pass


class _HopFailed(Exception):
    """Which server of a route failed (and, mid-step, its position and input); the cause is the error."""

    def __init__(self, hop: Hop, index: int = 0, hidden_in: torch.Tensor | None = None):
        super().__init__(f"server {hop.peer_id[-8:]} (blocks {hop.start}:{hop.end}) failed")
        self.hop, self.index, self.hidden_in = hop, index, hidden_in


class _ServerStream:
    """The stream to one server: requests go through a queue, replies come from the response iterator."""

    def __init__(self, manager: SequenceManager, hop: Hop):
        self.manager, self.hop = manager, hop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.replies: AsyncGenerator[runtime_pb2.ExpertResponse, None] | None = None
        # Every (hidden, position_ids, mask) this server has taken into its cache, to rebuild it elsewhere.
        self.history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        # Verification (see client/verification.py): the second server checking this one, whether this one's
        # first step was checked, and (on a checker) how many of the checked server's history entries it has.
        self.checker: _ServerStream | None = None
        self.checked_once = False
        self.fed = 0
        # Tokens the server's cache holds, which its replies must confirm; and a rewind or beam reorder to send
        # with the next step.
        self.length = 0
        self.keep: int | None = None
        self.hypo_ids: torch.Tensor | None = None

    async def _requests(self):
        while (msg := await self.queue.get()) is not None:
            yield msg

    async def open(self, meta: OpenSession, tensors: Sequence[torch.Tensor] = ()) -> None:
        self.queue.put_nowait(wire.request(meta, *tensors, compression=meta.compression))
        self.replies = await asyncio.wait_for(
            self.manager.open_stream(self.hop.peer_id, RPC_INFERENCE, self._requests()), self.manager.config.request_timeout
        )
        wire.parse(await self._next(), SessionOpened, self.hop.peer_id)

    async def _next(self) -> runtime_pb2.ExpertResponse:
        assert self.replies is not None, "the stream is not open"
        try:
            return await asyncio.wait_for(anext(self.replies), self.manager.config.request_timeout)
        except StopAsyncIteration:
            raise ConnectionError(f"server {self.hop.peer_id[-8:]} closed the session") from None

    async def step(self, step_id: int, hidden, position_ids, mask, push_to: tuple[str, ...] = (),
                   keep: int | None = None, hypo_ids: torch.Tensor | None = None) -> torch.Tensor:
        tensors = (hidden, position_ids) + ((mask,) if mask is not None else ()) + ((hypo_ids,) if hypo_ids is not None else ())
        step = Step(step_id=step_id, has_mask=mask is not None, push_to=push_to, keep=keep,
                    has_hypo_ids=hypo_ids is not None)
        self.manager.points.count(self.hop.peer_id, self.hop.end - self.hop.start, hidden.shape[0] * hidden.shape[1])
        self.queue.put_nowait(wire.request(step, *tensors, compression=self.manager.config.compression))
        done, (out,) = wire.parse(await self._next(), StepDone, self.hop.peer_id)
        if done.step_id != step_id:
            raise wire.ProtocolError(f"reply to step {done.step_id}, expected {step_id}")
        length = (self.length if keep is None else keep) + hidden.shape[1]
        if done.length != length:  # e.g. a server too old to know `keep`, which would have ignored the rewind
            raise wire.ProtocolError(f"server holds {done.length} tokens after this step, expected {length}")
        self.length, self.keep, self.hypo_ids = length, None, None
        self.history.append((hidden, position_ids, mask))
        return out

    async def close(self) -> None:
        self.queue.put_nowait(None)
        if self.replies is not None:
            try:
                await self.replies.aclose()
            except Exception:  # the stream may already be broken; closing is best-effort
                pass


class InferenceSession(SessionBase):
    """A generation session over blocks `[start, end)` with server-side attention caches.

    Guarantees: `position` counts the tokens every server's cache holds; a step longer than the declared
    `max_length` is refused on the client before anything is sent. The servers' memory is released when the
    session closes (or, if the client vanishes, when it times out on the servers).
    """

    def __init__(
        self, manager: SequenceManager, start: int, end: int, max_length: int, batch_size: int | None = None,
        extras: Callable[[Hop], Awaitable[tuple[Tuning, list[torch.Tensor]]]] | None = None,
        tuned_prompts: bool = False,
    ):
        super().__init__(max_length)
        self.manager, self.start, self.end, self.extras = manager, start, end, extras
        # Deep prompts given to the first step (`step(prompts=)`); `tuned_prompts`: the model's own are sent.
        self.prompts: torch.Tensor | None = None
        self._tuned_prompts = tuned_prompts
        self.batch_size = batch_size
        self.session_id = uuid.uuid4().hex
        # Longrope models (Phi-3 128k): the servers' caches are recomputed when the session grows past this many
        # tokens (see `_restart`); None for every other model.
        self.longrope_limit: int | None = None
        self._streams: list[_ServerStream] = []
        self._step_id = 0
        self._rng = random.Random()
        self.closed = False

    @property
    def route(self) -> list[Hop]:
        return [s.hop for s in self._streams]

    def _rewind_parts(self, n: int) -> None:
        """Every server drops its tokens after `n` as the next step begins; a replacement server gets the kept
        history only."""
        for s in self._streams:
            s.history = _truncated(s.history, n)
            s.keep = n if s.keep is None else min(s.keep, n)
        self._drop_checkers()

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        """Beam search: row i continues what row `hypo_ids[i]` was. Every server reorders its cache as the
        next step begins; the histories kept for replacements are reordered now."""
        hypo = hypo_ids.detach().to("cpu", torch.int64)
        if torch.equal(hypo, torch.arange(len(hypo))):
            return
        for s in self._streams:
            s.history = [(h[hypo.to(h.device)], p[hypo.to(p.device)], m if m is None else m[hypo.to(m.device)])
                         for h, p, m in s.history]
            s.hypo_ids = hypo if s.hypo_ids is None else s.hypo_ids[hypo]  # two reorders before a step compose
        self._drop_checkers()

    def _drop_checkers(self) -> None:
        """Checkers follow a server's history step by step; after a rewind or reorder, new ones catch up on the
        changed history when next needed."""
        checkers = [s.checker for s in self._streams if s.checker is not None]
        for s in self._streams:
            s.checker = None
        if checkers:
            loop.run(self._close_all(checkers))

    def _open(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._streams = loop.run(self._open_route(self.start, self.end, []))

    async def _open_route(self, start: int, end: int, history: list) -> list[_ServerStream]:
        """Streams over a route for blocks [start, end), opened and fed `history` (a replaced server's inputs).

        Servers that fail are banned and another route is tried. It gives up only after `max_failovers`
        failed routes *and* `missing_blocks_timeout` seconds, or when some block has had no usable server for
        `missing_blocks_timeout` (MissingBlocksError). Servers whose cache is full are skipped, not banned.
        Routes are planned in a worker thread: planning reads the directory, and may wait for missing blocks,
        neither of which may hold up the I/O loop.
        """
        config = self.manager.config
        deadline = time.monotonic() + config.missing_blocks_timeout
        full: dict[str, Exception] = {}
        failures = 0
        while True:
            try:
                route = await asyncio.to_thread(self.manager.make_route, start, end, exclude=frozenset(full))
            except MissingBlocksError:
                if not full:
                    raise
                raise SessionFailedError(f"no server can hold this session: {list(full.values())[-1]}") from None
            streams = [_ServerStream(self.manager, hop) for hop in route]
            try:
                await self._open_all(streams)
                await self._replay(streams, history)
                logger.debug("session %s: blocks %d:%d on %s", self.session_id[:8], start, end, route)
                return streams
            except _HopFailed as failed:
                await self._close_all(streams)
                error = failed.__cause__
                if isinstance(error, wire.RemoteError) and error.code in CALLER_ERRORS:
                    raise error from None  # our request is wrong: no other server would accept it either
                if isinstance(error, wire.RemoteError) and error.code in BUSY_ERRORS:
                    full[failed.hop.peer_id] = error
                    continue
                self.manager.ban(failed.hop.peer_id, repr(error))
                failures += 1
                if failures > config.max_failovers and time.monotonic() > deadline:
                    raise SessionFailedError(
                        f"could not open blocks {start}:{end} after {failures} failed routes in "
                        f"{config.missing_blocks_timeout:.0f}s; last error: {error}"
                    ) from error

    async def _open_all(self, streams: list[_ServerStream]) -> None:
        for s in streams:  # in order, so that a failure names the first bad server
            try:
                await self._open_one(s)
            except Exception as e:
                raise _HopFailed(s.hop) from e

    async def _open_one(self, s: _ServerStream) -> None:
        tuning, tensors = await self.extras(s.hop) if self.extras is not None else (Tuning(), [])
        if self.prompts is not None:  # `step` refused them alongside the model's own deep prompts
            tuning = tuning.model_copy(update={"prompts": True})
            tensors = [self.prompts[s.hop.start - self.start : s.hop.end - self.start]]
        assert self.batch_size is not None  # known since the first step
        meta = OpenSession(
            session_id=SessionId(self.session_id), start=s.hop.start, end=s.hop.end, batch_size=self.batch_size,
            max_length=self.max_length, tuning=tuning, compression=self.manager.config.compression,
        )
        await s.open(meta, tensors)

    async def _step_from(self, first: int, hidden, position_ids, mask) -> torch.Tensor:
        """Run the step through streams `first, first+1, ...`; a failure names the stream and its input."""
        # A rewind or reorder goes with the client's own copy of the step: pushed copies carry neither.
        push = self._push_pays() and all(s.keep is None and s.hypo_ids is None for s in self._streams)
        for i in range(first, len(self._streams)):
            s = self._streams[i]
            # With push, each server also sends its output straight to the next ones; the client still sends
            # every server its input (whichever copy arrives first is used), so a failed push costs only time.
            push_to = tuple(t.hop.peer_id for t in self._streams[i + 1 :]) if push else ()
            checker = await self._checker(s) if self._verify_now(s) else None
            calls = [s.step(self._step_id, hidden, position_ids, mask, push_to, keep=s.keep, hypo_ids=s.hypo_ids)]
            if checker is not None:  # it gets the same input at the same time: no extra round trip
                calls.append(_catch_up(checker, [*s.history[checker.fed :], (hidden, position_ids, mask)]))
            out, *second = await asyncio.gather(*calls, return_exceptions=True)
            if isinstance(out, BaseException):
                raise _HopFailed(s.hop, i, hidden) from out
            if checker is not None:
                checker.fed = len(s.history)
                out = await self._compare(i, out, second[0])
            hidden = out
        return hidden

    # --- verification (see client/verification.py) ---

    def _verify_now(self, s: _ServerStream) -> bool:
        fraction = self.manager.config.verify
        return fraction > 0 and (not s.checked_once or self._rng.random() < fraction)

    async def _checker(self, s: _ServerStream) -> _ServerStream | None:
        """The stream checking `s`, opened on first use; None if no other server can check it now."""
        s.checked_once = True
        try:
            s.checker = s.checker or await self._open_checker(s.hop, {s.hop.peer_id})
        except Exception as e:  # the checker failed, not the primary: this step goes unchecked
            logger.warning("session %s: could not open a checker for blocks %d:%d: %r", self.session_id[:8],
                           s.hop.start, s.hop.end, e)
            s.checker = None
        return s.checker

    async def _compare(self, i: int, out: torch.Tensor, second: torch.Tensor | BaseException) -> torch.Tensor:
        """Compare stream i's output for this step with its checker's; on a mismatch a third server decides.
        Returns the output the majority vouches for, after swapping out and reporting an offending primary."""
        s, tolerance = self._streams[i], self.manager.config.verify_tolerance
        checker = s.checker
        assert checker is not None  # the step was sent to it
        while isinstance(second, BaseException):  # the checker failed, not the primary: check on another one
            logger.warning("session %s: could not check blocks %d:%d on %s: %r", self.session_id[:8], s.hop.start,
                           s.hop.end, checker.hop.peer_id[-8:], second)
            self.manager.ban(checker.hop.peer_id, repr(second))
            await self._close_all([checker])
            s.checker = await self._open_checker(s.hop, {s.hop.peer_id})
            if s.checker is None:  # no other holder answers: this step goes unchecked (with a warning)
                return out
            checker = s.checker
            try:  # the new checker catches up on the whole history, this step included
                second = await _catch_up(checker, s.history)
                checker.fed = len(s.history)
            except Exception as e:
                second = e
        error = relative_error(out, second)
        if error <= tolerance:
            return out
        logger.warning("session %s: servers %s and %s disagree on blocks %d:%d (relative error %.3g); asking a third",
                       self.session_id[:8], s.hop.peer_id[-8:], checker.hop.peer_id[-8:], s.hop.start, s.hop.end, error)
        third = await self._referee(s, checker)
        if verdict(out, second, third, tolerance, f"blocks {s.hop.start}:{s.hop.end}") == "primary":
            self.manager.report(s.hop.peer_id, s.hop.start, s.hop.end, error, tolerance)
            checker.checked_once, s.checker = True, None
            self._streams[i] = checker  # already holds the session's whole history
            await self._close_all([s])
            return second
        self.manager.report(checker.hop.peer_id, s.hop.start, s.hop.end, error, tolerance)
        s.checker = None
        await self._close_all([checker])
        return out

    async def _referee(self, s: _ServerStream, checker: _ServerStream) -> torch.Tensor | None:
        """A third server's output for the checked step; None if no other server holds the blocks."""
        try:
            referee = await self._open_checker(s.hop, {s.hop.peer_id, checker.hop.peer_id})
        except Exception as e:
            raise VerificationError(f"could not reach a third server for blocks {s.hop.start}:{s.hop.end}: {e!r}") from e
        if referee is None:
            return None
        try:
            return await _catch_up(referee, s.history)  # (the history includes the step being checked)
        except Exception as e:
            raise VerificationError(f"the third server for blocks {s.hop.start}:{s.hop.end} failed: {e!r}") from e
        finally:
            await self._close_all([referee])

    async def _open_checker(self, hop: Hop, exclude: set[str]) -> _ServerStream | None:
        """A session on another server that holds all of `hop`'s blocks in the same dtype, quantization and
        version, nearest first; one that fails to open is avoided for a while and the next is tried. None (with
        a warning) if none opens."""
        for peer in self.manager.checkers(hop.peer_id, hop.start, hop.end):
            if peer in exclude:
                continue
            stream = _ServerStream(self.manager, Hop(peer, hop.start, hop.end))
            try:
                await self._open_one(stream)
                return stream
            except Exception as e:
                if isinstance(e, wire.RemoteError) and e.code in CALLER_ERRORS:
                    raise  # the request, not the server: every holder would refuse it
                logger.warning("session %s: could not open a checker on %s: %r", self.session_id[:8], peer[-8:], e)
                self.manager.ban(peer, repr(e))
                await self._close_all([stream])
        logger.warning("session %s: no other server could check blocks %d:%d: this step is not verified",
                       self.session_id[:8], hop.start, hop.end)
        return None

    def _push_pays(self) -> bool:
        config = self.manager.config
        # With verification, a wrong output must never reach the next server before it is checked.
        if not config.push or config.verify > 0 or len(self._streams) < 2:
            return False
        rtts = [self.manager.rtts.get(s.hop.peer_id, 0.0) for s in self._streams]
        return sum(rtts) / len(rtts) >= config.push_min_rtt

    def step(
        self,
        hidden: torch.Tensor,  # (batch, seq, hidden)
        position_ids: torch.Tensor | None = None,  # (batch, seq); None: following the session's position
        attention_mask: torch.Tensor | None = None,  # (batch, position + seq), None if no padding
        prompts: torch.Tensor | None = None,  # (blocks, batch or 1, prefix, hidden): the first step's only
    ) -> torch.Tensor:
        """One step through every server. A server that fails is replaced (see the module docstring), so a
        step fails only on a bad request, or with MissingBlocksError/SessionFailedError once no replacement
        can be found. A step of no tokens changes nothing and returns its empty input.

        `prompts` are deep prompts, as Petals takes them: added to the first `prefix` positions before each
        block. They belong to the sequence's first positions, so only the session's first step takes them;
        every server (a replacement, or after a rewind to 0) adds them whenever it computes those positions."""
        if self.closed:
            raise SessionFailedError("the inference session is closed")
        if prompts is not None:
            self._take_prompts(prompts, hidden)
        if hidden.shape[1] == 0:
            return hidden
        if position_ids is None:
            position_ids = default_positions(hidden, self.position, attention_mask)
        if self.position + hidden.shape[1] > self.max_length:
            raise PromptTooLongError(
                f"{self.position + hidden.shape[1]} tokens exceed the session's max_length={self.max_length}"
            )
        limit = self.longrope_limit
        if limit is not None and 0 < self.position <= limit < self.position + hidden.shape[1]:
            return self._restart(hidden, position_ids, attention_mask)
        if not self._streams:
            self._open(hidden.shape[0])
        out = loop.run(self._step_with_failover(hidden, position_ids, attention_mask))
        self._step_id += 1
        self._advance(hidden.shape[1])
        return out.to(hidden.device)  # replies arrive on the CPU; the caller's tensors may live on a GPU

    async def _step_with_failover(self, hidden: torch.Tensor, position_ids: torch.Tensor,
                                  mask: torch.Tensor | None) -> torch.Tensor:
        """The step through every hop; a hop that fails is replaced and the step resumes there. Ends the
        session on a wrong request or an unverifiable result (servers before it already took the step)."""
        first, x, full = 0, hidden, 0
        while True:
            try:
                return await self._step_from(first, x, position_ids, mask)
            except VerificationError:
                await self._end()  # some servers took this step and no honest answer came back
                raise
            except _HopFailed as failed:
                error = failed.__cause__ or failed  # (always raised from its cause)
                if isinstance(error, wire.RemoteError) and error.code in CALLER_ERRORS:
                    # The request is wrong, not the server; earlier servers already took this step, so the
                    # session's caches disagree now and it cannot go on.
                    await self._end()
                    raise error from None
                if isinstance(error, wire.RemoteError) and error.code in BUSY_ERRORS:
                    # Busy servers are not banned, so the same one may come back: bound the retries.
                    full += 1
                    if full > self.manager.config.max_failovers:
                        await self._end()
                        raise SessionFailedError(f"no server had room for this step: {error}") from None
                    await asyncio.sleep(min(1.0, 0.1 * full))  # let a rate limit refill before trying again
                try:
                    await self._replace(failed.index, error)
                except BaseException:
                    await self._end()
                    raise
                assert failed.hidden_in is not None  # a failure mid-step names its input
                first, x = failed.index, failed.hidden_in

    def _take_prompts(self, prompts: torch.Tensor, hidden: torch.Tensor) -> None:
        if self._streams or self._position:
            raise ValueError("prompts belong to the sequence's first positions: pass them with the session's "
                             "first step")
        if self._tuned_prompts:
            raise ValueError("prompts were passed to a model that sends its own trained deep prompts: pass one")
        blocks, batch = self.end - self.start, hidden.shape[0]
        if (prompts.ndim != 4 or prompts.shape[0] != blocks or prompts.shape[1] not in (1, batch)
                or not 0 < prompts.shape[2] <= hidden.shape[1] or prompts.shape[3] != hidden.shape[2]):
            raise ValueError(f"prompts must be ({blocks}, 1 or {batch}, prefix <= {hidden.shape[1]} tokens of this "
                             f"step, {hidden.shape[2]}), got {tuple(prompts.shape)}")
        self.prompts = prompts.detach().to("cpu", hidden.dtype)

    def _restart(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Run the whole session again, this step included, as one step on fresh server sessions.

        Longrope picks its short or long rotary table by the longest position of a pass, so the keys cached
        before a session grows past `longrope_limit` were made with the short table. transformers' Phi-3
        generate drops its cache there and recomputes the whole sequence with the long one; so does this.
        Returns the outputs of this step's tokens."""
        past = self._streams[0].history if self._streams else []
        inputs = torch.cat([h for h, _, _ in past] + [hidden], dim=1)
        positions = torch.cat([p for _, p, _ in past] + [position_ids], dim=1)
        logger.debug("session %s: recomputing %d tokens past longrope's limit of %d", self.session_id[:8],
                     inputs.shape[1], self.longrope_limit)
        loop.run(self._close_all(self._streams))
        self._streams, self._position, self.session_id = [], 0, uuid.uuid4().hex
        return self.step(inputs, positions, attention_mask)[:, -hidden.shape[1] :]

    async def _replace(self, index: int, error: BaseException) -> None:
        """Swap stream `index` for a new route over its blocks, with its history replayed there."""
        old = self._streams[index]
        # A server that timed out our idle session, or had no cache memory left for it, is healthy (and may
        # take the session again later): only faulty servers are banned.
        if not (isinstance(error, wire.RemoteError) and error.code in {ErrorCode.SESSION_TIMEOUT, *BUSY_ERRORS}):
            self.manager.ban(old.hop.peer_id, repr(error))
        logger.warning("session %s: replacing server %s (blocks %d:%d) after %r", self.session_id[:8],
                       old.hop.peer_id[-8:], old.hop.start, old.hop.end, error)
        await self._close_all([old])
        self._streams[index : index + 1] = await self._open_route(old.hop.start, old.hop.end, old.history)

    async def _replay(self, streams: list[_ServerStream], history: list) -> None:
        """Feed a replaced server's past inputs to its replacements as one chunk, rebuilding their caches.

        Each step's mask is the full padding mask up to that step, so the last one covers the whole history
        (None means no padding anywhere so far)."""
        if not history:
            return
        hidden = torch.cat([h for h, _, _ in history], dim=1)
        positions = torch.cat([p for _, p, _ in history], dim=1)
        mask = history[-1][2]
        for s in streams:
            try:
                hidden = await s.step(REPLAY_STEP, hidden, positions, mask)
            except Exception as e:
                raise _HopFailed(s.hop) from e

    async def _close_all(self, streams: list[_ServerStream]) -> None:
        checkers = [s.checker for s in streams if s.checker is not None]
        await asyncio.gather(*(s.close() for s in [*streams, *checkers]), return_exceptions=True)

    async def _end(self) -> None:
        """Close the session from the I/O loop (`close` is the caller's side)."""
        if not self.closed:
            self.closed = True
            await self._close_all(self._streams)

    def close(self) -> None:
        if not self.closed:
            try:
                loop.run(self._end(), timeout=10)
            except Exception:
                self.closed = True
                logger.debug("closing session %s", self.session_id[:8], exc_info=True)

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncated(history: list, n: int) -> list:
    """The first `n` tokens of a stream's history of (hidden, position_ids, mask) steps; a mask covers its step's
    past and new tokens, so a cut step keeps the mask's first `n` columns."""
    kept, seen = [], 0
    for hidden, positions, mask in history:
        q = hidden.shape[1]
        if seen + q <= n:
            kept.append((hidden, positions, mask))
        elif seen < n:
            k = n - seen
            kept.append((hidden[:, :k], positions[:, :k], None if mask is None else mask[:, :n]))
        seen += q
    return kept


async def _catch_up(checker: _ServerStream, new: list) -> torch.Tensor:
    """Feed `checker` the checked server's inputs it has not seen yet (`new`, ending with the step being
    checked), as one chunk, and return its output for that step's positions."""
    hidden = torch.cat([h for h, _, _ in new], dim=1)
    positions = torch.cat([p for _, p, _ in new], dim=1)
    out = await checker.step(REPLAY_STEP, hidden, positions, new[-1][2])
    return out[:, -new[-1][0].shape[1] :]
