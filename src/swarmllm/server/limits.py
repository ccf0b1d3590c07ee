"""Per-peer limits: how much of a server one requester may hold at once, and how fast it may ask.

A server serves whoever calls it, so no single peer may take all of it: without limits one client could
open every session the cache allows, queue a million tokens ahead of everyone, or stream requests of
unbounded size into memory. `PeerLimits` is the bookkeeping that prevents this. It is pure (no I/O, no
locks: the handler uses it from its event loop only) and reads time from the clock it is given, so it is
unit-tested with a fake one.

Guarantees, per requester peer id:

- at most `max_sessions` inference sessions open at once;
- at most `max_tokens_in_flight` tokens (batch x new tokens) in requests admitted and not yet finished;
- at most `max_request_bytes` bytes in requests being received or computed (so also no larger request);
- requests admitted at `rate` per second on average, in bursts of at most `burst` (a token bucket);
- no request whose attention (batch x query tokens x key tokens) exceeds `max_attention`: its memory
  grows so, and one such request could take all of a server's memory.

A refusal raises `RateLimited` and changes nothing, so the caller may retry later, or elsewhere.
Memory is bounded too: the state of a peer that holds nothing and has a full bucket is indistinguishable
from no state, so it is dropped once many peers are tracked.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from swarmllm.server.config import ServerConfig, default


class RateLimited(RuntimeError):
    """A peer hit one of its limits on this server: retry later, or on another server."""


@dataclass(frozen=True)
class Limits:
    """The limits themselves (see the module docstring); the defaults never throttle normal use."""

    max_sessions: int = default("max_sessions_per_peer")
    max_tokens_in_flight: int = default("max_tokens_in_flight_per_peer")
    max_request_bytes: int = default("max_request_bytes_per_peer")
    rate: float = default("requests_per_second_per_peer")  # requests per second, on average
    burst: int = default("request_burst_per_peer")  # requests at once after a quiet period
    max_attention: int = default("max_attention_per_request")

    def __post_init__(self) -> None:
        if min(self.max_sessions, self.max_tokens_in_flight, self.max_request_bytes, self.burst, self.max_attention) < 1:
            raise ValueError(f"every limit must be at least 1: {self}")
        if not self.rate > 0:
            raise ValueError(f"rate must be positive, got {self.rate}")

    @classmethod
    def from_config(cls, config: ServerConfig) -> Limits:
        return cls(
            max_sessions=config.max_sessions_per_peer,
            max_tokens_in_flight=config.max_tokens_in_flight_per_peer,
            max_request_bytes=config.max_request_bytes_per_peer,
            rate=config.requests_per_second_per_peer,
            burst=config.request_burst_per_peer,
            max_attention=config.max_attention_per_request,
        )


@dataclass
class _Peer:
    """What one peer holds now. `allowance` is the bucket's content as of `stamp`."""

    allowance: float
    stamp: float
    sessions: int = 0
    tokens: int = 0
    nbytes: int = 0

    @property
    def holds_nothing(self) -> bool:
        return self.sessions == 0 and self.tokens == 0 and self.nbytes == 0


