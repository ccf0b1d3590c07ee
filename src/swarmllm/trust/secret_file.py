"""Secret files (swarm key, identity, API keys) should be readable by their owner only.

We warn rather than refuse: container platforms often mount secrets group-readable (Kubernetes' default
mode is 0644), and a swarm that will not start is worse than a logged warning the operator can act on.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

logger = logging.getLogger(__name__)


def exposed(path: Path) -> bool:
    """Whether users other than the owner may read or write `path` (False if it cannot be read)."""
    try:
        return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def warn_if_exposed(path: str | Path, what: str) -> bool:
    """Log a warning when `path` is open to other users; returns whether it is."""
    path = Path(path)
    if not exposed(path):
        return False
    mode = stat.S_IMODE(path.stat().st_mode)
    logger.warning("%s %s is readable by other users (mode %o): chmod 600 it", what, path, mode)
    return True
