"""The settings of the subcommands that have no component config of their own (`dht`, `status`, `points`,
`local`, `generate`, `chat`): every flag comes from a field here, with its default and help written once."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class DhtConfig(_Config):
    host_maddrs: list[str] = Field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"], description="multiaddrs to listen on")
    announce_maddrs: list[str] = Field(default_factory=list, description="public multiaddrs to announce")
    private: bool = Field(False, description="start a private swarm: create its key file (--swarm-key, default "
                                             "./swarm.key) unless it exists")
    swarm_key: str | None = Field(None, description="key file of the private swarm to bootstrap")
    identity: str | None = Field(None, description="identity file (created if missing) that fixes this peer's id")


class _SwarmReader(_Config):
    initial_peers: list[str] = Field(min_length=1, description="multiaddrs of any peers in the swarm")
    swarm_key: str | None = Field(None, description="key file of a private swarm")


class StatusConfig(_SwarmReader):
    model: list[str] = Field(default_factory=list, description="models to show even if no server announces them now")
    json_output: bool = Field(False, alias="json", description="print the snapshot as JSON (the monitor's /api/swarm format)")


class PointsConfig(_SwarmReader):
    json_output: bool = Field(False, alias="json", description="print JSON instead of a table")


class LocalConfig(_Config):
    model: str = Field("smollm2", description="model to serve")
    servers: int = Field(3, ge=1, description="number of servers, splitting the blocks evenly")
    threads: int | None = Field(None, ge=1, description="torch threads per process (default: the cores)")
    prompt: str = Field("What is a swarm of computers good for? Answer in two sentences.",
                        description="the chat prompt answered once the swarm is up")
    max_new_tokens: int = Field(64, ge=1, description="tokens to generate for the prompt")
    port: int = Field(8000, ge=0, le=65535, description="port of the API and web UI on 127.0.0.1")
    once: bool = Field(False, description="stop after answering the prompt instead of serving the web UI")


class GenerateConfig(_Config):
    prompt: str = Field(description="the prompt text")
    max_new_tokens: int = Field(128, ge=1, description="tokens to generate")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")


class ChatConfig(_Config):
    max_new_tokens: int = Field(128, ge=1, description="tokens to generate per answer")
    max_length: int = Field(2048, ge=1, description="tokens the chat session may hold")
