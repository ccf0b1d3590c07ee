"""Counting work on both ends of a call: the server counts what it served, the client what it requested.

Both sides count with `work_units`, so an honest server's receipt never claims more than its client counted,
and the client can refuse to countersign anything more (see `receipts.countersign`).
"""

from __future__ import annotations

import collections
import threading
import time

from swarmllm.points.receipts import Receipt, countersign, issue
from swarmllm.trust.identity import Identity


def work_units(blocks: int, tokens: int) -> int:
    """The work of running `tokens` token positions (batch rows x new positions) through `blocks` blocks."""
    if blocks < 0 or tokens < 0:
        raise ValueError(f"work of {blocks} blocks x {tokens} tokens")
    return blocks * tokens


class ServedWork:
    """The server's side: cumulative work per client since `epoch` (this ledger's start, unix seconds).

    Totals live in memory only: a restarted server starts a new epoch, so it never re-issues totals that
    overlap receipts its clients already countersigned. Thread-safe.
    """

    def __init__(self, epoch: int | None = None):
        self.epoch = int(time.time()) if epoch is None else epoch
        self._totals: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def add(self, client: str, work: int) -> int:
        """Count `work` more units served to `client`; returns the new total."""
        if work < 0:
            raise ValueError(f"negative work {work}")
        with self._lock:
            self._totals[client] += work
            return self._totals[client]

    def total(self, client: str) -> int:
        with self._lock:
            return self._totals[client]

    def receipt(self, identity: Identity, client: str, now: float | None = None) -> Receipt:
        """A server-signed receipt for everything served to `client` this epoch (sign per call, not per token)."""
        return issue(identity, client, self.total(client), self.epoch, now)


class RequestedWork:
    """The client's side: work requested per server, and the receipts it has countersigned.

    The client countersigns a receipt only while the totals it has signed for that server, summed over all
    the server's epochs, stay within what it requested. So a server that starts a new epoch gets no second
    count of the same work. (After the client restarts, it has requested nothing yet: an old epoch can only be
    raised by work requested since then.) Thread-safe.
    """

    def __init__(self) -> None:
        self._requested: collections.Counter[str] = collections.Counter()
        self._signed: dict[str, dict[int, int]] = collections.defaultdict(dict)  # server -> epoch -> total
        self._lock = threading.Lock()

    def add(self, server: str, work: int) -> int:
        """Count `work` more units requested from `server`; returns the new total."""
        if work < 0:
            raise ValueError(f"negative work {work}")
        with self._lock:
            self._requested[server] += work
            return self._requested[server]

    def requested(self, server: str) -> int:
        with self._lock:
            return self._requested[server]

    def servers(self) -> list[str]:
        """Every server work was requested from."""
        with self._lock:
            return list(self._requested)

    def allowance(self, server: str, epoch: int) -> int:
        """The highest total this client will countersign for `server` in `epoch`."""
        with self._lock:
            return self._allowance(server, epoch)

    def countersign(self, identity: Identity, receipt: Receipt) -> Receipt:
        """Countersign `receipt` within this client's allowance (raises `ReceiptError` otherwise)."""
        with self._lock:  # one receipt at a time, so two concurrent ones cannot both spend the same allowance
            signed = countersign(identity, receipt, self._allowance(receipt.server, receipt.epoch))
            known = self._signed[receipt.server].get(receipt.epoch, 0)
            self._signed[receipt.server][receipt.epoch] = max(known, receipt.total_work)
            return signed

    def _allowance(self, server: str, epoch: int) -> int:  # with the lock held
        other_epochs = sum(t for e, t in self._signed[server].items() if e != epoch)
        return max(0, self._requested[server] - other_epochs)
