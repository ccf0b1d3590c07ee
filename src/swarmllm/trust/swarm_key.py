"""The secret of a private swarm: proof of membership on every RPC, and sealed DHT records.

`swarmllm dht --private` writes it to a key file; every member starts with `--swarm-key FILE`. Two keys
are derived from it, one per use, so a leak of one use's output says nothing about the other:

- membership proof: HMAC(secret, peer id). A request carries the proof of *its sender's* peer id, which
  libp2p authenticates, so a proof seen on the wire is useless to anyone else.
- record sealing: AES-GCM over each DHT value, bound to its key and subkey. Outsiders can neither read the
  swarm's records nor store one that members accept.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from swarmllm.trust.secret_file import warn_if_exposed

_HEADER = "swarmllm-swarm-key-v1"
_NONCE = 12


class SwarmKeyError(ValueError):
    """A key file that is missing, malformed or readable by others."""


class SwarmKey:
    """A private swarm's shared secret (32 random bytes)."""

    def __init__(self, secret: bytes):
        if len(secret) != 32:
            raise SwarmKeyError("a swarm secret is 32 bytes")
        self._secret = secret
        self._member = hashlib.sha256(b"swarmllm member proof\0" + secret).digest()
        self._aead = AESGCM(hashlib.sha256(b"swarmllm dht seal\0" + secret).digest())
        # Peers of one swarm agree on this without revealing the secret (shown by `status`, used in logs).
        self.fingerprint = hashlib.sha256(b"swarmllm fingerprint\0" + secret).hexdigest()[:16]

    @classmethod
    def create(cls, path: str | Path) -> SwarmKey:
        """Write a new secret to `path` (readable by its owner only). Refuses to overwrite a key file."""
        path = Path(path)
        secret = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{_HEADER}\n{secret.hex()}\n")
        return cls(secret)

    @classmethod
    def load(cls, path: str | Path) -> SwarmKey:
        path = Path(path)
        try:
            lines = path.read_text().split()
        except OSError as e:
            raise SwarmKeyError(f"cannot read the swarm key {path}: {e.strerror}") from None
        if len(lines) != 2 or lines[0] != _HEADER:
            raise SwarmKeyError(f"{path} is not a swarm key file (expected a '{_HEADER}' header and a hex secret)")
        try:
            key = cls(bytes.fromhex(lines[1]))
        except ValueError:
            raise SwarmKeyError(f"{path}: the secret is not 64 hex digits") from None
        warn_if_exposed(path, "the swarm key")  # whoever reads it can join the swarm
        return key

    def __getstate__(self) -> dict:  # the DHT's validator travels to the DHT process by pickle
        return {"secret": self._secret}

    def __setstate__(self, state: dict) -> None:
        SwarmKey.__init__(self, state["secret"])

    def proof(self, peer_id: str) -> str:
        """What `peer_id` attaches to its requests to show it is a member."""
        return hmac.new(self._member, peer_id.encode(), hashlib.sha256).hexdigest()

    def is_member(self, peer_id: str, proof: str) -> bool:
        return hmac.compare_digest(self.proof(peer_id), proof or "")

    def seal(self, data: bytes, context: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + self._aead.encrypt(nonce, data, context)

    def open(self, sealed: bytes, context: bytes) -> bytes | None:
        """The plaintext, or None if `sealed` was not made with this key for this `context`."""
        if len(sealed) < _NONCE + 16:
            return None
        try:
            return self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], context)
        except InvalidTag:
            return None
