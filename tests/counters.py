"""Counters that tests read instead of clocks."""

from __future__ import annotations


class CountForwards:
    """Counts a model's forward calls (each is one step of its cache). `handle.remove()` stops counting."""

    def __init__(self, model) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1
