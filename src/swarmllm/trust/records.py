"""Every DHT record is signed by the peer that stored it and, in a private swarm, sealed with the swarm key.

hivemind calls this validator when a peer asks us to store a record and when a peer returns one to us, so
an invalid record is dropped on arrival, never stored or believed.

- Signed: the value travels as (public key, signature, value); the signature covers key, subkey, value
  and expiration. A record whose subkey names a peer (`<peer id>` or `<peer id>/<anything>`) must be signed
  by that peer, so nobody announces spans, reports or receipts in another peer's name.
- Sealed (private swarms): the signed envelope is encrypted with the swarm key, bound to key and subkey.
  Records from non-members do not open and are ignored; outsiders cannot read the swarm's records either.
"""

from __future__ import annotations

import logging
import struct

import base58
import msgpack
import multihash
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from swarmllm.trust.identity import Identity, peer_id_of, verify
from swarmllm.trust.swarm_key import SwarmKey

logger = logging.getLogger(__name__)

_MAGIC = b"SL1"


def _framed(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _unframe(data: bytes, n: int) -> list[bytes] | None:
    out, i = [], 0
    for _ in range(n):
        if i + 4 > len(data):
            return None
        (size,) = struct.unpack(">I", data[i : i + 4])
        if i + 4 + size > len(data):
            return None
        out.append(data[i + 4 : i + 4 + size])
        i += 4 + size
    return out if i == len(data) else None


def _signed_bytes(record: DHTRecord, value: bytes) -> bytes:
    return _framed(b"swarmllm dht record", record.key, record.subkey, value, struct.pack(">d", record.expiration_time))


def subkey_owner(subkey: bytes) -> str | None:
    """The peer id a subkey names as its owner, if it has the form `<peer id>[/...]`."""
    try:
        text = msgpack.unpackb(subkey)
    except Exception:
        return None
    if not isinstance(text, str):
        return None
    head = text.split("/", 1)[0]
    try:
        decoded = multihash.decode(base58.b58decode(head))
    except Exception:
        return None
    return head if decoded.name in ("sha2-256", "identity") else None


class SignedRecords(RecordValidatorBase):
    """Signs what this peer stores; accepts only records signed by their owner (and sealed, if private)."""

    def __init__(self, identity: Identity, swarm_key: SwarmKey | None = None):
        self.identity, self.swarm_key = identity, swarm_key

    def sign_value(self, record: DHTRecord) -> bytes:
        envelope = _MAGIC + _framed(self.identity.public_der, self.identity.sign(_signed_bytes(record, record.value)),
                                    record.value)
        if self.swarm_key is not None:
            return self.swarm_key.seal(envelope, _framed(record.key, record.subkey))
        return envelope

    def _open(self, record: DHTRecord) -> tuple[bytes, bytes, bytes] | None:
        data = record.value
        if self.swarm_key is not None:
            data = self.swarm_key.open(data, _framed(record.key, record.subkey))
            if data is None:
                return None
        if not data.startswith(_MAGIC):
            return None
        parts = _unframe(data[len(_MAGIC) :], 3)
        return (parts[0], parts[1], parts[2]) if parts is not None else None

    def validate(self, record: DHTRecord) -> bool:
        opened = self._open(record)
        if opened is None:
            logger.debug("dropping a DHT record that is not sealed with this swarm's key or not signed")
            return False
        public_der, signature, value = opened
        try:
            signer = peer_id_of(public_der)
        except Exception:
            return False
        owner = subkey_owner(record.subkey)
        if owner is not None and owner != signer:
            logger.debug("dropping a DHT record of %s signed by %s", owner[-8:], signer[-8:])
            return False
        return verify(signer, public_der, _signed_bytes(record, value), signature)

    def strip_value(self, record: DHTRecord) -> bytes:
        opened = self._open(record)
        return opened[2] if opened is not None else b""

    @property
    def priority(self) -> int:
        return 10  # outermost: seals what the other validators (none today) produce
