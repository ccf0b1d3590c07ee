"""Forward passes kept with their autograd graphs until the matching backward arrives.

A training step runs forward then backward over the same servers a moment later. Keeping the forward's
graph saves the backward a full recomputation of the span (a third of the step's compute). It costs
activation memory, so the store is bounded: at most `max_graphs` graphs, each for at most `ttl` seconds;
the oldest go first. A backward whose graph is gone (evicted, expired, or sent to another server after a
failure) simply recomputes, so eviction changes speed, never results.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from swarmllm.server.compute import Graph


class KeptGraphs:
    def __init__(self, max_graphs: int, ttl: float):
        self.max_graphs, self.ttl = max_graphs, ttl
        self._graphs: OrderedDict[tuple[str, str], tuple[float, Graph]] = OrderedDict()

    def put(self, peer: str, key: str, graph: Graph) -> None:
        self._expire()
        if self.max_graphs == 0:
            return
        self._graphs[(peer, key)] = (time.monotonic() + self.ttl, graph)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)

    def pop(self, peer: str, key: str) -> Graph | None:
        """The graph kept under (peer, key), removed from the store; None if there is none."""
        self._expire()
        item = self._graphs.pop((peer, key), None)
        return item[1] if item is not None else None

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph (a server moving to other blocks: they hold the old span's activations)."""
        self._graphs.clear()

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, (deadline, _) in self._graphs.items() if deadline < now]:
            del self._graphs[k]
