"""The stream to one server of an inference session, and what the session does with streams' histories.

A stream keeps every input its server took into its cache (`history`), so that a replacement server can
rebuild the cache (failover) and a second server can be fed the same inputs (verification).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

import torch
from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.client.routing import Hop
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.protocol import REPLAY_STEP, RPC_INFERENCE, OpenSession, SessionOpened, Step, StepDone


class ServerStream:
    """The stream to one server: requests go through a queue, replies come from the response iterator."""

    def __init__(self, manager: SequenceManager, hop: Hop):
        self.manager, self.hop = manager, hop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.replies: AsyncGenerator[runtime_pb2.ExpertResponse, None] | None = None
        # Every (hidden, position_ids, mask) this server has taken into its cache, to rebuild it elsewhere.
        self.history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        # Verification (see client/verification.py): the second server checking this one, whether this one's
        # first step was checked, and (on a checker) how many of the checked server's history entries it has.
        self.checker: ServerStream | None = None
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


async def close_all(streams: Sequence[ServerStream]) -> None:
    """Close streams and the checkers following them, ignoring streams that are already broken."""
    checkers = [s.checker for s in streams if s.checker is not None]
    await asyncio.gather(*(s.close() for s in [*streams, *checkers]), return_exceptions=True)


def truncated(history: list, n: int) -> list:
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


def joined(history: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Consecutive (hidden, position_ids, mask) steps as one chunk. Each step's mask is the full padding mask up
    to that step, so the last one covers the whole chunk (None: no padding anywhere so far)."""
    hidden = torch.cat([h for h, _, _ in history], dim=1)
    positions = torch.cat([p for _, p, _ in history], dim=1)
    return hidden, positions, history[-1][2]


async def catch_up(checker: ServerStream, new: list) -> torch.Tensor:
    """Feed `checker` the checked server's inputs it has not seen yet (`new`, ending with the step being
    checked), as one chunk, and return its output for that step's positions."""
    out = await checker.step(REPLAY_STEP, *joined(new))
    return out[:, -new[-1][0].shape[1] :]
