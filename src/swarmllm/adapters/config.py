"""SwarmHubConfig: the one source of truth for a swarm-hub peer's settings; `swarmllm adapters --help`
is built from it."""

from __future__ import annotations

from pydantic import Field

from swarmllm.dht.config import PeerConfig

DEFAULT_MAX_BYTES = 256 * 2**20
"""Largest adapter (packed bytes) a peer fetches unless told otherwise: a rank-64 LoRA of a 7B model on
every projection is about 160 MiB in float32, and anything much bigger is more likely a mistake."""


class SwarmHubConfig(PeerConfig):
    """Settings of a peer that publishes, lists or fetches adapters in the swarm."""

    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0, description="largest adapter to fetch, in bytes")
    announce_ttl: float = Field(
        default=120.0, gt=1, description="seconds an adapter record lives in the DHT; it is refreshed every third of that"
    )
    request_timeout: float = Field(default=30.0, gt=0, description="seconds to wait for a provider's next chunk")
