"""Admission of sessions within a server-wide attention-cache budget.

A session declares `batch_size x max_length` tokens up front and is admitted only if they fit; the
reservation is released when the session closes or times out, whatever the reason. Caches themselves
grow on demand (transformers' DynamicCache), so the budget bounds memory without pre-allocating it.
"""

from __future__ import annotations

import threading


class CacheFullError(RuntimeError):
    pass


class CacheBudget:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._used = 0
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return self.max_tokens - self._used

    def reserve(self, tokens: int) -> None:
        with self._lock:
            if tokens > self.max_tokens:
                raise CacheFullError(
                    f"session needs {tokens} cache tokens (batch x max_length) but this server's whole budget is "
                    f"{self.max_tokens}"
                )
            if tokens > self.max_tokens - self._used:
                raise CacheFullError(
                    f"session needs {tokens} cache tokens but only {self.max_tokens - self._used} of "
                    f"{self.max_tokens} are free now"
                )
            self._used += tokens

    def release(self, tokens: int) -> None:
        with self._lock:
            self._used = max(0, self._used - tokens)
