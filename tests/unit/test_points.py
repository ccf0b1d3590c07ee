"""Work receipts and the ledger: what is believed, what is refused, and the balances that result.

Real RSA identities (no network): receipts are signed and checked exactly as between peers.
"""

from __future__ import annotations

import base64

import pytest

from swarmllm.points import (
    Ledger,
    Receipt,
    ReceiptError,
    RequestedWork,
    ServedWork,
    check,
    countersign,
    issue,
    work_units,
)
from swarmllm.trust.identity import Identity


@pytest.fixture(scope="module")
def peers() -> tuple[Identity, Identity, Identity]:
    return Identity.ephemeral(), Identity.ephemeral(), Identity.ephemeral()


def _receipt(server: Identity, client: Identity, total: int, epoch: int = 100) -> Receipt:
    return countersign(client, issue(server, client.peer_id, total, epoch, now=1000.0), max_total=total)


def test_a_countersigned_receipt_checks_and_survives_the_wire(peers) -> None:
    server, client, _ = peers
    receipt = _receipt(server, client, 42)
    check(receipt)
    again = Receipt.from_bytes(receipt.to_bytes())
    assert again == receipt
    check(again)
    assert again.pair == (server.peer_id, client.peer_id, 100)


def test_the_client_refuses_to_countersign_inflated_misaddressed_or_forged_receipts(peers) -> None:
    server, client, other = peers
    issued = issue(server, client.peer_id, 50, epoch=100)
    with pytest.raises(ReceiptError, match="only 49 were requested"):
        countersign(client, issued, max_total=49)
    with pytest.raises(ReceiptError, match="not for this peer"):
        countersign(other, issued, max_total=50)
    inflated = issued.model_copy(update={"total_work": 5})  # any field changed after signing
    with pytest.raises(ReceiptError, match="server signature"):
        countersign(client, inflated, max_total=50)
    assert countersign(client, issued, max_total=50).countersigned


def test_check_refuses_forgeries(peers) -> None:
    server, client, other = peers
    good = _receipt(server, client, 10)
    with pytest.raises(ReceiptError, match="not countersigned"):
        check(issue(server, client.peer_id, 10, epoch=100))
    # Changing any signed field breaks both signatures.
    for field, value in [
        ("total_work", 11),
        ("epoch", 101),
        ("issued_at", 1001.0),
        ("client", other.peer_id),
    ]:
        with pytest.raises(ReceiptError, match="signature"):
            check(good.model_copy(update={field: value}))
    # A third peer's own valid key does not stand in for the client's: it must hash to the client id.
    forged = issue(server, client.peer_id, 10, epoch=100, now=1000.0)
    stolen = countersign(other, issue(server, other.peer_id, 10, epoch=100, now=1000.0), max_total=10)
    with pytest.raises(ReceiptError, match="client signature"):
        check(forged.model_copy(update={"client_key": stolen.client_key, "client_sig": stolen.client_sig}))
    # The server's signature cannot pose as the client's (different domains), even with the right key.
    swapped = good.model_copy(update={"client_sig": good.server_sig, "client_key": good.server_key})
    with pytest.raises(ReceiptError, match="client signature"):
        check(swapped)
    with pytest.raises(ReceiptError, match="client signature"):
        check(good.model_copy(update={"client_sig": "not base64!"}))


def test_a_peer_cannot_mint_points_by_serving_itself(peers) -> None:
    server, _, _ = peers
    with pytest.raises(ReceiptError, match="itself"):
        issue(server, server.peer_id, 10, epoch=1)
    # Nor by building the receipt by hand: signatures that verify do not make it acceptable.
    fake = Receipt(
        server=server.peer_id,
        client=server.peer_id,
        total_work=10,
        epoch=1,
        issued_at=0.0,
        server_key=base64.b64encode(server.public_der).decode(),
    )
    with pytest.raises(ReceiptError, match="self-signed"):
        check(fake)
    with pytest.raises(ReceiptError, match="self-signed"):
        Ledger().add(fake)


def test_the_ledger_keeps_the_latest_total_per_pair_and_refuses_replays(peers) -> None:
    a, b, c = peers
    ledger = Ledger()
    ledger.add(_receipt(a, b, 10))
    ledger.add(_receipt(a, b, 30))  # cumulative: 30 in all, not 40
    with pytest.raises(ReceiptError, match="replayed"):
        ledger.add(_receipt(a, b, 30))
    with pytest.raises(ReceiptError, match="stale"):
        ledger.add(_receipt(a, b, 10))
    ledger.add(_receipt(a, b, 5, epoch=200))  # a new epoch of the server restarts its totals
    ledger.add(_receipt(b, c, 7))
    assert ledger.balance(a.peer_id) == 35.0
    assert ledger.balance(b.peer_id) == -35.0 + 7
    assert ledger.balance(c.peer_id) == -7.0
    assert ledger.balance("nobody") == 0.0
    assert sum(ledger.balances().values()) == 0, "points move between peers, they are never created"
    assert len(ledger.receipts()) == 3


def test_from_receipts_skips_invalid_ones_in_any_order(peers) -> None:
    a, b, _ = peers
    newest, older = _receipt(a, b, 20), _receipt(a, b, 8)
    forged = newest.model_copy(update={"total_work": 10**9})
    ledger = Ledger.from_receipts([forged, newest, older, newest, issue(a, b.peer_id, 99, epoch=100)])
    assert ledger.balances() == {a.peer_id: 20.0, b.peer_id: -20.0}
    rebuilt = Ledger.from_receipts(ledger.receipts())
    assert rebuilt.balances() == ledger.balances()


def test_served_and_requested_work_agree_and_bound_the_receipts(peers) -> None:
    server, client, _ = peers
    served, requested = ServedWork(epoch=100), RequestedWork()
    for blocks, tokens in [(4, 12), (4, 1), (4, 1)]:
        assert served.add(client.peer_id, work_units(blocks, tokens)) == requested.add(
            server.peer_id, work_units(blocks, tokens)
        )
    assert requested.requested(server.peer_id) == 56
    ledger = Ledger()
    ledger.add(requested.countersign(client, served.receipt(server, client.peer_id)))
    assert ledger.balance(server.peer_id) == 56.0
    # A server that restarts its epoch gets no second count of the same work ...
    assert requested.allowance(server.peer_id, epoch=200) == 0
    with pytest.raises(ReceiptError, match="only 0 were requested"):
        requested.countersign(client, issue(server, client.peer_id, 56, epoch=200))
    # ... only of work requested since.
    requested.add(server.peer_id, 8)
    assert requested.allowance(server.peer_id, epoch=200) == 8
    ledger.add(requested.countersign(client, issue(server, client.peer_id, 8, epoch=200)))
    assert ledger.balance(server.peer_id) == 64.0
    with pytest.raises(ValueError):
        served.add(client.peer_id, -1)
