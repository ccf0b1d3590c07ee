"""Secret files (swarm key, identity, API keys) should be readable by their owner only.

We warn rather than refuse: container platforms often mount secrets group-readable (Kubernetes' default
mode is 0644), and a swarm that will not start is worse than a logged warning the operator can act on.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

logger = logging.getLogger(__name__)


def warn_if_exposed(path: str | Path, what: str) -> bool:
    """Log a warning when users other than the owner may read or write `path`; returns whether they may
    (False if it cannot be read)."""
    try:
        mode = stat.S_IMODE(Path(path).stat().st_mode)
    except OSError:
        return False
    if not mode & (stat.S_IRWXG | stat.S_IRWXO):
        return False
    logger.warning("%s %s is readable by other users (mode %o): chmod 600 it", what, path, mode)
    return True
