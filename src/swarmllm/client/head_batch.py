"""One LM-head pass for the decode steps of many threads sharing one client model (the API host's users).

A client's own work per generated token is the final norm and the LM head: a matmul that reads the whole
head (SmolLM2: 28M parameters, about 10 ms of CPU per token). When one host decodes for many users at once,
each on its own thread and server-side session, every thread ran the head alone, reading those weights once
per user per token. Their head calls can share one matmul that reads the weights once.

`HeadBatcher.install(model)` replaces the forward of the model's output layer (the module itself stays, so
its weights, names and ties are untouched). A call for a decode step (one position per row, no autograd)
joins the calls pending from other threads: the first thread in leads, computes every pending call in one
matmul and hands each its rows; calls that arrive meanwhile form the next one, led by one of them.

Before it computes, the leader waits for the threads that called within the last `recent` seconds and are
not in yet (their steps are on their way back from the servers), each until 1.5 times its own period (the
time between its last two calls) after its last call, and never more than `wait` seconds. Requests that
meet here travel the servers together, so the servers batch them too. Why a period and not a fixed time:
concurrent requests fall into cohorts that go round the route apart, each cohort's calls arriving a fraction
of a round after the other's. A fixed wait shorter than that gap never merges them (measured with 8 threads
on 3 servers, `bench/serving.py`: waiting up to 0.1 s, the servers' passes held 2 to 4 steps, 0.86x to 2.3x the
tokens/s of one thread); waiting up to one period merges them within one round (passes of all 8 steps, 3.1x
to 3.4x; 8 requests through the API host, `bench/api.py`: 3.4x to 4.2x).
A thread overdue past 1.5 periods is not in the round (its user paused, its route stalled), so no pass waits
longer for it. A thread that is done decoding says so (`forget`), so no pass waits for it at all.

A lone thread never waits, and its call runs alone, exactly as before (bit for bit). Batched rows may differ
from lone ones by the float rounding of a wider matmul (as a server's batched steps do), which can flip a
near-tie of greedy decoding.

Failure: if the batched matmul raises, every call in it gets the error (each thread's request fails, as it
would have alone), and the next call starts afresh.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

# How late, in periods of its own, a thread may be for a pass to still wait for it: its calls come once per round
# of its route, give or take the noise of a shared machine (up to a third).
PATIENCE = 1.5


@dataclass
class _Call:
    rows: torch.Tensor  # (batch, 1, hidden)
    thread: int
    done: bool = False
    out: torch.Tensor | None = None
    error: BaseException | None = None


class HeadBatcher:
    """Coalesces concurrent decode-step calls of one output layer from several threads into one call."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], wait: float = 1.0, recent: float = 1.0):
        self._forward = forward  # the layer's own forward
        self.wait, self.recent = wait, recent
        self._cv = threading.Condition()
        self._pending: list[_Call] = []
        self._leading = False
        self._last: dict[int, float] = {}  # thread ident -> time of its last decode-step call
        self._period: dict[int, float] = {}  # thread ident -> seconds between its last two decode-step calls
        self.calls = 0  # decode-step calls answered
        self.passes = 0  # matmuls that answered them

    def __reduce__(self):
        # A copy (copy.deepcopy of the model, e.g. to make a draft model from it; pickling) gets a batcher of
        # its own over the copied layer's forward, with nothing pending: locks and waiting calls do not copy.
        return type(self), (self._forward, self.wait, self.recent)

    @classmethod
    def install(cls, model: PreTrainedModel) -> HeadBatcher:
        """Batch the output layer of `model` (a transformers causal LM); returns the batcher (idempotent)."""
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Module):
            raise TypeError(f"{type(model).__name__} has no output layer to batch")
        if isinstance(head.forward, HeadBatcher):
            return head.forward
        batcher = cls(head.forward)
        head.forward = batcher  # type: ignore[method-assign]  # an instance's own forward: nn.Module calls it
        return batcher

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[1] != 1 or (torch.is_grad_enabled() and hidden.requires_grad):
            return self._forward(hidden)  # a prefill or training: its own call
        call = _Call(hidden, threading.get_ident())
        with self._cv:
            self._pending.append(call)
            now, last = time.monotonic(), self._last.get(call.thread)
            if last is not None:
                self._period[call.thread] = now - last
            self._last[call.thread] = now
            self._cv.notify_all()  # a leader may be waiting for this thread
            while not call.done:
                if self._leading:
                    self._cv.wait()  # another thread computes; this call is in its pass or the next
                    continue
                # Lead one pass over every pending call (this one included), then hand over: a caller
                # whose call came in meanwhile leads the next pass, so no thread serves others for long.
                self._leading = True
                self._gather()
                batch, self._pending = self._pending, []
                self._cv.release()
                try:
                    self._answer(batch)
                finally:
                    self._cv.acquire()
                    self._leading = False
                    self._cv.notify_all()
        if call.error is not None:
            raise call.error
        assert call.out is not None
        return call.out

    def forget(self) -> None:
        """The calling thread is done decoding: no pass should wait for it."""
        with self._cv:
            self._last.pop(threading.get_ident(), None)
            self._period.pop(threading.get_ident(), None)

    def _gather(self) -> None:
        """Wait (lock held, released while waiting) for recently active threads: each until `PATIENCE` times
        its period after its last call (a thread with one call so far: `wait`), at most `wait` seconds."""
        cap = time.monotonic() + self.wait
        while True:
            now = time.monotonic()
            for thread in [t for t, at in self._last.items() if now - at > self.recent]:
                del self._last[thread]  # gone quiet: a finished request, or a user reading
                self._period.pop(thread, None)
            missing = self._last.keys() - {c.thread for c in self._pending}
            due = [self._last[t] + PATIENCE * self._period[t] if t in self._period else cap for t in missing]
            deadline = min(cap, max(due, default=now))
            if now >= deadline:
                return
            self._cv.wait(deadline - now)

    def _answer(self, batch: list[_Call]) -> None:
        """Compute `batch` in one call of the layer and mark each call done (with its rows, or the error)."""
        try:
            if len(batch) == 1:
                outs = [self._forward(batch[0].rows)]
            else:
                stacked = self._forward(torch.cat([c.rows for c in batch]))  # (rows, 1, vocab)
                outs = list(stacked.split([c.rows.shape[0] for c in batch]))
            self.calls += len(batch)
            self.passes += 1
        except BaseException as e:
            outs = []
            for c in batch:
                c.error = e
        for c, out in zip(batch, outs):
            c.out = out
        for c in batch:
            c.done = True
