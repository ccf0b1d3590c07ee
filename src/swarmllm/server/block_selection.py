"""Which blocks a server with `--num-blocks N` serves, and when it should move. Pure: snapshots in, spans out.

The swarm's speed for a block is the sum of what its servers contribute: a server of k blocks whose step
takes `step_time` seconds per block runs `1 / (k * step_time)` steps per second through its span, and
contributes that to each of its blocks. A pipeline through the model is as fast as its slowest block, so
the number that matters is the *bottleneck*: the minimum over blocks (0 where a block has no server).

- A new server takes the window whose weakest block is weakest (ties: the lower sum, then the lower
  start), so it fills gaps first and then adds capacity where the swarm is slowest.
- A running server moves only if moving raises the bottleneck by more than a threshold: small gains are
  not worth dropping its loaded weights and draining its sessions, and the threshold stops servers from
  chasing each other back and forth.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from swarmllm.protocol import ServerRecord

DEFAULT_STEP_TIME = 0.01  # seconds per block, for servers that announce no measurement


def coverage(records: Iterable[ServerRecord], num_blocks: int) -> list[int]:
    """Number of servers holding each block."""
    counts = [0] * num_blocks
    for r in records:
        for i in range(max(0, r.start), min(num_blocks, r.end)):
            counts[i] += 1
    return counts


def server_speed(r: ServerRecord) -> float:
    """Steps per second a server runs through its whole span."""
    return 1.0 / ((r.end - r.start) * (r.step_time or DEFAULT_STEP_TIME))


def block_speeds(records: Iterable[ServerRecord], num_blocks: int) -> list[float]:
    speeds = [0.0] * num_blocks
    for r in records:
        for i in range(max(0, r.start), min(num_blocks, r.end)):
            speeds[i] += server_speed(r)
    return speeds


def bottleneck(records: Iterable[ServerRecord], num_blocks: int) -> float:
    return min(block_speeds(records, num_blocks))


def choose_span(records: Iterable[ServerRecord], num_blocks: int, n: int) -> tuple[int, int]:
    """The window of `n` blocks where the swarm is weakest."""
    n = min(n, num_blocks)
    speeds = block_speeds(records, num_blocks)
    best = min(range(num_blocks - n + 1), key=lambda s: (min(speeds[s : s + n]), sum(speeds[s : s + n]), s))
    return best, best + n


def should_move(records: Sequence[ServerRecord], me: ServerRecord, num_blocks: int, threshold: float) -> tuple[int, int] | None:
    """The span `me` should move to, or None to stay.

    Moving is worth it when the swarm's bottleneck with `me` in the new span exceeds the current one by
    more than `threshold` (relative; a swarm with a gap has bottleneck 0, so filling it always wins).
    """
    others = [r for r in records if r.peer_id != me.peer_id]
    n = me.end - me.start
    start, end = choose_span(others, num_blocks, n)
    if (start, end) == (me.start, me.end):
        return None
    moved = me.model_copy(update={"start": start, "end": end})
    now, then = bottleneck([*others, me], num_blocks), bottleneck([*others, moved], num_blocks)
    return (start, end) if then > now * (1 + threshold) else None
