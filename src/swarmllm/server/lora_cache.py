"""Client-owned LoRA weights cached on a server, per requester and content hash.

A training step sends the same weights with its forward and its backward (and with every chunk of a large
batch); an inference session uses them for every step. Caching them by content hash means they cross the
network once per optimizer step instead of once per request. Entries are keyed by (requester, hash), so
one client can never use, or learn about, another client's weights. Memory is bounded: least recently used
entries are evicted first, and a client whose weights were evicted gets `NOT_CACHED` and sends them again.
Unfinished uploads are bounded too: one peer's share `max_bytes` (its oldest is dropped for a new one),
and all peers' together take at most twice that.
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


class UploadsFull(RuntimeError):
    """Unfinished uploads of many peers already take all the memory they may: retry later."""


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
        # (peer, sha256) -> (first block, end block, (targets, rank), tensors)
        self._entries: OrderedDict[tuple[str, str], tuple[int, int, tuple, list[torch.Tensor]]] = OrderedDict()
        self._pending: dict[tuple[str, str], _Pending] = {}
        self.used = 0

    def get(self, peer: str, ref: LoraRef, start: int, end: int) -> list[torch.Tensor]:
        """The tensors for blocks [start, end) in wire order (a sub-range of what was uploaded is fine)."""
        entry = self._entries.get((peer, ref.sha256))
        if entry is None:
            raise NotCached(ref.sha256)
        self._entries.move_to_end((peer, ref.sha256))
        first, last, layout, tensors = entry
        # The hash covers the layout, but a request restates it: one that names other modules or another
        # rank than the upload would apply the tensors to the wrong layers.
        if not (first <= start < end <= last) or layout != (ref.targets, ref.rank):
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
        self._make_room(peer, key, _nbytes(tensors))
        pending = self._pending.setdefault(key, _Pending(ref, start, end))
        for i, b in enumerate(blocks):
            pending.parts[b] = tensors[i * per_block : (i + 1) * per_block]
        if len(pending.parts) < end - start:
            return False
        del self._pending[key]
        flat = [t for b in range(start, end) for t in pending.parts[b]]
        if lora.content_hash(start, end, ref.targets, ref.rank, flat) != ref.sha256:
            raise lora.LoraShapeError("LoRA weights do not match their sha256: corrupted or tampered in transit")
        self._store(key, start, end, (ref.targets, ref.rank), flat)
        return True

    def _make_room(self, peer: str, key: tuple[str, str], size: int) -> None:
        """Room for `size` more pending bytes from `peer`: its own oldest other uploads are dropped for it.
        Raises UploadsFull if other peers' uploads take the rest."""
        mine = sorted((e.since, k) for k, e in self._pending.items() if k[0] == peer and k != key)
        while mine and self._pending_bytes(peer) + size > self.max_bytes:
            del self._pending[mine.pop(0)[1]]
        if self._pending_bytes(peer) + size > self.max_bytes:  # this upload alone: it could never be stored
            raise lora.LoraShapeError(f"LoRA weights of more than {self.max_bytes} bytes exceed this server's limit")
        # One peer takes at most half of what uploads may hold, so a single slow uploader never blocks the rest.
        if self._pending_bytes() + size > 2 * self.max_bytes:
            raise UploadsFull(f"unfinished LoRA uploads of other peers take all of the {2 * self.max_bytes} bytes they may")

    def _pending_bytes(self, peer: str | None = None) -> int:
        return sum(_nbytes(part) for (who, _), p in self._pending.items() if peer in (None, who) for part in p.parts.values())

    def _store(self, key: tuple[str, str], start: int, end: int, layout: tuple, tensors: list[torch.Tensor]) -> None:
        if key in self._entries:
            self.used -= _nbytes(self._entries.pop(key)[3])
        size = _nbytes(tensors)
        while self._entries and self.used + size > self.max_bytes:
            _, (_, _, _, old) = self._entries.popitem(last=False)
            self.used -= _nbytes(old)
        self._entries[key] = (start, end, layout, tensors)
        self.used += size

    def _expire_pending(self) -> None:
        now = time.monotonic()
        for key in [k for k, p in self._pending.items() if now - p.since > self.pending_timeout]:
            del self._pending[key]
