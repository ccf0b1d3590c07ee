"""DHT key schema of the adapter hub, and announcing and reading its records.

Schema (see `protocol.AdapterRecord`, `protocol.AdapterProvider`):

- `swarmllm.v1.adapters`: one key for the whole swarm; subkey = adapter name, value = `AdapterRecord`.
  One lookup lists every named adapter.
- `swarmllm.v1.adapter.<sha256>`: one key per content; subkey = peer id of a holder, value =
  `AdapterProvider`. Any peer that holds and serves the content announces itself, BitTorrent style.

Every record expires; whoever announces it refreshes it. Readers skip records that fail validation,
carry another protocol version, or whose subkey does not match their content, like `dht.records` does.
"""

from __future__ import annotations

import logging

from hivemind import DHT
from hivemind.utils import get_dht_time

from swarmllm.protocol import PROTOCOL_VERSION, AdapterProvider, AdapterRecord, PeerIdStr

logger = logging.getLogger(__name__)

ADAPTERS_KEY = f"swarmllm.v{PROTOCOL_VERSION}.adapters"


def provider_key(sha256: str) -> str:
    return f"swarmllm.v{PROTOCOL_VERSION}.adapter.{sha256}"


def announce_name(dht: DHT, record: AdapterRecord, ttl: float) -> bool:
    """Store (or refresh) a name record. Returns whether the DHT accepted it."""
    return bool(dht.store(ADAPTERS_KEY, subkey=record.name, value=record.model_dump(mode="json"),
                          expiration_time=get_dht_time() + ttl))


def announce_provider(dht: DHT, sha256: str, peer_id: str, ttl: float) -> bool:
    """Store (or refresh) that `peer_id` serves `sha256`. Returns whether the DHT accepted it."""
    record = AdapterProvider(peer_id=PeerIdStr(peer_id))
    return bool(dht.store(provider_key(sha256), subkey=peer_id, value=record.model_dump(mode="json"),
                          expiration_time=get_dht_time() + ttl))


def parse_names(raw: dict | None) -> dict[str, AdapterRecord]:
    """Valid name records out of a DHT value (a dict subkey -> ValueWithExpiration), by name."""
    out: dict[str, AdapterRecord] = {}
    if not isinstance(raw, dict):  # a plain value stored under the key by someone else: nothing to read
        return out
    for subkey, item in raw.items():
        try:
            record = AdapterRecord.from_value(item.value)
        except ValueError:  # ValidationError is one
            logger.debug("ignoring an invalid adapter record under %s", subkey)
            continue
        # A record is believed only under its own name, so one entry cannot shadow another name.
        if record.name == subkey and record.version == PROTOCOL_VERSION:
            out[record.name] = record
    return out


def parse_providers(raw: dict | None) -> list[str]:
    """Peer ids of valid provider records out of a DHT value, sorted."""
    out: list[str] = []
    if not isinstance(raw, dict):
        return out
    for subkey, item in raw.items():
        try:
            record = AdapterProvider.from_value(item.value)
        except ValueError:  # ValidationError is one
            continue
        if record.peer_id == subkey and record.version == PROTOCOL_VERSION:
            out.append(record.peer_id)
    return sorted(out)


def get_names(dht: DHT) -> dict[str, AdapterRecord]:
    found = dht.get(ADAPTERS_KEY, latest=True)
    return parse_names(found.value if found is not None else None)


def get_providers(dht: DHT, sha256: str) -> list[str]:
    found = dht.get(provider_key(sha256), latest=True)
    return parse_providers(found.value if found is not None else None)
