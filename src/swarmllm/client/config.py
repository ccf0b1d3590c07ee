"""ClientConfig: the one source of truth for a client's settings (Python API and CLI alike)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from swarmllm.dht.config import PeerConfig
from swarmllm.models.device import DEVICE_HELP, DTYPE_HELP
from swarmllm.protocol import Compression


class ClientConfig(PeerConfig):
    """Settings of a client. Field descriptions become the CLI help."""

    request_timeout: float = Field(default=60.0, gt=0, description="seconds to wait for one server reply")
    missing_blocks_timeout: float = Field(
        default=30.0, ge=0, description="seconds to wait for servers of missing blocks before failing"
    )
    update_period: float = Field(default=5.0, gt=0, description="seconds between refreshes of the swarm view")
    ban_time: float = Field(default=15.0, ge=0, description="seconds a server that failed a request is avoided")
    max_retries: int = Field(default=3, ge=0, description="attempts of a forward/backward call on other servers after a failure")
    max_failovers: int = Field(
        default=8, ge=0,
        description="failed routes tolerated when opening or repairing a session (it also keeps trying for missing_blocks_timeout)",
    )
    client_mode: bool = Field(
        default=False, description="join the DHT without accepting incoming connections (behind NAT)"
    )
    num_threads: int | None = Field(default=None, ge=1, description="torch threads for the local layers")
    device: str = Field(
        default="auto", description=f"where the client's embeddings, LM head, local blocks and tuning live: {DEVICE_HELP}"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description=f"dtype of the client's own layers and of the hidden states it sends; {DTYPE_HELP}. Servers "
        "of any dtype serve it: they convert hidden states at the boundary",
    )
    push: bool = Field(default=True, description="servers push inference steps straight to the next server of the route")
    push_min_rtt: float = Field(
        default=0.005, ge=0,
        description="push only when the route's servers are at least this far (mean round trip, seconds): on one "
        "host a crossing costs less than the extra message (measured: push 0.95x on loopback)",
    )
    allowed_servers: list[str] | None = Field(default=None, description="if set, use only these servers (peer ids)")
    blocked_servers: list[str] = Field(default_factory=list, description="never use these servers (peer ids)")
    ping_period: float = Field(default=30.0, gt=0, description="seconds between round-trip measurements to each server")
    ping_timeout: float = Field(default=2.0, gt=0, description="a server that does not answer a ping within this counts as this slow")
    block_override: str | None = Field(
        default=None, description="use the published fine-tuned version NAME of the blocks it covers (servers started with --block-override NAME)"
    )
    adapter: str | None = Field(default=None, description="a named LoRA adapter that every server applies (fetched from the swarm or hub)")
    compression: Compression = Field(
        default="none",
        description="encoding of hidden states and gradients sent to and from servers: none (exact), float16 "
        "(half the bytes, relative error 2^-11: greedy output unchanged in our measurements), bfloat16 (half, 2^-8) "
        "or blockwise8 (under 0.3 of the bytes, error up to 1/254 of the largest magnitude in each small block; "
        "greedy output drifts after a few dozen tokens); servers reply in the same mode. See swarmllm.compression",
    )
    local_blocks: int = Field(
        default=0, ge=0,
        description="run the first K blocks on this machine, so no server sees the token embeddings (what this "
        "does and does not protect: docs/privacy.md)",
    )
    local_last_blocks: bool = Field(
        default=False, description="with local_blocks=K, also run the last K blocks here, so no server sees the final hidden states"
    )
    verify: float = Field(
        default=0.0, ge=0, le=1,
        description="run this fraction of inference steps (and every server's first step) on a second server with "
        "the same blocks too, and compare; a third server settles a mismatch and the offender is avoided and "
        "reported (see client/verification.py for what this does and does not catch). Turns push off",
    )
    verify_tolerance: float = Field(
        default=0.01, gt=0, description="largest relative L2 distance between two servers' outputs that counts as agreement"
    )
    trust_reports: int = Field(
        default=1, ge=0,
        description="avoid servers that at least this many distinct peers reported for wrong results, while others "
        "hold their blocks (0: ignore reports)",
    )
    offender_ban_time: float = Field(
        default=3600.0, ge=0, description="seconds a server caught returning wrong results is avoided by this client"
    )
    account: str | None = Field(
        default=None,
        description="identity file of the points account this client spends from and is prioritized by, e.g. the "
        "--identity of your own server (default: the client's own id, a newcomer)",
    )
    settle_period: float = Field(
        default=10.0, gt=0, description="seconds between countersigning the receipts of servers that did work for this client"
    )
    max_chunk_tokens: int = Field(
        default=8192, ge=1, description="forward/backward batches are split into chunks of at most this many tokens"
    )
