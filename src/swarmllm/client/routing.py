"""Pure route choice: a snapshot of the swarm in, a chain of servers covering the blocks out."""

from __future__ import annotations

import random
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


def _usable(records: Iterable[ServerRecord], start: int, end: int, exclude: frozenset[str], versions: Versions) -> list[ServerRecord]:
    """The records not excluded; raises MissingBlocksError if they leave some block of [start, end) uncovered."""
    usable = [r for r in records if r.peer_id not in exclude]
    missing = missing_blocks(usable, start, end, versions)
    if missing:
        raise MissingBlocksError(missing)
    return usable


def fewest_hops(
    records: Sequence[ServerRecord], start: int, end: int, exclude: frozenset[str] = frozenset(),
    versions: Versions = _BASE,
) -> list[Hop]:
    """A route over blocks `[start, end)` with as few servers as possible, each block run in the version
    the client wants (see `reach`).

    Greedy is optimal for interval cover: at each block take the server that reaches furthest from it.
    Ties go to the server with more free cache, so sessions spread over redundant servers.
    """
    usable = _usable(records, start, end, exclude, versions)
    route, pos = [], start
    while pos < end:
        best_reach, best = max(
            ((reach(r, pos, end, versions), r) for r in usable if r.start <= pos < r.end),
            key=lambda x: (x[0], x[1].cache_tokens_left, x[1].peer_id),
        )
        route.append(Hop(best.peer_id, pos, best_reach))
        pos = best_reach
    return route


# Used for servers that announce no measurement yet, and for links nobody has measured.
DEFAULT_STEP_TIME = 0.01  # seconds per block per inference step
DEFAULT_RTT = 0.05  # seconds


def fastest_route(
    records: Sequence[ServerRecord], start: int, end: int, rtts: Mapping[str, float],
    exclude: frozenset[str] = frozenset(), versions: Versions = _BASE,
) -> list[Hop]:
    """The route over `[start, end)` with the least expected time for one inference step.

    A step is driven by the client, so a hop on server r over k blocks costs `rtts[r] + k * r.step_time`
    (the client's measured round trip plus the server's announced compute). The best route is a shortest
    path over block positions; it is computed in one left-to-right pass: for a server r and an end e,
    the best start is the position p minimising `best[p] - p * step_time(r)`, kept as a running minimum
    while r stays usable, so the cost is linear in the total coverage (2,000 servers x 30 blocks: ~60k
    updates) rather than quadratic.
    """
    usable = _usable(records, start, end, exclude, versions)
    at: list[list[ServerRecord]] = [[] for _ in range(end - start)]  # servers usable for each block
    for r in usable:
        for b in range(max(r.start, start), min(r.end, end)):
            if r.block_version(b) == versions.get(b):
                at[b - start].append(r)
    inf = float("inf")
    best = [inf] * (end - start + 1)
    back: list[tuple[ServerRecord, int] | None] = [None] * (end - start + 1)
    best[0] = 0.0
    running: dict[str, tuple[float, int]] = {}  # peer -> (min of best[p] - p * t, argmin p) over its current run
    for i, servers in enumerate(at):
        current: dict[str, tuple[float, int]] = {}
        for r in servers:
            t = r.step_time or DEFAULT_STEP_TIME
            here = (best[i] - i * t, i)
            prev = running.get(r.peer_id)
            current[r.peer_id] = min(prev, here) if prev is not None else here
        running = current  # a server unusable at this block ends its run: it cannot skip a block
        for r in servers:
            t = r.step_time or DEFAULT_STEP_TIME
            value, p = running[r.peer_id]
            cost = value + (i + 1) * t + rtts.get(r.peer_id, DEFAULT_RTT)
            if cost < best[i + 1]:
                best[i + 1], back[i + 1] = cost, (r, p)
    route, i = [], end - start
    while i > 0:
        step = back[i]
        assert step is not None  # `_usable` found every block covered (at its version), so each was reached
        r, p = step
        route.append(Hop(r.peer_id, start + p, start + i))
        i = p
    return route[::-1]


def spread_route(
    records: Sequence[ServerRecord], start: int, end: int, rng: random.Random,
    exclude: frozenset[str] = frozenset(), versions: Versions = _BASE,
) -> list[Hop]:
    """A route for forward/backward batches that spreads load over servers in proportion to throughput.

    At each position, a server is drawn among those usable there with probability proportional to its
    announced `forward_tps` times the blocks it can take from here (fewer hops also means less transfer).
    """
    usable = _usable(records, start, end, exclude, versions)
    route, pos = [], start
    while pos < end:
        options = [(r, reach(r, pos, end, versions)) for r in usable if r.start <= pos < r.end]
        options = [(r, e) for r, e in options if e > pos]
        weights = [(r.forward_tps or 1.0) * (e - pos) for r, e in options]
        r, e = rng.choices(options, weights=weights)[0]
        route.append(Hop(r.peer_id, pos, e))
        pos = e
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
