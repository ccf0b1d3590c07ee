"""Attention-cache memory: a server-wide byte budget, sessions' caches grown in pages, and a queue.

Petals reserves each session's whole declared `max_length` at admission and refuses a session at once
when memory is full. Here a session holds only the pages its tokens fill (`page_tokens` tokens of every
block's keys and values per page). When the budget is spent, an opening session or a growing step waits
in a first-come-first-served queue until pages are freed (sessions close, time out or fail), for at most
`queue_timeout` seconds; then it gets a `CacheFullError` that says how much memory there is.

Only a session that could never fit (its declared `batch x max_length` exceeds the whole budget) is
refused without waiting. Growing on demand means that admitted sessions can, together, want more than the
budget: the queue's timeout, not a reservation, is what resolves that (a step that times out fails with
`cache_full`, and the client replays its session elsewhere).

All accounting runs on the server's event loop; the tensors themselves are touched only by the compute
thread (see `SessionKV`).
"""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass, field

import torch

from swarmllm.models.span import Span


class CacheFullError(RuntimeError):
    pass


def size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


class CacheMemory:
    """A byte budget with a FIFO queue of waiters. Guarantee: `used <= budget` at all times, and a waiter
    is served before any later request (so a big request is not starved by a stream of small ones)."""

    def __init__(self, budget: int, queue_timeout: float):
        self.budget, self.queue_timeout = budget, queue_timeout
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def free(self) -> int:
        return self.budget - self.used

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def check_possible(self, nbytes: int, what: str) -> None:
        """Refuse at once what could never fit, saying how much this server has."""
        if nbytes > self.budget:
            raise CacheFullError(
                f"{what} needs up to {size(nbytes)} of attention cache but this server's whole budget is "
                f"{size(self.budget)} ({size(self.free)} free now)"
            )

    async def acquire(self, nbytes: int, what: str) -> None:
        """Take `nbytes`, waiting in the queue for up to `queue_timeout` seconds if they are not free."""
        self.check_possible(nbytes, what)
        if not self._waiters and nbytes <= self.free:
            self.used += nbytes
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (nbytes, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self.queue_timeout):  # not wait_for, which can drop a cancellation (3.11)
                await asyncio.shield(waiter)
        except TimeoutError:
            if waiter.done():  # granted at the last moment: keep it
                return
            self._waiters.remove(entry)
            self._wake()  # the head may have been this waiter, blocking smaller ones behind it
            raise CacheFullError(
                f"{what} waited {self.queue_timeout:g}s in the queue for {size(nbytes)} of attention cache; "
                f"{size(self.free)} of {size(self.budget)} are free"
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(nbytes)  # granted, but the requester is gone (its client disconnected)
            elif entry in self._waiters:
                self._waiters.remove(entry)
                self._wake()
            raise

    def try_acquire(self, nbytes: int) -> bool:
        """Take `nbytes` only if they are free now and nobody is queued before; never waits."""
        if self._waiters or nbytes > self.free:
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            nbytes, waiter = self._waiters.popleft()
            self.used += nbytes
            waiter.set_result(None)


# How much a growing session cache takes at once beyond what it needs, as a fraction of that: it copies its
# tokens fewer than 1 + 1 / GROWTH times each over its life, and holds at most GROWTH more than it fills (plus
# a page).
GROWTH = 0.25


def bytes_per_token(span: Span, batch: int = 1) -> int:
    """Cache bytes one token costs on `span`: keys and values of every block (full length for sliding layers
    too: the mask, not the storage, limits what they see)."""
    itemsize = torch.finfo(span.dtype).bits // 8
    return span.cache_elements * itemsize * len(span.layers) * batch


@dataclass
class SessionKV:
    """One session's keys and values for blocks `[start, end)`: per block, (batch, kv_heads, capacity,
    head_dim) tensors, grown by the compute thread up to `capacity` tokens (what the memory budget granted
    on the event loop). Tokens `[0, length)` are valid; a failed step only has to reset `length`.

    It owns its length and capacity: `reserve` grows capacity page by page from the memory budget (on the
    event loop), `commit` advances the length after a pass (on the compute thread), `rewind` cuts it (a
    client's rewind, or a failed pass), and `release` gives every page back."""

    span: Span
    batch: int
    page_tokens: int
    limit: int | None = None  # the most tokens the session may hold (its declared max_length), if known
    length: int = 0
    capacity: int = 0  # tokens granted by CacheMemory
    held: int = 0  # bytes granted by CacheMemory for those tokens
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # absolute block index -> tensor
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    # Bytes of keys and values moved after they were first written (a tensor regrown, a batch's gather, a
    # beam reorder): what a step costs beyond storing its own new tokens (bench/serving.py reports it).
    copied: int = 0

    @property
    def page_bytes(self) -> int:
        return bytes_per_token(self.span, self.batch) * self.page_tokens

    def pages_for(self, tokens: int) -> int:
        """Pages to add so that `tokens` fit."""
        return max(0, -(-tokens // self.page_tokens) - self.capacity // self.page_tokens)

    async def reserve(self, memory: CacheMemory, tokens: int, what: str) -> None:
        """Make room for `tokens` in all: take the missing pages from `memory`, waiting in its queue. Raises
        CacheFullError with nothing taken.

        A cache that has to grow takes room for `GROWTH` more tokens than it needs where that much is free now
        (never past `limit`): the compute thread copies the cache into a bigger tensor each time it grows, so
        growing by a fraction keeps the copies per token constant (each token is copied fewer than 1 + 1 / GROWTH
        times), where growing by one page would copy the whole context every `page_tokens` tokens."""
        pages = self.pages_for(tokens)
        if not pages:
            return
        ample = math.ceil(tokens * (1 + GROWTH))
        more = self.pages_for(ample if self.limit is None else max(tokens, min(ample, self.limit)))
        if more > pages and memory.try_acquire(more * self.page_bytes):
            pages = more
        else:
            await memory.acquire(pages * self.page_bytes, what)
        self.held += pages * self.page_bytes
        self.capacity += pages * self.page_tokens

    def release(self, memory: CacheMemory) -> None:
        memory.release(self.held)
        self.held = 0

    def commit(self, tokens: int) -> None:
        """A pass wrote `tokens` more positions: they are valid now."""
        assert self.length + tokens <= self.capacity
        self.length += tokens

    def rewind(self, length: int) -> None:
        """Keep only the first `length` tokens (the rest is overwritten by the next steps)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind to {length}: the session holds {self.length} tokens")
        self.length = length

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, at: int) -> None:
        """Store `key`/`value` (batch, kv_heads, q, head_dim) at positions `[at, at + q)` of `layer`. Keys and values
        may differ in width (DeepSeek's blocks cache a compressed latent as keys and a rotary key as values)."""
        end = at + key.shape[2]
        assert end <= self.capacity, "pages must be granted before the compute thread writes"
        old = self.keys.get(layer)
        if old is None or old.shape[2] < end:
            # Grow to the granted capacity at once: one copy per page granted, not one per token.
            k = key.new_empty((*key.shape[:2], self.capacity, key.shape[3]))
            v = value.new_empty((*value.shape[:2], self.capacity, value.shape[3]))
            if old is not None:
                k[:, :, : old.shape[2]] = old
                v[:, :, : old.shape[2]] = self.values[layer]
                self.copied += nbytes(old) + nbytes(self.values[layer])
            self.keys[layer], self.values[layer] = k, v
        self.keys[layer][:, :, at:end] = key
        self.values[layer][:, :, at:end] = value

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        """Row i becomes what row `hypo_ids[i]` was (beam search reordering its beams); a copy of each tensor."""
        for layer in self.keys:
            self.keys[layer] = self.keys[layer].index_select(0, hypo_ids)
            self.values[layer] = self.values[layer].index_select(0, hypo_ids)
            self.copied += nbytes(self.keys[layer]) + nbytes(self.values[layer])


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
