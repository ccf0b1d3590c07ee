"""Client-owned LoRA weights cached on a server, per requester and content hash.

A training step sends the same weights with its forward and its backward (and with every chunk of a large
batch); an inference session uses them for every step. Caching them by content hash means they cross the
network once per optimizer step instead of once per request. Entries are keyed by (requester, hash), so
one client can never use, or learn about, another client's weights. Memory is bounded: least recently used
entries are evicted first, and a client whose weights were evicted gets `NOT_CACHED` and sends them again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from swarmllm.adapters import lora
from swarmllm.protocol import LoraRef


class NotCached(KeyError):
    pass


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class _Pending:
    ref: LoraRef
    start: int
    end: int
    parts: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # block -> its tensors
    since: float = field(default_factory=time.monotonic)


class LoraCache:
    """Bounded LRU of verified client LoRA weights. Not thread-safe: used from the event loop only."""

    def __init__(self, max_bytes: int, pending_timeout: float = 60.0):
        self.max_bytes, self.pending_timeout = max_bytes, pending_timeout
        self._entries: OrderedDict[tuple[str, str], tuple[int, int, list[torch.Tensor]]] = OrderedDict()
        self._pending: dict[tuple[str, str], _Pending] = {}
        self.used = 0

    def get(self, peer: str, ref: LoraRef, start: int, end: int) -> list[torch.Tensor]:
        """The tensors for blocks [start, end) in wire order (a sub-range of what was uploaded is fine)."""
        entry = self._entries.get((peer, ref.sha256))
        if entry is None:
            raise NotCached(ref.sha256)
        self._entries.move_to_end((peer, ref.sha256))
        first, last, tensors = entry
        if not (first <= start < end <= last):
            raise NotCached(ref.sha256)
        per_block = 2 * len(ref.targets)
        return tensors[(start - first) * per_block : (end - first) * per_block]

    def put(self, peer: str, ref: LoraRef, start: int, end: int, blocks: tuple[int, ...], tensors: list[torch.Tensor]) -> bool:
        """Add one part of an upload; returns True once the whole range arrived, verified and stored.

        Raises `lora.LoraShapeError` if the part is malformed or the complete weights do not match the hash.
        """
        self._expire_pending()
        if not blocks or any(not start <= b < end for b in blocks) or end <= start:
            raise lora.LoraShapeError(f"part blocks {list(blocks)} are not within {start}:{end}")
        per_block = 2 * len(ref.targets)
        if len(tensors) != per_block * len(blocks):
            raise lora.LoraShapeError(f"expected {per_block * len(blocks)} tensors for blocks {list(blocks)}, got {len(tensors)}")
        if _nbytes(tensors) > self.max_bytes:
            raise lora.LoraShapeError(f"LoRA weights of {_nbytes(tensors)} bytes exceed this server's limit of {self.max_bytes}")
        key = (peer, ref.sha256)
        pending = self._pending.setdefault(key, _Pending(ref, start, end))
        for i, b in enumerate(blocks):
            pending.parts[b] = tensors[i * per_block : (i + 1) * per_block]
        if len(pending.parts) < end - start:
            return False
        del self._pending[key]
        flat = [t for b in range(start, end) for t in pending.parts[b]]
        if lora.content_hash(start, end, ref.targets, ref.rank, flat) != ref.sha256:
            raise lora.LoraShapeError("LoRA weights do not match their sha256: corrupted or tampered in transit")
        self._store(key, start, end, flat)
        return True

    def _store(self, key: tuple[str, str], start: int, end: int, tensors: list[torch.Tensor]) -> None:
        if key in self._entries:
            self.used -= _nbytes(self._entries.pop(key)[2])
        size = _nbytes(tensors)
        while self._entries and self.used + size > self.max_bytes:
            _, (_, _, old) = self._entries.popitem(last=False)
            self.used -= _nbytes(old)
        self._entries[key] = (start, end, tensors)
        self.used += size

    def _expire_pending(self) -> None:
        now = time.monotonic()
        for key in [k for k, p in self._pending.items() if now - p.since > self.pending_timeout]:
            del self._pending[key]
