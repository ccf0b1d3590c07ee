"""DHT key schema, and announcing and reading server records.

Schema: one key per model, `swarmllm.v1.<model>.servers`; each server stores its `ServerRecord` under its
own peer id as subkey, with an expiration. One DHT lookup therefore returns the whole swarm for a model.
Beside it, `swarmllm.v1.models` indexes which model each server serves (`ModelEntry`, same subkey), so a
monitor can find every model in the swarm with one lookup.
Records that fail validation (unknown versions, garbage) are skipped, never trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from hivemind import DHT
from hivemind.utils import get_dht_time

from swarmllm.protocol import PROTOCOL_VERSION, ModelEntry, PeerIdStr, Record, ServerRecord, ServerState

R = TypeVar("R", bound=Record)

logger = logging.getLogger(__name__)


MODELS_KEY = f"swarmllm.v{PROTOCOL_VERSION}.models"


def servers_key(model: str) -> str:
    return f"swarmllm.v{PROTOCOL_VERSION}.{model}.servers"


def announce(dht: DHT, model: str, record: ServerRecord, ttl: float) -> bool:
    """Store (or refresh) this server's record, and its line in the model index. Returns whether the DHT
    accepted the record."""
    expiration = get_dht_time() + ttl
    entry = ModelEntry(peer_id=PeerIdStr(record.peer_id), model=model, num_blocks=record.num_blocks)
    dht.store(MODELS_KEY, subkey=record.peer_id, value=entry.model_dump(mode="json"), expiration_time=expiration)
    return bool(dht.store(servers_key(model), subkey=record.peer_id, value=record.model_dump(mode="json"),
                          expiration_time=expiration))


def get_models(dht: DHT) -> dict[str, int]:
    """Every model some live server announced, with its number of blocks (0 if no server said)."""
    found = dht.get(MODELS_KEY, latest=True)
    models: dict[str, int] = {}
    for entry in parse_subkeyed(found.value if found is not None else None, ModelEntry, lambda e: e.peer_id):
        models[entry.model] = max(models.get(entry.model, 0), entry.num_blocks)
    return models


def parse_subkeyed(raw: dict | None, cls: type[R], subkey_of: Callable[[R], str]) -> list[R]:
    """The records of type `cls` out of a DHT value (a dict subkey -> ValueWithExpiration) that validate and
    sit under the subkey they name (`subkey_of`): the DHT checked that subkey's owner signed them."""
    out = []
    for subkey, item in (raw or {}).items():
        try:
            record = cls.from_value(item.value)
        except ValueError:  # ValidationError is one
            logger.debug("ignoring an invalid %s under %s", cls.__name__, subkey)
            continue
        if subkey == subkey_of(record) and record.version == PROTOCOL_VERSION:
            out.append(record)
    return out


def parse_servers(raw: dict | None) -> list[ServerRecord]:
    """Valid, online records out of a DHT value (so never an empty block range); a record is only believed
    for the peer that stored it under its own id."""
    return [r for r in parse_subkeyed(raw, ServerRecord, lambda r: r.peer_id)
            if r.state == ServerState.ONLINE]  # (Record refuses empty ranges)


def get_servers(dht: DHT, model: str, latest: bool = True) -> list[ServerRecord]:
    found = dht.get(servers_key(model), latest=latest)
    return parse_servers(found.value if found is not None else None)


def get_all_servers(dht: DHT, model: str) -> list[ServerRecord]:
    """Every valid record of the model, whatever its state (joining, draining, offline): for monitors."""
    found = dht.get(servers_key(model), latest=True)
    return parse_subkeyed(found.value if found is not None else None, ServerRecord, lambda r: r.peer_id)
