"""Attention-cache memory: a server-wide byte budget with a queue, and the pool of pages that holds every
session's keys and values.

Petals reserves each session's whole declared `max_length` at admission and refuses a session at once
when memory is full. Here a session holds only the pages its tokens fill (`page_tokens` tokens of every
block's keys and values per page). When the budget is spent, an opening session or a growing step waits
in a first-come-first-served queue until pages are freed (sessions close, time out or fail), for at most
`queue_timeout` seconds; then it gets a `CacheFullError` that says how much memory there is.

Only a session that could never fit (its declared `batch x max_length` exceeds the whole budget) is
refused without waiting. Growing on demand means that admitted sessions can, together, want more than the
budget: the queue's timeout, not a reservation, is what resolves that (a step that times out fails with
`cache_full`, and the client replays its session elsewhere).

Storage (`PagePool`): the whole budget is allocated once, when the server loads its span: per block, one
keys tensor (kv_heads, slots, width) and one values tensor. A page is `page_tokens` consecutive slots of
every block of the span, for one row of one session, and a session holds one page table per row
(`SessionKV.tables`). A step that needs room takes more pages; nothing already written ever moves, so a step
writes only its own new tokens, and attention reads the past in place, run by run of consecutive pages
(`SessionKV.segments`, `ragged.RaggedPass`).

Keeping runs long: an opening session sets aside (claims) room after its first pages for its declared
max_length where that much is free and unclaimed, and growing takes the next pages of that room. Claims are
soft: when no unclaimed room is left, pages set aside for others are taken too, so the budget is usable to
its last page; the sessions concerned then read their past as several runs (attention costs a little more,
results are the same).

Beams share pages: a beam search reorder makes rows take each other's tables (the pool counts the rows that
hold each page), and a row about to write into a page it shares copies that one page first (`SessionKV.prepare`).

Pages span all of the server's blocks, so that one table per row serves every block and the budget counts
exactly the pages in use. A session on part of the span pays for all of it (clients route whole spans where
they can).

All accounting runs on the server's event loop; the tensors themselves are touched only by the compute
thread. A session's tables change only between its own steps. Its pages are freed when its stream ends,
possibly while its last pass still runs; a pass of the pages' next owner runs after that one, on the same
thread, so it writes after the old owner's last write.
"""

from __future__ import annotations

import asyncio
import collections
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

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            nbytes, waiter = self._waiters.popleft()
            self.used += nbytes
            waiter.set_result(None)


def bytes_per_token(span: Span, batch: int = 1) -> int:
    """Cache bytes one token costs on `span`: keys and values of every block (full length for sliding layers
    too: the mask, not the storage, limits what they see)."""
    itemsize = torch.finfo(span.dtype).bits // 8
    return span.cache_elements * itemsize * len(span.layers) * batch


