"""ServerConfig: the one source of truth for a server's settings; `swarmllm serve --help` is built from it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from swarmllm.dht.config import PeerConfig
from swarmllm.models.device import DEVICE_HELP, DTYPE_HELP


class ServerConfig(PeerConfig):
    """Settings of one server process. Field descriptions become the CLI help."""

    model: str = Field(description="model: a local folder, a .gguf file, a hub repo id, or a shortcut (smollm2)")
    blocks: str | None = Field(default=None, description="span to serve, START:END (end exclusive)")
    num_blocks: int | Literal["auto"] | None = Field(
        default=None, description="serve this many blocks, chosen where the swarm is weakest; auto: as many as fit in the "
        "device's free memory after the attention cache (--max-cache-bytes) and a safety margin (see server/sizing.py)",
    )
    device: str = Field(default="auto", description=f"where the blocks live and compute: {DEVICE_HELP}")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description=f"dtype of the blocks' weights and compute; {DTYPE_HELP}"
    )
    quant: Literal["none", "int8", "int4", "nf4"] = Field(
        default="none",
        description="store the blocks' linear weights quantized: int8 (per channel), int4 (4-bit, groups of 32 with "
        "scale and zero point) or nf4 (4-bit NormalFloat, blockwise); see docs/quantization.md",
    )
    max_cache_bytes: int | Literal["auto"] = Field(
        default=2 * 2**30,
        description="server-wide attention-cache memory, in bytes; sessions take it page by page as they grow; auto: "
        "what the device has free once the blocks are loaded, less a safety margin",
    )
    remeasure: bool = Field(
        default=False,
        description="measure this server's speed even if a measurement for the same model, blocks, device, dtype, "
        "quant, threads and torch is cached on disk (by default a restart reuses it and announces at once)",
    )
    step_time: float | None = Field(
        default=None, gt=0,
        description="announce this speed instead of measuring it: seconds per block for one inference step (with "
        "--forward-tps; for operators who know their hardware, and for tests that need fixed speeds)",
    )
    forward_tps: float | None = Field(
        default=None, gt=0, description="with --step-time: tokens per second per block for a forward pass",
    )
    cache_page_tokens: int = Field(default=64, ge=1, description="tokens per cache page: the unit a session's cache grows by")
    cache_queue_timeout: float = Field(
        default=10.0, ge=0, description="seconds a new session or a growing one may wait in the queue for cache memory"
    )
    audit_log: str | None = Field(
        default=None, description="append one JSON line per call or session to this file: which peer used which blocks when (no payloads)"
    )
    max_batch_rows: int = Field(
        default=64, ge=1, description="most sequences (summed over sessions) in one batched inference pass"
    )
    batch_wait: float = Field(
        default=0.005, ge=0, description="seconds a pass may wait for steps of other recently active sessions on the same blocks (0: never)"
    )
    prefill_chunk: int = Field(
        default=256, ge=1, description="longer prompts run in chunks of this many tokens, so others' decode steps run between"
    )
    session_timeout: float = Field(default=300.0, gt=0, description="seconds a session may stay idle before its cache is freed")
    announce_ttl: float = Field(default=30.0, gt=1, description="seconds a DHT record lives; it is refreshed every third of that")
    num_threads: int | None = Field(default=None, ge=1, description="torch compute threads (default: all cores)")
    rebalance_period: float = Field(
        default=60.0, ge=0, description="with --num-blocks: seconds between checks whether moving would speed up the swarm (0: never)"
    )
    balance_threshold: float = Field(
        default=0.15, ge=0, description="move only if the swarm's bottleneck throughput rises by more than this fraction"
    )
    adapters: list[str] = Field(
        default_factory=list, description="named LoRA adapters to load at start (others are fetched when first asked for)"
    )
    block_override: str | None = Field(
        default=None, description="serve the published fine-tuned version NAME of its blocks instead of the base weights"
    )
    hub_dir: str | None = Field(
        default=None, description="a local folder laid out like a hub (DIR/<repo id>/...) to fetch adapters from"
    )
    max_adapter_bytes: int = Field(default=256 * 2**20, ge=1, description="largest adapter this server will fetch, in bytes")
    max_kept_graphs: int = Field(
        default=8, ge=0, description="forward passes kept with their activations until their backward (0: always recompute)"
    )
    kept_graph_ttl: float = Field(default=60.0, gt=0, description="seconds a kept forward pass waits for its backward")
    lora_cache_bytes: int = Field(
        default=256 * 2**20, ge=1, description="memory for clients' LoRA weights cached between requests, in bytes"
    )
    # Per-peer limits (see server/limits.py): a peer over one gets `rate_limited` and others are still served.
    max_sessions_per_peer: int = Field(default=16, ge=1, description="inference sessions one peer may have open here at once")
    max_tokens_in_flight_per_peer: int = Field(
        default=65536, ge=1, description="tokens (batch x new tokens) one peer may have queued or computing here at once"
    )
    max_request_bytes_per_peer: int = Field(
        default=256 * 2**20, ge=1, description="bytes of requests one peer may have in transit or computing here at once (so also the largest request)"
    )
    requests_per_second_per_peer: float = Field(
        default=200.0, gt=0, description="requests (calls, session opens, LoRA uploads, pushes) per second one peer may make, on average"
    )
    request_burst_per_peer: int = Field(default=400, ge=1, description="requests one peer may make at once after a quiet period")
    max_attention_per_request: int = Field(
        default=2**28, ge=1, description="largest batch x query tokens x key tokens of one request: attention memory grows so"
    )

    metrics_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="serve Prometheus metrics at http://HOST:PORT/metrics on this port (0: any free port, printed at start; default: off)",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="address the metrics endpoint listens on (0.0.0.0: every interface)"
    )

    receipt_ttl: float = Field(
        default=7 * 24 * 3600.0, gt=1, description="seconds the work receipts this server publishes stay in the DHT (republished while it runs)"
    )
    newcomer_share: float = Field(
        default=0.2, gt=0, le=1,
        description="under contention, work runs by the requester's points balance, but at least this share of "
        "passes goes to peers without points, so nobody starves",
    )
    test_corrupt_outputs: float = Field(
        default=0.0, ge=0,
        description="TEST ONLY, never in production: add noise of this size (relative to their spread) to every output "
        "and announce itself as the fastest server, as a malicious server would (to test verification)",
    )

    @model_validator(mode="after")
    def _one_span_choice(self) -> ServerConfig:
        if (self.blocks is None) == (self.num_blocks is None):
            raise ValueError("give exactly one of --blocks START:END or --num-blocks N")
        if isinstance(self.num_blocks, int) and self.num_blocks < 1:
            raise ValueError(f"--num-blocks must be at least 1 or auto, got {self.num_blocks}")
        if isinstance(self.max_cache_bytes, int) and self.max_cache_bytes < 1:
            raise ValueError(f"--max-cache-bytes must be at least 1 or auto, got {self.max_cache_bytes}")
        if self.blocks is not None:
            parse_blocks(self.blocks)
        if (self.step_time is None) != (self.forward_tps is None):
            raise ValueError("give both --step-time and --forward-tps to announce a speed without measuring, or neither")
        if self.quant != "none" and self.block_override is not None:
            raise ValueError("--quant and --block-override cannot be combined yet: an override replaces float weights")
        return self


def parse_blocks(text: str) -> tuple[int, int]:
    """'3:10' -> (3, 10). Range checks against the model happen once the model is known."""
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--blocks must look like START:END, got {text!r}") from None
    if start < 0 or end <= start:
        raise ValueError(f"invalid span {text}: need 0 <= START < END")
    return start, end


def default(field: str) -> Any:
    """A server setting's default, for the parts that take it as a parameter (`Limits`, `Scheduler`,
    `ServingContext`): the default is written once, in ServerConfig."""
    return ServerConfig.model_fields[field].get_default(call_default_factory=True)
