"""ApiConfig: the settings of `swarmllm api`; its CLI options are built from it. The client settings
(initial peers, swarm key, verification...) are the ClientConfig's, beside it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ApiConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="model: a local folder, a .gguf file, a hub repo id, or a shortcut (smollm2)")
    host: str = Field(default="127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on (0: any free port)")
    max_concurrent_requests: int = Field(
        default=8, ge=1, description="completions decoded at once, each in its own server-side session"
    )
    batch_heads: bool = Field(
        default=True, description="compute the LM head once for the decode steps of all completions in progress "
        "(one matmul per step instead of one per request; rows may differ by float rounding from a lone request's)",
    )
    prompt_lookup: int = Field(
        default=0, ge=0, le=64, description="draft tokens per step by prompt lookup, for greedy requests without a "
        "response_format: one round trip checks them all, same tokens as plain decoding (0: off)",
    )
    max_queued_requests: int = Field(
        default=32, ge=0, description="completions that may wait for a free slot; beyond that requests get 429"
    )
    max_context: int | None = Field(
        default=None, ge=1, description="most tokens of prompt plus completion (default: the model's context length)"
    )
    default_max_tokens: int = Field(
        default=512, ge=1, description="tokens to generate when a request gives no max_tokens (less if the context ends first)"
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="file of API keys, one per line (# comments); then every route but the web pages needs "
        "'Authorization: Bearer KEY' (401 otherwise). Reread when it changes. Default: no keys (bind to localhost)",
    )
    max_body_bytes: int = Field(default=2**20, ge=1024, description="largest request body, in bytes (413 beyond)")
    monitor_refresh: float = Field(
        default=2.0, ge=0, description="seconds a swarm snapshot is reused for /api/swarm, so many open monitors cost one DHT read"
    )
