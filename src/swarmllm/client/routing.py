"""Pure route choice: a snapshot of the swarm in, a chain of servers covering the blocks out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from swarmllm.protocol import ServerRecord


class MissingBlocksError(RuntimeError):
    """No live server holds some blocks. `missing` lists them."""

    def __init__(self, missing: Sequence[int], waited: float | None = None, version: str | None = None):
        self.missing = list(missing)
        ranges = _ranges(self.missing)
        after = f" after waiting {waited:.0f}s" if waited is not None else ""
        which = f" in version {version!r}" if version else ""
        super().__init__(f"no server in the swarm holds blocks {ranges}{which}{after}")


class NoHolderError(RuntimeError):
    """No usable server holds all of a range of blocks (stateless calls need one that does)."""


@dataclass(frozen=True)
class Hop:
    """One server of a route and the blocks it runs for this route."""

    peer_id: str
    start: int
    end: int


# Which version of each block a client wants: block -> override name. Blocks not listed: base weights.
Versions = Mapping[int, str]
_BASE: Versions = {}


def reach(r: ServerRecord, pos: int, end: int, versions: Versions = _BASE) -> int:
    """How far from block `pos` (exclusive end, capped at `end`) server `r` can run the blocks the client
    wants. A server running another version of a block than the client asked for stops the run there: an
    override and the base weights are never mixed by accident."""
    if r.start > pos:
        return pos
    stop = min(r.end, end)
    if r.override is None and not versions:
        return stop
    e = pos
    while e < stop and r.block_version(e) == versions.get(e):
        e += 1
    return e


def missing_blocks(records: Iterable[ServerRecord], start: int, end: int, versions: Versions = _BASE) -> list[int]:
    covered = set()
    for r in records:
        for b in range(max(r.start, start), min(r.end, end)):
            if r.block_version(b) == versions.get(b):
                covered.add(b)
    return [i for i in range(start, end) if i not in covered]


def fewest_hops(
    records: Sequence[ServerRecord], start: int, end: int, exclude: frozenset[str] = frozenset(),
    versions: Versions = _BASE,
) -> list[Hop]:
    """A route over blocks `[start, end)` with as few servers as possible, each block run in the version
    the client wants (see `reach`).

    Greedy is optimal for interval cover: at each block take the server that reaches furthest from it.
    Ties go to the server with more free cache, so sessions spread over redundant servers.
    """
    usable = [r for r in records if r.peer_id not in exclude]
    missing = missing_blocks(usable, start, end, versions)
    if missing:
        raise MissingBlocksError(missing)
    route, pos = [], start
    while pos < end:
        best_reach, best = max(
            ((reach(r, pos, end, versions), r) for r in usable if r.start <= pos < r.end),
            key=lambda x: (x[0], x[1].cache_tokens_left, x[1].peer_id),
        )
        route.append(Hop(best.peer_id, pos, best_reach))
        pos = best_reach
    return route


def holders(
    records: Iterable[ServerRecord], start: int, end: int, exclude: frozenset[str] = frozenset(),
    versions: Versions = _BASE,
) -> list[ServerRecord]:
    """Servers holding all of `[start, end)` in the wanted versions, best first by `fewest_hops`' tie-break."""
    found = [
        r for r in records
        if r.start <= start and end <= r.end and r.peer_id not in exclude and reach(r, start, end, versions) == end
    ]
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
