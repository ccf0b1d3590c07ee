"""Contribution points without a blockchain: balances computed from countersigned work receipts.

A peer's balance is the work it served others minus the work others served it, in block-tokens, summed
over the latest receipt of each (server, client, epoch). Anyone can recompute everyone's balance from the
receipts published in the DHT (`Ledger.from_receipts`); there is no global order and no consensus, because a
receipt needs none: it is valid on its own, and a newer total simply supersedes an older one.

What this does and does not guarantee:

- A server cannot claim work it did not do: the client countersigns only totals within what it requested.
- Nobody can forge a receipt for others (both signatures bind keys to peer ids) nor mint points by serving
  itself (a receipt between a peer and itself is refused).
- Sybils are not stopped: a peer that controls two identities can countersign between them and move points
  from one to the other, or inflate one without limit. Cheap identities make this cheap in a public swarm.
  A private swarm admits only its members (the swarm key), so there it is a member misbehaving, not a
  stranger. In either case the scheduler's newcomer share (`swarmllm.points.priority`) bounds what peers
  without points lose to those with them, so inflated balances buy queue position, never exclusion.
- Points are priority, not money: they decide who waits, not who pays. Do not give them value outside.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterable

from swarmllm.points.receipts import Receipt, ReceiptError, check

logger = logging.getLogger(__name__)


class Ledger:
    """The latest valid, countersigned receipt per (server, client, epoch), and the balances they give.

    Balances are kept up to date on `add`, so `balance` is a dictionary lookup (the scheduler calls it on
    every pass). Thread-safe.
    """

    def __init__(self) -> None:
        self._latest: dict[tuple[str, str, int], Receipt] = {}
        self._balances: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    @classmethod
    def from_receipts(cls, receipts: Iterable[Receipt]) -> Ledger:
        """A ledger of every receipt that is valid and the latest of its pair; the rest are skipped (the DHT
        holds anybody's records, and the same receipt is often published by both of its peers)."""
        ledger = cls()
        for receipt in receipts:
            try:
                ledger.add(receipt)
            except ReceiptError as e:
                logger.debug("skipping a receipt of %s for %s: %s", receipt.server, receipt.client, e)
        return ledger

    def add(self, receipt: Receipt) -> None:
        """Keep `receipt` if it is valid and newer than what is known for its pair. Raises `ReceiptError` if it
        is forged or self-signed (see `receipts.check`), replayed (the same total as known) or stale (lower)."""
        check(receipt)
        with self._lock:
            known = self._latest.get(receipt.pair)
            before = 0 if known is None else known.total_work
            if known is not None and receipt.total_work == before:
                raise ReceiptError(f"replayed: {receipt.total_work} work units are already counted")
            if receipt.total_work < before:
                raise ReceiptError(
                    f"stale: {receipt.total_work} work units, but {before} are already counted"
                )
            self._latest[receipt.pair] = receipt
            gained = receipt.total_work - before
            self._balances[receipt.server] += gained
            self._balances[receipt.client] -= gained

    def balance(self, peer: str) -> float:
        """Work `peer` served others minus work others served it (0 for a peer without receipts)."""
        with self._lock:
            return float(self._balances.get(peer, 0))

    def balances(self) -> dict[str, float]:
        """Every peer named in a receipt, with its balance."""
        with self._lock:
            return {peer: float(b) for peer, b in self._balances.items()}

    def latest(self, pair: tuple[str, str, int]) -> Receipt | None:
        """The latest receipt of (server, client, epoch), if any."""
        with self._lock:
            return self._latest.get(pair)

    def receipts(self) -> list[Receipt]:
        """The latest receipt of each pair: all it takes to rebuild this ledger elsewhere."""
        with self._lock:
            return list(self._latest.values())
