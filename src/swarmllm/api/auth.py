"""API keys: who may use the HTTP API.

Keys live in a file (one per line, `#` comments), never on the command line, where `ps` would show them.
The file is read again when it changes, so a key is added or revoked without a restart. Requests carry
`Authorization: Bearer KEY`, which is what OpenAI's clients send for `api_key=`.

What is guarded: every route that returns data or does work (`/v1/*`, `/api/*`, `/metrics`). The chat
and monitor pages and their static files are not: they hold no data, and they ask for a key when the API
answers 401.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from swarmllm.trust.secret_file import warn_if_exposed

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/", "/monitor")
OPEN_PREFIXES = ("/static/",)


class ApiKeys:
    """The keys in `path`, reloaded when the file's modification time or size changes.

    A file that becomes unreadable or empty keeps the last good keys (logged): a half-written file during
    an edit must not lock every user out, nor let everyone in."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._keys: list[bytes] = []
        self._reload(first=True)

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header value carries one of the keys (compared in constant time)."""
        self._reload()
        if not authorization:
            return False
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        given = key.strip().encode()
        # Compare against every key, without stopping early, so timing says nothing about which matched.
        return sum(hmac.compare_digest(given, k) for k in self._keys) > 0

    def _reload(self, first: bool = False) -> None:
        try:
            st = self.path.stat()
            if (st.st_mtime_ns, st.st_size) == self._stamp:
                return
            keys = parse_keys(self.path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            if first:
                raise ValueError(f"cannot use the API keys file {self.path}: {e}") from None
            logger.warning("API keys file %s unusable (%s); keeping the %d keys loaded before", self.path, e,
                           len(self._keys))
            return
        warn_if_exposed(self.path, "the API keys file")
        if not first:
            logger.info("API keys reloaded from %s: %d keys", self.path, len(keys))
        self._keys, self._stamp = [k.encode() for k in keys], (st.st_mtime_ns, st.st_size)


def parse_keys(text: str) -> list[str]:
    """Keys from a file's text: one per line; blank lines and `#` comments skipped. Raises on none, or on a
    key with spaces (it could never be sent as one bearer token)."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if any(c.isspace() for c in line):
            raise ValueError(f"line {number}: a key cannot contain spaces")
        keys.append(line)
    if not keys:
        raise ValueError("the file holds no key")
    return keys


def guarded(path: str) -> bool:
    """Whether a request to `path` needs a key."""
    return path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES)
