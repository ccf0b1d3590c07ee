"""Work receipts: a server's signed statement of how much work it did for a client, countersigned by the client.

A receipt is cumulative: `total_work` is everything the server has served that client since the server's
ledger `epoch` began, so the pair (server, client, epoch) has one latest receipt and every older one is
superseded. Replaying a receipt therefore cannot count the same work twice, and a lost receipt costs nothing
(the next one covers it).

Both signatures cover the same canonical bytes of every field except the signatures, each under its own
domain string, so one party's signature can never stand in for the other's. Work is counted in block-tokens
(see `swarmllm.points.work.work_units`).
"""

from __future__ import annotations

import base64
import binascii
import struct
import time

from swarmllm.protocol import PeerIdStr, Receipt
from swarmllm.trust.identity import Identity, verify

_SERVER_DOMAIN = b"swarmllm receipt v1 server"
_CLIENT_DOMAIN = b"swarmllm receipt v1 client"


class ReceiptError(ValueError):
    """A receipt that must not be believed (forged, self-signed, inflated, stale or replayed)."""


def issue(
    server_identity: Identity, client_peer_id: str, total_work: int, epoch: int, now: float | None = None
) -> Receipt:
    """A receipt signed by `server_identity` for `client_peer_id`; the client countersigns it next."""
    if client_peer_id == server_identity.peer_id:
        raise ReceiptError("a peer cannot issue a receipt to itself")
    receipt = Receipt(
        server=PeerIdStr(server_identity.peer_id),
        client=PeerIdStr(client_peer_id),
        total_work=total_work,
        epoch=epoch,
        issued_at=time.time() if now is None else now,
        server_key=_b64(server_identity.public_der),
    )
    signature = server_identity.sign(_signed_bytes(_SERVER_DOMAIN, receipt))
    return receipt.model_copy(update={"server_sig": _b64(signature)})


def countersign(client_identity: Identity, receipt: Receipt, max_total: int) -> Receipt:
    """The client's countersignature, given only if the receipt is addressed to this client, truly signed by
    its server, and claims no more than `max_total`: the work this client knows it requested from that
    server (in that epoch). This is what stops a server from inflating its points."""
    if receipt.client != client_identity.peer_id:
        raise ReceiptError(
            f"the receipt is for {receipt.client}, not for this peer ({client_identity.peer_id})"
        )
    _check_server(receipt)
    if receipt.total_work > max_total:
        raise ReceiptError(
            f"{receipt.server} claims {receipt.total_work} work units, but only {max_total} were requested"
        )
    signature = client_identity.sign(_signed_bytes(_CLIENT_DOMAIN, receipt))
    return receipt.model_copy(
        update={"client_key": _b64(client_identity.public_der), "client_sig": _b64(signature)}
    )


def check(receipt: Receipt) -> None:
    """Raise `ReceiptError` unless both signatures verify and each key hashes to the peer id it signs for.
    A receipt between a peer and itself is refused: nobody mints points by serving themselves."""
    _check_server(receipt)
    if not receipt.countersigned:
        raise ReceiptError("the receipt is not countersigned by its client")
    if not _verifies(receipt.client, receipt.client_key, _CLIENT_DOMAIN, receipt, receipt.client_sig):
        raise ReceiptError(f"the client signature of {receipt.client} does not verify")


def _check_server(receipt: Receipt) -> None:
    if receipt.server == receipt.client:
        raise ReceiptError(f"a self-signed receipt ({receipt.server} served itself)")
    if not _verifies(receipt.server, receipt.server_key, _SERVER_DOMAIN, receipt, receipt.server_sig):
        raise ReceiptError(f"the server signature of {receipt.server} does not verify")


def _verifies(peer_id: str, key: str, domain: bytes, receipt: Receipt, signature: str) -> bool:
    try:
        key_der, sig = base64.b64decode(key, validate=True), base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    # `verify` also checks that the key hashes to `peer_id`: a valid signature by some other key is worthless.
    return bool(sig) and verify(peer_id, key_der, _signed_bytes(domain, receipt), sig)


def _signed_bytes(domain: bytes, r: Receipt) -> bytes:
    """Canonical bytes of every field but the signatures (and the client key, unknown when the server
    signs; the client's signature binds it anyway, since the key must hash to `client`)."""
    parts = (
        domain,
        str(r.version).encode(),
        r.server.encode(),
        r.client.encode(),
        str(r.total_work).encode(),
        str(r.epoch).encode(),
        struct.pack(">d", r.issued_at),
        r.server_key.encode(),
    )
    # Length-prefixed, so no two different field values can produce the same bytes.
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
