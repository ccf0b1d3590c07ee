"""Pure route choice: a snapshot of the swarm in, a chain of servers covering the blocks out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from swarmllm.protocol import ServerRecord


class MissingBlocksError(RuntimeError):
    """No live server holds some blocks. `missing` lists them."""

    def __init__(self, missing: Sequence[int], waited: float | None = None):
        self.missing = list(missing)
        ranges = _ranges(self.missing)
        after = f" after waiting {waited:.0f}s" if waited is not None else ""
        super().__init__(f"no server in the swarm holds blocks {ranges}{after}")


class NoHolderError(RuntimeError):
    """No usable server holds all of a range of blocks (stateless calls need one that does)."""


@dataclass(frozen=True)
class Hop:
    """One server of a route and the blocks it runs for this route."""

    peer_id: str
    start: int
    end: int


def missing_blocks(records: Iterable[ServerRecord], start: int, end: int) -> list[int]:
    covered = set()
    for r in records:
        covered.update(range(max(r.start, start), min(r.end, end)))
    return [i for i in range(start, end) if i not in covered]


def fewest_hops(records: Sequence[ServerRecord], start: int, end: int, exclude: frozenset[str] = frozenset()) -> list[Hop]:
    """A route over blocks `[start, end)` with as few servers as possible.

    Greedy is optimal for interval cover: at each block take the server that reaches furthest from it.
    Ties go to the server with more free cache, so sessions spread over redundant servers.
    """
    usable = [r for r in records if r.peer_id not in exclude]
    missing = missing_blocks(usable, start, end)
    if missing:
        raise MissingBlocksError(missing)
    route, pos = [], start
    while pos < end:
        best = max(
            (r for r in usable if r.start <= pos < r.end),
            key=lambda r: (min(r.end, end), r.cache_tokens_left, r.peer_id),
        )
        route.append(Hop(best.peer_id, pos, min(best.end, end)))
        pos = min(best.end, end)
    return route


def holders(records: Iterable[ServerRecord], start: int, end: int, exclude: frozenset[str] = frozenset()) -> list[ServerRecord]:
    """Servers holding all of `[start, end)`, best first by the same tie-break as `fewest_hops`."""
    found = [r for r in records if r.start <= start and end <= r.end and r.peer_id not in exclude]
    return sorted(found, key=lambda r: (r.cache_tokens_left, r.peer_id), reverse=True)


def _ranges(blocks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0:3, 5:6' (end-exclusive, as spans are written everywhere else)."""
    parts, i = [], 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        parts.append(f"{blocks[i]}:{blocks[j] + 1}")
        i = j + 1
    return ", ".join(parts)
