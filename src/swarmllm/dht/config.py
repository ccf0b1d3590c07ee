"""PeerConfig: what every peer of a swarm is told about joining it, written once for servers, clients and
swarm-hub peers (each config extends it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PeerConfig(BaseModel):
    """How a peer joins the swarm (see `dht.node.join_as`). Field descriptions become the CLI help."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    initial_peers: list[str] = Field(default_factory=list, description="multiaddrs of any peers in the swarm")
    swarm_key: str | None = Field(
        default=None, description="key file of a private swarm (made by `swarmllm dht --private`): join it, and talk only to its members"
    )
    identity: str | None = Field(
        default=None, description="identity file (created if missing) that fixes this peer's id and signs its records and receipts (default: a new id per run)"
    )
    host_maddrs: list[str] = Field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"], description="multiaddrs to listen on")
    announce_maddrs: list[str] = Field(default_factory=list, description="public multiaddrs to announce, if not the listen ones")