class PeerLimits:
    """Enforces `Limits` per peer. Every `check`/`hold` either succeeds or raises `RateLimited` with no effect."""

    # Above this many tracked peers, idle ones are forgotten (they would start with a full bucket anyway).
    PRUNE_AT = 4096

    def __init__(self, limits: Limits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits = limits if limits is not None else Limits()
        self.clock = clock
        self._peers: dict[str, _Peer] = {}
        self._prune_at = self.PRUNE_AT

    # --- rate ---

    def admit(self, peer: str) -> None:
        """Take one request from `peer`'s bucket."""
        state, limits = self._state(peer), self.limits
        if state.allowance < 1:
            wait = (1 - state.allowance) / limits.rate
            raise RateLimited(f"more than {limits.rate:g} requests/s (bursts of {limits.burst}); retry in {wait:.2f}s")
        state.allowance -= 1

    # --- sessions ---

    def open_session(self, peer: str) -> None:
        state = self._state(peer)
        if state.sessions >= self.limits.max_sessions:
            raise RateLimited(f"{state.sessions} sessions open: at most {self.limits.max_sessions} per peer at once")
        state.sessions += 1

    def close_session(self, peer: str) -> None:
        self._release(peer, sessions=1)

    # --- tokens and bytes in flight ---

    def check_attention(self, batch: int, queries: int, keys: int) -> None:
        """Refuse a request whose attention (batch x queries x keys) could take all of a server's memory."""
        size = batch * queries * keys
        if size > self.limits.max_attention:
            raise RateLimited(
                f"attention of batch {batch} x {queries} x {keys} tokens = {size} exceeds this server's limit of "
                f"{self.limits.max_attention} per request: send fewer rows or tokens per request"
            )

    @contextlib.contextmanager
    def tokens(self, peer: str, n: int) -> Iterator[None]:
        """Hold `n` tokens of `peer`'s in-flight allowance while the block runs."""
        self.hold_tokens(peer, n)
        try:
            yield
        finally:
            self.release_tokens(peer, n)

    def hold_tokens(self, peer: str, n: int) -> None:
        state, most = self._state(peer), self.limits.max_tokens_in_flight
        if n > most:
            raise RateLimited(f"a request of {n} tokens exceeds this server's limit of {most} tokens per peer")
        if state.tokens + n > most:
            raise RateLimited(f"{state.tokens} tokens in flight: at most {most} per peer at once")
        state.tokens += n

    def release_tokens(self, peer: str, n: int) -> None:
        self._release(peer, tokens=n)

    def hold_bytes(self, peer: str, n: int) -> None:
        """Hold `n` more bytes of a request being received (call per part, as the parts arrive)."""
        state, most = self._state(peer), self.limits.max_request_bytes
        if n > most:
            raise RateLimited(f"a request of {n} bytes exceeds this server's limit of {most} bytes per peer")
        if state.nbytes + n > most:
            raise RateLimited(f"{state.nbytes + n} bytes of requests in flight: at most {most} per peer at once")
        state.nbytes += n

    def release_bytes(self, peer: str, n: int) -> None:
        self._release(peer, nbytes=n)

    # --- bookkeeping ---

    def held(self, peer: str) -> tuple[int, int, int]:
        """(sessions, tokens, bytes) that `peer` holds now."""
        state = self._peers.get(peer)
        return (state.sessions, state.tokens, state.nbytes) if state is not None else (0, 0, 0)

    @property
    def tracked(self) -> int:
        return len(self._peers)

    def _state(self, peer: str) -> _Peer:
        now = self.clock()
        state = self._peers.get(peer)
        if state is None:
            if len(self._peers) >= self._prune_at:
                self._prune(now)
            state = self._peers[peer] = _Peer(allowance=float(self.limits.burst), stamp=now)
            return state
        # The bucket refills continuously; a clock that steps back refills nothing.
        state.allowance = min(self.limits.burst, state.allowance + max(0.0, now - state.stamp) * self.limits.rate)
        state.stamp = now
        return state

    def _release(self, peer: str, sessions: int = 0, tokens: int = 0, nbytes: int = 0) -> None:
        state = self._peers.get(peer)
        if state is None:  # a release without a hold: a bug elsewhere must not make counts negative
            return
        state.sessions = max(0, state.sessions - sessions)
        state.tokens = max(0, state.tokens - tokens)
        state.nbytes = max(0, state.nbytes - nbytes)

    def _prune(self, now: float) -> None:
        limits = self.limits
        idle = [
            peer for peer, s in self._peers.items()
            if s.holds_nothing and s.allowance + max(0.0, now - s.stamp) * limits.rate >= limits.burst
        ]
        for peer in idle:
            del self._peers[peer]
        # Peers that hold something stay; pruning again only once twice as many are tracked keeps it O(1)
        # amortized per new peer.
        self._prune_at = max(self.PRUNE_AT, 2 * len(self._peers))
