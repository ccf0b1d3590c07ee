"""Which waiting task runs next: contributors first, with a guaranteed share for everyone else.

The rule, in order:
1. Peers with a higher balance go first, because serving others is what earns a place in their queues;
   among equal balances, the older task goes first (plain FIFO when nobody has points).
2. But whenever a task of a newcomer or free rider (balance <= 0) waits, at least `newcomer_share` of the
   picks go to the oldest such task. Otherwise a swarm with a few contributors would never serve a new
   user, and new users are how a swarm gets new servers. Balances are also only as honest as Sybils allow
   (see `swarmllm.points.ledger`), so they must never decide whether a peer is served, only how soon.

The share is counted with an exact credit (no randomness): each pick that goes to a contributor while a
newcomer waits adds `newcomer_share`, and a full credit buys the oldest newcomer the next pick. A newcomer
task that is the oldest of its class therefore runs within ceil(1 / newcomer_share) picks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from fractions import Fraction


class PriorityPolicy:
    """Chooses the next task among the waiting ones. Stateful (the credit), so one per queue; not thread-safe
    (the scheduler calls it under its lock)."""

    def __init__(self, balance: Callable[[str], float], newcomer_share: float = 0.2):
        if not 0 <= newcomer_share <= 1:
            raise ValueError(f"newcomer_share must be within [0, 1], not {newcomer_share}")
        self.balance = balance
        # Exact arithmetic: with floats, five credits of 0.2 might not quite make one.
        self.share = Fraction(newcomer_share).limit_denominator(10**6)
        self._credit = Fraction(0)  # stays in [0, 1)
        # Picks made while a contributor and a newcomer both waited, by who got them: the newcomer ones
        # because of the share. Counted so that a server's own ordering of work can be read (metrics, tests).
        self.contributor_picks = 0
        self.newcomer_picks = 0

    @property
    def max_wait(self) -> float:
        """Picks the oldest newcomer task waits at most (contributors' picks in between included)."""
        return math.ceil(1 / self.share) if self.share else math.inf

    def pick(self, peers: Iterable[str]) -> int:
        """The index of the task to run next, given the requesters of the waiting tasks in arrival order."""
        first: dict[str, int] = {}  # each peer's oldest task: the only one of its tasks that can be picked
        for i, peer in enumerate(peers):
            if peer not in first:
                first[peer] = i
        if not first:
            raise ValueError("no task is waiting")
        best, best_balance, newcomer = None, 0.0, None
        for peer, i in first.items():
            b = self.balance(peer)
            b = 0.0 if math.isnan(b) else b  # a broken lookup must not make every comparison false
            if best is None or b > best_balance or (b == best_balance and i < best):
                best, best_balance = i, b
            if b <= 0 and (newcomer is None or i < newcomer):
                newcomer = i
        assert best is not None  # `first` is not empty
        if newcomer is None or best_balance <= 0:
            return best  # no contributor waits ahead of a newcomer: nothing to share
        self._credit += self.share
        if self._credit >= 1:
            self._credit -= 1
            self.newcomer_picks += 1
            return newcomer
        self.contributor_picks += 1
        return best
