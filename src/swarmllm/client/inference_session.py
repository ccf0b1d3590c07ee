"""A client-side inference session: one long-lived stream per server of a route, one message per step.

Servers keep the attention caches of the session's blocks; the client sends only the new tokens' hidden
states each step. A whole step (all hops, and any failover it needs) runs as one coroutine on the I/O
loop, so a step costs one thread hand-off plus one round trip per server; `step` is the one synchronous
facade. Route planning, which reads the directory and may wait for servers, runs in a worker thread.

Failure is `Failover`'s (client/failover.py): a server that is gone or refuses when the session opens is
avoided and another route is tried; one that fails *mid-session* (crash, stall past `request_timeout`,
error, or its idle timeout) is replaced, its history replayed elsewhere, and the step continues there.
Verification is `StepVerifier`'s (client/step_verification.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

import torch

from swarmllm.client import loop
from swarmllm.client.failover import Failover, HopFailed, SessionFailedError
from swarmllm.client.positions import default_positions
from swarmllm.client.routing import Hop
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.client.server_stream import ServerStream, catch_up, close_all, truncated
from swarmllm.client.session_base import SessionBase
from swarmllm.client.step_verification import StepVerifier
from swarmllm.protocol import OpenSession, SessionId, Tuning

logger = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
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
        self._streams: list[ServerStream] = []
        self._step_id = 0
        self.verifier = StepVerifier(manager, self._open_one, lambda: self.session_id[:8])
        self.failover = Failover(manager, self._open_one, lambda: self.session_id[:8])
        self.closed = False

    @property
    def route(self) -> list[Hop]:
        return [s.hop for s in self._streams]

    def _rewind_parts(self, n: int) -> None:
        """Every server drops its tokens after `n` as the next step begins; a replacement server gets the kept
        history only."""
        for s in self._streams:
            s.history = truncated(s.history, n)
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
            loop.run(close_all(checkers))

    def _open(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._streams = loop.run(self.failover.open_route(self.start, self.end, []))

    async def _open_one(self, s: ServerStream) -> None:
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
            checker = await self.verifier.checker(s) if self.verifier.due(s) else None
            calls = [s.step(self._step_id, hidden, position_ids, mask, push_to, keep=s.keep, hypo_ids=s.hypo_ids)]
            if checker is not None:  # it gets the same input at the same time: no extra round trip
                calls.append(catch_up(checker, [*s.history[checker.fed :], (hidden, position_ids, mask)]))
            out, *second = await asyncio.gather(*calls, return_exceptions=True)
            if isinstance(out, BaseException):
                raise HopFailed(s.hop, i, hidden) from out
            if checker is not None:
                checker.fed = len(s.history)
                out, self._streams[i] = await self.verifier.compare(s, out, second[0])
            hidden = out
        return hidden

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
        """The step through every hop, repaired by `Failover`; anything it cannot repair ends the session
        (servers before the failure already took the step, so the caches disagree now)."""
        try:
            return await self.failover.step(
                self._streams, lambda first, x: self._step_from(first, x, position_ids, mask), hidden,
            )
        except BaseException:
            await self._end()
            raise

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
        loop.run(close_all(self._streams))
        self._streams, self._position, self.session_id = [], 0, uuid.uuid4().hex
        return self.step(inputs, positions, attention_mask)[:, -hidden.shape[1] :]

    async def _end(self) -> None:
        """Close the session from the I/O loop (`close` is the caller's side)."""
        if not self.closed:
            self.closed = True
            await close_all(self._streams)

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
