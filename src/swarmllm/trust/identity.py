"""A peer's identity: the RSA key its libp2p peer id is derived from, used to sign what it publishes.

Using the libp2p identity itself (not a second key) binds every signature to a peer id that the transport
already authenticates: a signed record or receipt names a peer id, carries the signer's public key, and a
verifier checks both the signature and that the key hashes to that peer id. Nobody can sign for a peer
whose identity file they do not hold.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2

from swarmllm.trust.secret_file import warn_if_exposed

_PADDING = padding.PKCS1v15()  # deterministic; what libp2p itself uses for RSA keys


class Identity:
    """A private key in libp2p's file format (the file `--identity` names) and the peer id it gives."""

    def __init__(self, path: Path):
        self.path = Path(path)
        data = self.path.read_bytes()
        key = serialization.load_der_private_key(crypto_pb2.PrivateKey.FromString(data).data, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path}: only RSA identities are supported")
        self._key = key
        self.public_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.peer_id = peer_id_of(self.public_der)

    @classmethod
    def load_or_create(cls, path: str | Path) -> Identity:
        """Load an identity file, creating it (mode 0400) if it does not exist, so a peer keeps its id."""
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            P2P.generate_identity(str(path))
        else:
            warn_if_exposed(path, "the identity")  # whoever reads it can act as this peer, and spend its points
        return cls(path)

    @classmethod
    def ephemeral(cls) -> Identity:
        """A fresh identity for this process only (its file is removed at exit)."""
        folder = tempfile.mkdtemp(prefix="swarmllm-id-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return cls.load_or_create(os.path.join(folder, "identity.key"))

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, _PADDING, hashes.SHA256())

    def __getstate__(self) -> dict:  # the DHT's validator travels to the DHT process by pickle
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        Identity.__init__(self, Path(state["path"]))


def peer_id_of(public_der: bytes) -> str:
    """The base58 peer id that libp2p derives from an RSA public key (DER, SubjectPublicKeyInfo)."""
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    # RSA public keys are longer than 42 bytes, so libp2p names them by their sha2-256 multihash.
    return PeerID(multihash.encode(hashlib.sha256(proto).digest(), multihash.coerce_code("sha2-256"))).to_base58()


def verify(peer_id: str, public_der: bytes, data: bytes, signature: bytes) -> bool:
    """Whether `signature` over `data` was made by the identity of `peer_id` (whose key is `public_der`)."""
    try:
        if peer_id_of(public_der) != peer_id:
            return False
        key = serialization.load_der_public_key(public_der)
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        key.verify(signature, data, _PADDING, hashes.SHA256())
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False
