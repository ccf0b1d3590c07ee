"""A content-addressed local store of adapters, plus a small index of names.

Layout under `root` (default `<cache>/adapters`, where `<cache>` is `$SWARMLLM_CACHE` or
`~/.cache/swarmllm`)::

    <sha256>/        the unpacked adapter folder whose packed bytes hash to <sha256>
    names.json       {"name": "<sha256>", ...}

Guarantee: a folder `<sha256>/` exists only once its content has been verified against that hash, and it
appears whole or not at all: entries are written under a hidden temporary name and renamed into place,
so a failed or concurrent fetch never leaves a partial or corrupted entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from swarmllm.adapters.package import (
    AdapterNotFoundError,
    AdapterTooLargeError,
    AdapterVerificationError,
    adapter_kind,
    pack,
    unpack,
)
from swarmllm.models.source import default_cache_dir

logger = logging.getLogger(__name__)

__all__ = ["AdapterStore"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


class AdapterStore:
    """Adapters on local disk, named by the sha256 of their packed bytes (see `adapters.package`)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir() / "adapters"

    def add(self, folder: str | os.PathLike[str], name: str | None = None) -> str:
        """Copy an adapter folder into the store (a no-op if its content is already there); return its sha256."""
        adapter_kind(folder)  # refuse a non-adapter before packing it
        data = pack(folder)
        sha = hashlib.sha256(data).hexdigest()
        self.add_packed(data, sha, max_bytes=len(data), name=name)
        return sha

    def add_packed(self, data: bytes, expected_sha: str, max_bytes: int, name: str | None = None) -> Path:
        """Verify packed bytes (size, then hash, then that they unpack to an adapter) and store them.

        Raises AdapterTooLargeError or AdapterVerificationError before anything is written, and AdapterError
        if the bytes do not unpack to an adapter; in every failure the store is left as it was.
        """
        if len(data) > max_bytes:
            raise AdapterTooLargeError(f"adapter is {len(data)} bytes, more than the limit of {max_bytes} bytes")
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha:
            raise AdapterVerificationError(f"adapter bytes hash to {actual}, not to the expected {expected_sha}")
        target = self.root / expected_sha
        if not target.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{expected_sha}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
            try:
                unpack(data, tmp)
                adapter_kind(tmp)
                try:
                    os.replace(tmp, target)
                except OSError:
                    if not target.is_dir():
                        raise
                    # Another process stored the same content first; its copy is just as good.
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if name is not None:
            self.set_name(name, expected_sha)
        return target

    def path(self, sha: str) -> Path | None:
        """The folder of `sha`, or None if it is not stored (also for anything that is not a sha256 hex)."""
        # Checked because `sha` may come from the network: it must never name anything but an entry.
        if not _SHA256.fullmatch(sha):
            return None
        target = self.root / sha
        return target if target.is_dir() else None

    def packed(self, sha: str) -> bytes:
        """The packed bytes of a stored adapter, read from disk now (AdapterNotFoundError if not stored)."""
        folder = self.path(sha)
        if folder is None:
            raise AdapterNotFoundError(f"no adapter with sha256 {sha} in the local store")
        return pack(folder)

    def shas(self) -> list[str]:
        """Every content hash the store holds."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _SHA256.fullmatch(p.name) and p.is_dir())

    def names(self) -> dict[str, str]:
        """The name index, name -> sha256, without names whose content is no longer stored."""
        return {name: sha for name, sha in self._read_index().items() if self.path(sha) is not None}

    def sha_of(self, name: str) -> str | None:
        """The sha256 stored under `name`, or None."""
        return self.names().get(name)

    def set_name(self, name: str, sha: str) -> None:
        """Point `name` at stored content (replacing what it named before)."""
        if self.path(sha) is None:
            raise AdapterNotFoundError(f"no adapter with sha256 {sha} in the local store")
        with self._locked():
            index = self._read_index()
            if index.get(name) != sha:
                index[name] = sha
                self._write_index(index)

    def _read_index(self) -> dict[str, str]:
        try:
            raw = json.loads((self.root / "names.json").read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            logger.warning("ignoring a corrupt adapter name index at %s", self.root / "names.json")
            return {}
        return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def _write_index(self, index: dict[str, str]) -> None:
        tmp = self.root / f".names.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        os.replace(tmp, self.root / "names.json")  # readers never see a half-written index

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize read-modify-write of the index between processes sharing the cache."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

