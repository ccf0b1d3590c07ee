"""A client's view of one model's servers: a snapshot of the DHT, read without waiting for the DHT.

Routes are planned from code that must not stall: coroutines on the client's shared I/O loop (opening a
checker, a session's extras) reach the server list too, and a DHT read there would hold up every session on
that loop until the DHT answered. So once a first snapshot exists, reading is instant: a snapshot older
than `period` is returned as it is while a background thread reads the DHT again, and the next read sees
the new one. Only the first read, and a caller that asks for the newest (`force`, e.g. while waiting for
missing blocks), wait for the DHT; such a caller must not run on the I/O loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from swarmllm.protocol import ServerRecord

logger = logging.getLogger(__name__)


class SwarmView:
    def __init__(self, fetch: Callable[[], list[ServerRecord]], period: float):
        self._fetch, self.period = fetch, period
        self._records: list[ServerRecord] | None = None
        self._updated = 0.0
        self._lock = threading.Lock()  # guards the snapshot; never held across a DHT read
        self._reading = threading.Lock()  # one DHT read at a time
        self._background: threading.Thread | None = None
        self.reads = 0  # DHT reads so far (tests, monitoring)

    def get(self, force: bool = False) -> list[ServerRecord]:
        with self._lock:
            records, age = self._records, time.monotonic() - self._updated
        if records is None or force:
            return self._read()
        if age > self.period:
            self._read_in_background()
        return list(records)

    def _read(self) -> list[ServerRecord]:
        with self._reading:
            records = self._fetch()
            self.reads += 1
            with self._lock:
                self._records, self._updated = records, time.monotonic()
        return list(records)

    def _read_in_background(self) -> None:
        with self._lock:
            if self._background is not None and self._background.is_alive():
                return
            self._background = threading.Thread(target=self._read_quietly, name="swarmllm-swarm-view", daemon=True)
            self._background.start()

    def _read_quietly(self) -> None:
        try:
            self._read()
        except Exception as e:  # the old snapshot stays; the next read tries again
            logger.warning("could not refresh the swarm's server list: %r", e)

    def wait_idle(self, timeout: float | None = None) -> None:
        """Until a background read in progress has finished (tests)."""
        background = self._background
        if background is not None:
            background.join(timeout)
