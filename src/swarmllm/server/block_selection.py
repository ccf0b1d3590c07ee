"""Choosing which blocks a server with `--num-blocks N` serves. Pure: a snapshot in, a span out.

For now the rule is coverage: serve the window of N blocks with the fewest servers on it, so that a new
server first fills gaps, then adds redundancy where it is thinnest. (Throughput-aware choice and
rebalancing come later; they replace this function, not its callers.)
"""

from __future__ import annotations

from collections.abc import Iterable

from swarmllm.protocol import ServerRecord


def coverage(records: Iterable[ServerRecord], num_blocks: int) -> list[int]:
    """Number of servers holding each block."""
    counts = [0] * num_blocks
    for r in records:
        for i in range(max(0, r.start), min(num_blocks, r.end)):
            counts[i] += 1
    return counts


def choose_span(records: Iterable[ServerRecord], num_blocks: int, n: int) -> tuple[int, int]:
    n = min(n, num_blocks)
    counts = coverage(records, num_blocks)
    # Lexicographic key: first the thinnest block in the window (fill gaps first), then total coverage,
    # then the lowest start so that equal choices are deterministic.
    best = min(range(num_blocks - n + 1), key=lambda s: (min(counts[s : s + n]), sum(counts[s : s + n]), s))
    return best, best + n
