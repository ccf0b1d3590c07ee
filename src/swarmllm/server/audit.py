"""The server's audit log: which peer used which blocks when, and how it ended. Never payloads.

One JSON object per line, appended and flushed per entry, so an operator can `tail -f` it or load it into
anything that reads JSON lines. A forward or backward call is one entry; an inference session is one
entry when it ends (its steps and tokens summed), so a long chat does not write a line per token.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditEntry:
    time: float  # unix seconds when the call or session ended
    peer: str  # the requester's peer id
    rpc: str  # forward, backward or inference
    start: int
    end: int
    tokens: int  # batch x sequence positions computed (summed over a session's steps)
    steps: int  # 1 for forward/backward; a session's step count
    outcome: str  # "ok" or the error code the caller got
    seconds: float  # duration of the call or session


class AuditLog:
    """Appends `AuditEntry` lines to `path`; with no path it records nothing."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, peer: str, rpc: str, start: int, end: int, tokens: int, outcome: str, began: float,
               steps: int = 1) -> None:
        if self.path is None:
            return
        entry = AuditEntry(time.time(), peer, rpc, start, end, tokens, steps, outcome, round(time.monotonic() - began, 4))
        line = json.dumps(asdict(entry)) + "\n"
        try:
            with self._lock, self.path.open("a") as f:
                f.write(line)
        except OSError as e:  # a full disk must not stop the server from serving
            logger.warning("audit log %s: %r", self.path, e)
