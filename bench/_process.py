"""Process setup shared by the benchmarks (run as `python bench/X.py`, so this imports as `_process`)."""

from __future__ import annotations

import os
import signal
import sys


def prepare(gomp_spincount: int = 30000, omp_wait_policy: str = "unset") -> None:
    """Before torch loads: OpenMP waiting for this process and, through os.environ, for the servers it
    starts (LocalSwarm passes the environment on); -1 / "unset" keep libgomp's defaults. Then make SIGTERM
    (e.g. from `timeout`) exit through `finally`, so swarms and network namespaces are cleaned up instead
    of orphaned."""
    if gomp_spincount >= 0:
        os.environ["GOMP_SPINCOUNT"] = str(gomp_spincount)
    if omp_wait_policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = omp_wait_policy
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