class PagePool:
    """The server's attention-cache tensors, allocated once for `span`, and which of their pages are taken.
    `grow` and `release` run on the event loop; `keys` and `values` are read and written by the compute thread."""

    def __init__(self, span: Span, budget: int, page_tokens: int):
        self.page_tokens = page_tokens
        self.page_bytes = bytes_per_token(span) * page_tokens  # one page: one row, every block
        self.pages = budget // self.page_bytes
        (kh, kw), (vh, vw) = span.cache_shapes
        slots = self.pages * page_tokens

        def tensor(heads: int, width: int) -> torch.Tensor:
            return torch.empty((heads, slots, width), dtype=span.dtype, device=span.device)

        self.keys = {b: tensor(kh, kw) for b in range(span.start, span.end)}
        self.values = {b: tensor(vh, vw) for b in range(span.start, span.end)}
        self.in_use = 0  # pages in some session's table
        self._used = bytearray(self.pages)  # 1: in a session's table
        self._refs = [0] * self.pages  # rows whose table holds the page (beams share their common past)
        self._claimed = bytearray(self.pages)  # 1: set aside for a session's growth
        self._blocked = bytearray(self.pages)  # used or claimed: where no new room is set aside

    @property
    def capacity(self) -> int:
        """Bytes of the budget that whole pages hold (what `CacheMemory` may grant)."""
        return self.pages * self.page_bytes

    def stores(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """((keys of block `layer`, `key`), (its values, `value`)): where new (rows, heads, tokens, width) keys and
        values go, checked to fit the pool's (heads, width)."""
        keys, values = self.keys[layer], self.values[layer]
        if key.shape[1::2] != keys.shape[::2] or value.shape[1::2] != values.shape[::2]:
            raise RuntimeError(f"block {layer} cached keys {tuple(key.shape)} and values {tuple(value.shape)}; the "
                               f"pool holds (heads, width) {keys.shape[::2]} and {values.shape[::2]}")
        return (keys, key), (values, value)

    def bytes_for(self, batch: int, tokens: int) -> int:
        """Bytes of the pages that `batch` rows of `tokens` tokens fill."""
        return self.page_bytes * batch * -(-tokens // self.page_tokens)

    def grow(self, kv: SessionKV, pages: int) -> None:
        """Append `pages` pages to each of `kv`'s rows: right after the row's last page where those are free
        (and not set aside for another session), elsewhere as a new run otherwise. The caller holds the budget
        for them (`CacheMemory`), so they exist; a caller that skipped it gets a CacheFullError."""
        rows = len(kv.tables)
        if pages * rows > self.pages - self.in_use:
            raise CacheFullError(f"{pages * rows} pages wanted, {self.pages - self.in_use} of {self.pages} free")
        held = len(kv.tables[0])
        room = pages if kv.limit is None else max(pages, -(-kv.limit // self.page_tokens) - held)
        stuck = [t for t in kv.tables if not self._extend(t, pages, kv.claims)]
        if stuck:
            self._place(stuck, pages, room, kv.claims)

    def release(self, kv: SessionKV) -> None:
        """Every page of `kv` and the room it set aside are free again (its tables stay as they were: a pass
        that still runs for it reads them)."""
        for table in kv.tables:
            for p in table:
                self._drop(p)
        for claim in kv.claims:
            for p in claim:
                self._claimed[p], self._blocked[p] = 0, self._used[p]

    def _extend(self, table: list[int], n: int, claims: list[range]) -> bool:
        if not table or table[-1] + 1 + n > self.pages:
            return False
        after = range(table[-1] + 1, table[-1] + 1 + n)
        if any(self._used[p] or (self._claimed[p] and not any(p in c for c in claims)) for p in after):
            return False
        self._take(table, after)
        return True

    def _place(self, rows: list[list[int]], n: int, room: int, claims: list[range]) -> None:
        """New runs of `n` pages for `rows`, evenly spaced so that one strided view reads them all: in unclaimed
        room for `room` pages each if there is some, else for `n`; else over room set aside for others; else
        wherever pages are free, one by one."""
        k = len(rows)
        for size in dict.fromkeys((room, n)):
            base = self._blocked.find(bytes(k * size))
            if base >= 0:
                claim = range(base, base + k * size)
                for p in claim:
                    self._claimed[p] = self._blocked[p] = 1
                claims.append(claim)
                for i, table in enumerate(rows):
                    self._take(table, range(base + i * size, base + i * size + n))
                return
        base = self._used.find(bytes(k * n))
        if base >= 0:
            for i, table in enumerate(rows):
                self._take(table, range(base + i * n, base + (i + 1) * n))
            return
        free = [p for p in range(self.pages) if not self._used[p]][: k * n]
        for i, table in enumerate(rows):
            self._take(table, free[i * n : (i + 1) * n])

    def retable(self, old: list[list[int]], new: list[list[int]]) -> None:
        """Rows that held the pages of `old` hold those of `new` now (pages of `old` only, listed again); pages no
        row holds any more are free."""
        for table in new:
            for p in table:
                self._refs[p] += 1
        for table in old:
            for p in table:
                self._drop(p)

    def unshare(self, table: list[int], j: int) -> int:
        """Give the row of `table` its own copy of its `j`th page, held by other rows too: a free page, preferably
        one set aside for nobody; returns the page copied from (the copy is the compute thread's to make)."""
        shared = table[j]
        new = self._blocked.find(b"\0")
        if new < 0:
            new = self._used.find(b"\0")
        assert new >= 0, "a page to copy into must be paid for"
        self._take([], [new])
        self._drop(shared)
        table[j] = new
        return shared

    def shared(self, p: int) -> bool:
        return self._refs[p] > 1

    def _take(self, table: list[int], pages) -> None:
        for p in pages:
            self._used[p] = self._blocked[p] = 1
            self._refs[p] = 1
        table.extend(pages)
        self.in_use += len(pages)

    def _drop(self, p: int) -> None:
        self._refs[p] -= 1
        if not self._refs[p]:
            self._used[p], self._blocked[p] = 0, self._claimed[p]
            self.in_use -= 1


@dataclass(eq=False)
class SessionKV:
    """One session's keys and values for blocks `[span.start, span.end)`: a page table per row into `pool`,
    grown up to `capacity` tokens (what the memory budget granted on the event loop). Tokens `[0, length)` are
    valid; a failed step only has to reset `length`.

    It owns its length and pages: `reserve` takes pages from the memory budget and the pool and `prepare` does
    all a step needs (pages, rewind, beam reorder; both on the event loop), `commit` advances the length after
    a pass (on the compute thread), `rewind` cuts it (a client's rewind, or a failed pass), and `release` gives
    every page back."""

    pool: PagePool
    span: Span
    batch: int
    limit: int | None = None  # the most tokens the session may hold (its declared max_length), if known
    length: int = 0
    held: int = 0  # bytes granted by CacheMemory
    # Bytes of keys and values moved after they were first written (a batch's gather for blocks that cannot
    # attend in place, a beam reorder, a strided read that had to be stacked): what a step costs beyond storing
    # its own new tokens (bench/serving.py reports it).
    copied: int = 0
    tables: list[list[int]] = field(init=False)  # per row, the pool's pages in token order
    claims: list[range] = field(default_factory=list)  # room set aside in the pool for this session's growth
    released: bool = False  # its pages are back in the pool
    _copies: list[tuple[int, int]] = field(default_factory=list)  # (page, its copy) for the compute thread to make
    _sharing: bool = False  # a reorder has made rows share pages (some may still)
    _bounds: list[int] = field(default_factory=list)  # token positions where some row's run of pages ends
    # `segments` answers of the current pages: a pass asks the same ones for every block.
    _pieces: dict[tuple[int, int], list[tuple[int, int, list[int]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tables = [[] for _ in range(self.batch)]

    @property
    def page_tokens(self) -> int:
        return self.pool.page_tokens

    @property
    def capacity(self) -> int:
        """Tokens per row that the session's pages hold."""
        return len(self.tables[0]) * self.page_tokens

    @property
    def page_bytes(self) -> int:
        """Bytes of one more page for every row."""
        return self.pool.page_bytes * self.batch

    def pages_for(self, tokens: int) -> int:
        """Pages (per row) to add so that `tokens` fit."""
        return max(0, -(-tokens // self.page_tokens) - len(self.tables[0]))

    async def reserve(self, memory: CacheMemory, tokens: int, what: str) -> None:
        """Make room for `tokens` in all: take the missing pages' bytes from `memory`, waiting in its queue, then
        the pages themselves from the pool. Raises CacheFullError with nothing taken."""
        pages = self.pages_for(tokens)
        if pages:
            await memory.acquire(pages * self.page_bytes, what)
            self.held += pages * self.page_bytes
            self.take(tokens)

    def take(self, tokens: int) -> None:
        """Pages for `tokens` from the pool, without the budget: `reserve` has it (or a test does not need it)."""
        pages = self.pages_for(tokens)
        if pages:
            assert not self.released, "a released session takes no pages"
            self.pool.grow(self, pages)
            self._retabled()

    async def prepare(self, memory: CacheMemory, past: int, tokens: int, hypo_ids: list[int] | None, what: str) -> None:
        """Everything a step needs before it runs: it follows `past` tokens (a rewind when fewer than `length`),
        ends at `tokens`, and with `hypo_ids` makes row i continue row `hypo_ids[i]` (beam search) first.
        Waits in `memory`'s queue for the pages it needs; raises CacheFullError with the session unchanged.

        A beam reorder copies no keys or values: rows take each other's page tables, and pages that several
        rows then hold are shared. A row about to write into a shared page gets its own copy of that page first
        (one page per row and step at most, made by the compute thread before the pass: `copy_pages`)."""
        if hypo_ids is None and not self._sharing:  # no row holds another's pages: growth alone
            await self.reserve(memory, tokens, what)
            self.rewind(past)
            return
        self._sharing = self._sharing or hypo_ids is not None and len(set(hypo_ids)) < self.batch
        order = hypo_ids if hypo_ids is not None else range(self.batch)
        tables = [list(self.tables[h]) for h in order]
        held = collections.Counter(p for t in tables for p in t)
        first, last = past // self.page_tokens, -(-min(tokens, self.capacity) // self.page_tokens)
        shared = sum(n - 1 for p, n in held.items() if n > 1 and any(p in t[first:last] for t in tables))
        grow = self.pages_for(tokens) * self.batch
        freed = len({p for t in self.tables for p in t} - held.keys())  # pages no row holds after the reorder
        extra = (grow + shared - freed) * self.pool.page_bytes  # what the step adds to the session's pages
        if extra > 0:
            await memory.acquire(extra, what)
        self.rewind(past)
        if hypo_ids is not None:
            self.pool.retable(self.tables, tables)  # frees those pages before the copies and growth take theirs
            self.tables = tables
        if extra < 0:
            memory.release(-extra)
        self.held += extra
        for table in self.tables:
            for j in range(first, min(last, len(table))):
                if self.pool.shared(table[j]):
                    src = self.pool.unshare(table, j)  # table[j] is the row's own page now
                    self._copies.append((src, table[j]))
        self._retabled()
        self.take(tokens)

    def copy_pages(self) -> None:
        """Make the page copies `prepare` planned (on the compute thread, before the step's pass), every block."""
        if not self._copies:
            return
        tokens = self.page_tokens
        for src, dst in self._copies:
            for block in range(self.span.start, self.span.end):
                for store in (self.pool.keys[block], self.pool.values[block]):
                    store[:, dst * tokens : (dst + 1) * tokens] = store[:, src * tokens : (src + 1) * tokens]
                    self.copied += nbytes(store[:, :tokens])
        self._copies = []

    def evenly(self, length: int) -> bool:
        """Whether every piece of tokens `[0, length)` reads all rows as one strided view."""
        return all(_evenly(starts) for _, _, starts in self.segments(0, length))

    def _retabled(self) -> None:
        ends = {0, self.capacity}
        for table in self.tables:
            ends.update(j * self.page_tokens for j in range(1, len(table)) if table[j] != table[j - 1] + 1)
        self._bounds = sorted(ends)
        self._pieces = {}

    def release(self, memory: CacheMemory) -> None:
        """Give every page and its bytes back, once. The tables stay as they are: the session's last pass may
        still be running (its client went away mid-step), and it must finish as it began."""
        if not self.released:
            self.released = True
            self.pool.release(self)
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

    def segments(self, start: int, end: int) -> list[tuple[int, int, list[int]]]:
        """Tokens `[start, end)` as pieces that are consecutive slots of the pool in every row: (first token,
        end token, each row's slot of the first token)."""
        assert end <= self.capacity, "pages must be granted before the compute thread touches them"
        pieces = self._pieces.get((start, end))
        if pieces is None:
            pieces, tokens = [], self.page_tokens
            for a, b in zip(self._bounds, self._bounds[1:]):
                a, b = max(a, start), min(b, end)
                if a < b:
                    pieces.append((a, b, [t[a // tokens] * tokens + a % tokens for t in self.tables]))
            if len(self._pieces) >= 8:  # old lengths: a session asks for a few per step
                self._pieces.clear()
            self._pieces[(start, end)] = pieces
        return pieces

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, at: int) -> None:
        """Store `key`/`value` (batch, kv_heads, q, width) at positions `[at, at + q)` of block `layer`, in its
        pages. Keys and values may differ in width (DeepSeek's blocks cache a compressed latent as keys and a
        rotary key as values)."""
        stores = self.pool.stores(layer, key, value)
        for a, b, starts in self.segments(at, at + key.shape[2]):
            for pool, new in stores:
                part = new[:, :, a - at : b - at]
                view = _rows_view(pool, starts, b - a)
                if view is not None:
                    view.copy_(part)
                else:
                    for row, slot in enumerate(starts):
                        pool[:, slot : slot + b - a] = part[row]

    def views(self, layer: int, length: int, row: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Tokens `[0, length)` of block `layer` as (keys, values) pairs of (batch, kv_heads, tokens, width),
        one per piece of consecutive slots: views of the pool, or stacked copies (counted) where the rows'
        slots are not evenly spaced. With `row`, that row's alone, (1, kv_heads, tokens, width): views always."""
        out = []
        for a, b, starts in self.segments(0, length):
            pair = []
            for pool in (self.pool.keys[layer], self.pool.values[layer]):
                view = _rows_view(pool, starts if row is None else starts[row : row + 1], b - a)
                if view is None:
                    view = torch.stack([pool[:, slot : slot + b - a] for slot in starts])
                    self.copied += nbytes(view)
                pair.append(view)
            out.append((pair[0], pair[1]))
        return out

    def in_place(self, length: int) -> bool:
        """Whether tokens `[0, length)` read as one view of the pool in every block."""
        return len(self.segments(0, length)) == 1 and self.evenly(length)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens `[0, length)` of block `layer` as one (batch, kv_heads, length, width) pair: a view of the
        pool when `in_place`, else the pieces copied together (counted)."""
        pieces = self.views(layer, length)
        if len(pieces) == 1:
            return pieces[0]
        keys, values = torch.cat([k for k, _ in pieces], dim=2), torch.cat([v for _, v in pieces], dim=2)
        self.copied += nbytes(keys) + nbytes(values)
        return keys, values


def _evenly(starts: list[int]) -> bool:
    return len(starts) == 1 or (starts[1] > starts[0] and all(b - a == starts[1] - starts[0] for a, b in zip(starts, starts[1:])))


def _rows_view(pool: torch.Tensor, starts: list[int], tokens: int) -> torch.Tensor | None:
    """(rows, heads, tokens, width) of `pool` (heads, slots, width) from each row's first slot, as one view:
    possible when the rows are evenly spaced in the pool, else None."""
    if not _evenly(starts):
        return None
    heads, slots, width = pool.shape
    step = (starts[1] - starts[0]) if len(starts) > 1 else tokens
    return pool.as_strided((len(starts), heads, tokens, width), (step * width, slots * width, width, 1),
                           pool.storage_offset() + starts[0] * width)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
