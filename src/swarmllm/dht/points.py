"""Work receipts in the DHT: each server publishes the receipts its clients countersigned; anyone reads all.

Schema: `swarmllm.v1.points`, subkey `<server>/<client>/<epoch>`, value a `Receipt`. The subkey names the
server, so only the server can store it (trust.records); the receipt's own two signatures are checked again
by whoever reads it (points.Ledger), so a forged receipt is worthless under any subkey.
"""

from __future__ import annotations

from hivemind import DHT
from hivemind.utils import get_dht_time

from swarmllm.dht.records import parse_subkeyed
from swarmllm.protocol import PROTOCOL_VERSION, Receipt

POINTS_KEY = f"swarmllm.v{PROTOCOL_VERSION}.points"


def publish_receipts(dht: DHT, receipts: list[Receipt], ttl: float) -> None:
    """Store each receipt under its own subkey (blocking; the server calls it from its refresh loop)."""
    for r in receipts:
        dht.store(POINTS_KEY, subkey=f"{r.server}/{r.client}/{r.epoch}", value=r.model_dump(mode="json"),
                  expiration_time=get_dht_time() + ttl)


def get_receipts(dht: DHT) -> list[Receipt]:
    found = dht.get(POINTS_KEY, latest=True)
    return parse_subkeyed(found.value if found is not None else None, Receipt, lambda r: f"{r.server}/{r.client}/{r.epoch}")
