"""The compute thread: every piece of torch work of a server runs here, in arrival order, and inference
steps of different sessions are batched.

Continuous batching without waiting: while one pass computes, steps arriving from other sessions queue
up; the next pass takes the oldest task and every queued step that can share its pass (same blocks, same
number of new tokens, same adapter: `Session.batch_key`). A long prefill is cut into chunks of
`prefill_chunk` tokens, each queued only after the previous one is done, so the decode steps of other
sessions run between them instead of waiting for the whole prompt.

When other sessions on the same blocks have been stepping recently but are not in the queue yet, the
thread waits up to `batch_wait` seconds for their steps before it runs a pass: concurrent sessions then
move through the pipeline together instead of in a trickle of passes of one. A lone session never waits
(no other recent session), so single-stream latency is unchanged.

With a `balance` lookup (contribution points, see `swarmllm.points`), the head of each pass is the task
that `PriorityPolicy` picks instead of the oldest: contributors first, a guaranteed share for newcomers.
Compatible steps still join the chosen head, whoever sent them. Without one, the order is plain FIFO.

One thread, not a pool: OpenMP keeps one thread team per calling thread, and two teams on a small machine
slow each other down (measured: decode 0.84 -> 0.57 of local speed).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from swarmllm.points.priority import PriorityPolicy
from swarmllm.server.config import default
from swarmllm.server.inference import BatchKey, Session, StepInput, run_batch

logger = logging.getLogger(__name__)


@dataclass
class _Call:
    fn: Callable
    args: tuple
    peer: str = ""  # who asked (peer id); "" for the server's own work
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Step:
    step: StepInput
    key: BatchKey | None
    peer: str = ""
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


def take_batch(queue: collections.deque, max_rows: int, head_index: int = 0) -> list:
    """Pop the task at `head_index` (by default the oldest) and, if it is a batchable step, every queued step
    with the same key (oldest first) while the rows fit in `max_rows`. Other tasks keep their order."""
    head = queue[head_index]
    del queue[head_index]
    if not isinstance(head, _Step) or head.key is None:
        return [head]
    group = [head]
    add_compatible(queue, group, max_rows)
    return group


def add_compatible(queue: collections.deque, group: list[_Step], max_rows: int) -> None:
    """Move every queued step with `group`'s key into `group` (oldest first) while the rows fit in
    `max_rows`. Other tasks keep their order."""
    key, rows = group[0].key, sum(t.step.rows for t in group)
    rest: collections.deque = collections.deque()
    while queue:
        task = queue.popleft()
        if isinstance(task, _Step) and task.key == key and rows + task.step.rows <= max_rows:
            group.append(task)
            rows += task.step.rows
        else:
            rest.append(task)
    queue.extend(rest)


def _same_but_length(a: BatchKey, b: BatchKey) -> bool:
    return a._replace(q=0) == b._replace(q=0)


class Scheduler:
    """Owns the compute thread. `run(fn, ...)` for any torch work, `step(session, ...)` for inference."""

    def __init__(self, max_batch_rows: int = default("max_batch_rows"), prefill_chunk: int = default("prefill_chunk"),
                 batch_wait: float = default("batch_wait"), recent: float = 1.0,
                 balance: Callable[[str], float] | None = None, newcomer_share: float = default("newcomer_share")):
        """`balance(peer)` (fast: it runs on the compute thread, for each waiting peer, every pass) turns on
        priority by contribution points; `newcomer_share` is the least share of passes that go to peers with
        a balance <= 0 while they wait (see `PriorityPolicy`)."""
        self.max_batch_rows, self.prefill_chunk = max_batch_rows, prefill_chunk
        self.batch_wait, self.recent = batch_wait, recent
        self.policy = PriorityPolicy(balance, newcomer_share) if balance is not None else None
        self._policy_failed = False
        # id(session) -> (batch key, rows, time of its last step): who is likely to send a step soon.
        self._last_step: dict[int, tuple[BatchKey, int, float]] = {}
        self._queue: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._stopped = False
        self.steps_run = 0  # inference steps computed (a chunked prefill counts once per chunk)
        self.passes_run = 0  # forward passes that computed them
        self._thread = threading.Thread(target=self._loop, name="compute", daemon=True)
        self._thread.start()

    def call(self, fn: Callable, *args, peer: str = "") -> concurrent.futures.Future:
        """Queue `fn(*args)` for the compute thread (thread-safe), on behalf of `peer`."""
        return self._put(_Call(fn, args, peer))

    async def run(self, fn: Callable, *args, peer: str = ""):
        return await asyncio.wrap_future(self.call(fn, *args, peer=peer))

    def chunk_size(self, session: Session, q: int) -> int:
        """Tokens per chunk of a step of `q` tokens: a long prefill runs in chunks of `prefill_chunk`, so other
        sessions' decode steps are not held up behind it, except a step that must run alone."""
        return q if session.batch_key(q) is None else min(q, self.prefill_chunk)

    async def step(
        self, session: Session, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
        *, peer: str = "",
    ) -> torch.Tensor:
        """One inference step of `session` on behalf of `peer`, batched with other sessions' steps; long ones
        in chunks (`chunk_size`). The caller has validated it (`Session.check`) and reserved its cache. If a
        chunk fails, the session is as before the step."""
        q, past = hidden.shape[1], session.length
        chunk = self.chunk_size(session, q)
        outs, last = [], int(position_ids.max())
        for a in range(0, q, chunk):
            b = min(q, a + chunk)
            piece = StepInput(session, hidden[:, a:b], position_ids[:, a:b], None if mask is None else mask[:, : past + b],
                              last_position=last)
            task = _Step(piece, session.batch_key(b - a), peer)
            if task.key is not None:
                with self._cv:
                    self._last_step[id(session)] = (task.key, piece.rows, time.monotonic())
            try:
                outs.append(await asyncio.wrap_future(self._put(task)))
            except asyncio.CancelledError:
                raise  # the session is going away; the compute thread may still be writing into it
            except BaseException:
                session.kv.rewind(past)
                raise
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def forget(self, session: Session) -> None:
        """The session ended: no pass should wait for its steps any more."""
        with self._cv:
            self._last_step.pop(id(session), None)

    def shutdown(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def _put(self, task):
        with self._cv:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            self._queue.append(task)
            self._cv.notify()
        return task.future

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    for task in self._queue:
                        task.future.cancel()
                    return
                group = take_batch(self._queue, self.max_batch_rows, self._head_index())
                if self.batch_wait > 0 and isinstance(group[0], _Step) and group[0].key is not None:
                    self._gather(group)
            # A task whose caller is gone (its future was cancelled) is dropped here, before any compute.
            live = [t for t in group if t.future.set_running_or_notify_cancel()]
            if live:
                self._execute(live)

    def _head_index(self) -> int:
        """Which queued task leads the next pass (with the lock held)."""
        if self.policy is None or len(self._queue) == 1:
            return 0
        try:
            return self.policy.pick(t.peer for t in self._queue)
        except Exception:
            # A failing balance lookup must not stop the compute thread: this pass falls back to FIFO. It
            # would fail again every pass, so only the first failure is logged loudly.
            log = logger.debug if self._policy_failed else logger.exception
            log("the priority policy failed; running the oldest task", exc_info=True)
            self._policy_failed = True
            return 0

    def _gather(self, group: list[_Step]) -> None:
        """Wait (up to `batch_wait`, holding the lock only while checking) for steps of sessions with the same
        key that stepped within `recent` seconds but are not in `group` yet, and add them."""
        key = group[0].key
        assert key is not None  # only steps that can batch are gathered for
        deadline = time.monotonic() + self.batch_wait
        while True:
            now = time.monotonic()
            for sid in [k for k, (_, _, t) in self._last_step.items() if now - t > self.recent]:
                del self._last_step[sid]  # forget sessions gone quiet (closed, or a user reading)
            mine = {id(t.step.session) for t in group}
            rows = sum(t.step.rows for t in group)
            # Same blocks and adapter, any step length: a session's last step may have been its prompt.
            expected = sum(r for sid, (k, r, _) in self._last_step.items()
                           if _same_but_length(k, key) and sid not in mine)
            if expected == 0 or rows >= self.max_batch_rows or now >= deadline:
                return
            self._cv.wait(deadline - now)
            if self._stopped:
                return
            add_compatible(self._queue, group, self.max_batch_rows)

    def _execute(self, live: list) -> None:
        if isinstance(live[0], _Call):
            task = live[0]
            try:
                task.future.set_result(task.fn(*task.args))
            except BaseException as e:
                task.future.set_exception(e)
            return
        try:
            outs = run_batch([t.step for t in live])
        except BaseException as e:
            if len(live) == 1:
                live[0].future.set_exception(e)
                return
            # One bad session must not fail the others: retry them one by one (nothing advanced yet).
            logger.warning("a batched pass of %d steps failed (%r); running them one by one", len(live), e)
            for t in live:
                self._execute_alone(t)
            return
        self.steps_run += len(live)
        self.passes_run += 1
        for t, out in zip(live, outs):
            t.future.set_result(out)

    def _execute_alone(self, task: _Step) -> None:
        try:
            (out,) = run_batch([task.step])
            self.steps_run += 1
            self.passes_run += 1
            task.future.set_result(out)
        except BaseException as e:
            task.future.set_exception(e)
