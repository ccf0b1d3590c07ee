"""API keys: who may use the HTTP API.

Keys live in a file, never on the command line, where `ps` would show them. Each line is `KEY` or
`NAME KEY`, and `#` starts a comment. The name (by default `key-` and the start of the key's SHA-256)
labels the key's requests and tokens in the API's metrics, so usage can be told apart per team or
application without the key itself ever appearing. The file is read again when it changes, so a key is
added or revoked without a restart. Requests carry `Authorization: Bearer KEY`, which is what OpenAI's
clients send for `api_key=`.

What is guarded: every route that returns data or does work (`/v1/*`, `/api/*`, `/metrics`). The chat
and monitor pages and their static files are not: they hold no data, and they ask for a key when the API
answers 401.
"""

from __future__ import annotations

import hashlib
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
        self._keys: list[tuple[str, bytes]] = []  # (name, key)
        self._reload(first=True)

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key an `Authorization` header value carries, or None if it carries none of them
        (compared in constant time)."""
        self._reload()
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        given = key.strip().encode()
        found = None
        # Compare against every key, without stopping early, so timing says nothing about which matched.
        for name, k in self._keys:
            if hmac.compare_digest(given, k):
                found = name
        return found

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
        self._keys, self._stamp = [(name, k.encode()) for name, k in keys], (st.st_mtime_ns, st.st_size)


def parse_keys(text: str) -> list[tuple[str, str]]:
    """(name, key) pairs from a file's text: `KEY` or `NAME KEY` per line; blank lines and `#` comments
    skipped. Raises on no key, a line of three words or more, or a name given twice."""
    keys: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise ValueError(f"line {number}: expected KEY or NAME KEY (a key cannot contain spaces)")
        key = words[-1]
        name = words[0] if len(words) == 2 else "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
        if name in (n for n, _ in keys):
            raise ValueError(f"line {number}: the name {name} is given twice")
        keys.append((name, key))
    if not keys:
        raise ValueError("the file holds no key")
    return keys


def guarded(path: str) -> bool:
    """Whether a request to `path` needs a key."""
    return path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES)
