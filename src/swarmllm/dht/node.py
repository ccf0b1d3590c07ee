"""Joining the swarm's DHT as one identity, with signed (and, in a private swarm, sealed) records.

Every process of swarmllm (bootstrap peer, server, client, adapter tools) joins through `join`, so they
all sign what they store and drop what they cannot validate (see `swarmllm.trust.records`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hivemind import DHT

from swarmllm.dht.config import PeerConfig
from swarmllm.trust.identity import Identity
from swarmllm.trust.membership import Membership
from swarmllm.trust.records import SignedRecords
from swarmllm.trust.swarm_key import SwarmKey


@dataclass
class SwarmPeer:
    """A running DHT node plus who it is (identity) and which swarm it belongs to (membership)."""

    dht: DHT
    identity: Identity
    membership: Membership

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


def join(
    initial_peers: list[str] | None = None, *, identity: str | None = None, swarm_key: str | None = None,
    host_maddrs: list[str] | None = None, announce_maddrs: list[str] | None = None, client_mode: bool = False,
) -> SwarmPeer:
    """Start a DHT node. `identity`: an identity file to use (created if missing; default: a fresh one for
    this process). `swarm_key`: the key file of a private swarm (default: the public swarm)."""
    key = SwarmKey.load(swarm_key) if swarm_key else None
    ident = Identity.load_or_create(Path(identity)) if identity else Identity.ephemeral()
    dht = DHT(
        initial_peers=initial_peers or [],
        host_maddrs=host_maddrs or ["/ip4/0.0.0.0/tcp/0"],
        announce_maddrs=announce_maddrs or None,
        client_mode=client_mode,
        identity_path=str(ident.path),
        # A peer restarting with its identity must not wait for a check that the id is free.
        check_if_identity_free=False,
        record_validators=[SignedRecords(ident, key)],
        start=True,
    )
    if str(dht.peer_id) != ident.peer_id:  # the daemon must run as the identity we sign with
        dht.shutdown()
        raise RuntimeError(f"the DHT runs as {dht.peer_id}, not as the identity {ident.peer_id}")
    return SwarmPeer(dht, ident, Membership(key, ident.peer_id))


def join_as(config: PeerConfig, client_mode: bool = False) -> SwarmPeer:
    """Join the swarm as `config` says (a server's, client's or swarm-hub peer's config: each extends it)."""
    return join(config.initial_peers, identity=config.identity, swarm_key=config.swarm_key,
                host_maddrs=config.host_maddrs, announce_maddrs=config.announce_maddrs, client_mode=client_mode)
