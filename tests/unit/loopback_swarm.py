"""A swarm in this process: real server handlers over spans of a tiny random Llama (or of a saved model, loaded
from disk as a server loads it), and real clients, joined by `swarmllm.loopback` (no processes, no p2p
daemon). A session step takes milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from swarmllm.client import loop
from swarmllm.client.config import ClientConfig
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.client.transport import Directory
from swarmllm.loopback import LoopbackNetwork
from swarmllm.models.span import Span, load_config, load_span, span_from_model, text_config
from swarmllm.protocol import ServerRecord
from swarmllm.server.cache import CacheMemory
from swarmllm.server.config import default
from swarmllm.server.context import ServingContext, SpanSlot
from swarmllm.server.handler import Handler
from swarmllm.trust.identity import Identity

MODEL = "tiny-loopback"
BLOCKS = 4
HIDDEN = 32
CACHE_BYTES = 2**22  # per server: room for many sessions of the tiny model


class LoopbackSwarm:
    """Servers of blocks of one seeded model; `client()` makes sequence managers over the same network.
    `local_steps(...)` is the reference: the same blocks run in this process with a plain transformers cache.

    `model_dir`: serve that saved model instead, its spans loaded from disk in float32 as `Server` loads them
    (`load_span`), under the name `name` (a client's `model_display_name` of the folder)."""

    def __init__(self, spans: list[tuple[int, int]], session_timeout: float = 30.0, *, model_dir: Path | None = None,
                 name: str = MODEL):
        self.model_dir, self.name = model_dir, name
        if model_dir is None:
            torch.manual_seed(0)
            config = LlamaConfig(num_hidden_layers=BLOCKS, vocab_size=50, hidden_size=HIDDEN, intermediate_size=64,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)
            config._attn_implementation = "sdpa"
            self.model = AutoModelForCausalLM.from_config(config).eval()
            self.num_blocks = BLOCKS
        else:
            self.num_blocks = text_config(load_config(model_dir)).num_hidden_layers
        self.network = LoopbackNetwork()
        self.session_timeout = session_timeout
        self.handlers: dict[str, Handler] = {}
        # Forward throughput each server announces (stateless calls go to holders in proportion to it).
        self.speeds: dict[str, float] = {}
        self.managers: list[SequenceManager] = []
        self.peers = [self.add_server(start, end) for start, end in spans]

    def add_server(self, start: int, end: int, cache_bytes: int = CACHE_BYTES, queue_timeout: float = 5.0,
                   page_tokens: int = default("cache_page_tokens"), **context_options) -> str:
        """A server of blocks [start, end) with a cache budget of `cache_bytes` in pages of `page_tokens` (a
        session waits up to `queue_timeout` for pages); `context_options` are ServingContext fields (limits, ...)."""
        host = self.network.host()
        peer = str(host.peer_id)
        memory = CacheMemory(cache_bytes, queue_timeout)

        def record() -> ServerRecord:
            return ServerRecord(peer_id=peer, start=start, end=end, dtype="float32", num_blocks=self.num_blocks,
                                cache_tokens_left=memory.budget - memory.used, forward_tps=self.speeds.get(peer, 1.0))

        context = ServingContext(SpanSlot(self._span(start, end), memory, page_tokens), memory, self.session_timeout, **context_options)
        handler = Handler(context, record)
        loop.run(handler.register(host))
        self.network.announce(self.name, peer, record)
        self.handlers[peer] = handler
        return peer

    def _span(self, start: int, end: int) -> Span:
        if self.model_dir is None:
            return span_from_model(self.model, start, end)
        return load_span(self.model_dir, start, end, torch.float32)

    def client(self, directory: Directory | None = None, **options) -> SequenceManager:
        """A client of the swarm; `options` are ClientConfig fields (missing blocks fail at once by default).
        `directory`: instead of the network's own (e.g. one that records who reads it)."""
        return self.join(ClientConfig(**{"missing_blocks_timeout": 0.0, "update_period": 1e-3, **options}), directory)

    def join(self, config: ClientConfig, directory: Directory | None = None) -> SequenceManager:
        """A client with this config: what `SequenceManager.join` makes on hivemind, made on this network."""
        identity = Identity.ephemeral()
        manager = SequenceManager(config, self.name, self.num_blocks, self.network.transport(identity),
                                  directory or self.network, identity)
        self.managers.append(manager)
        return manager

    def local_steps(self, steps: list[torch.Tensor], start: int = 0, end: int = BLOCKS) -> list[torch.Tensor]:
        """What blocks [start, end) give for these consecutive steps with a cache, in this process."""
        span, cache, position, outs = span_from_model(self.model, start, end), DynamicCache(), 0, []
        with torch.no_grad():
            for hidden in steps:  # (batch, seq, hidden)
                positions = torch.arange(position, position + hidden.shape[1])[None].expand(hidden.shape[0], -1)
                outs.append(span(hidden, positions, None, cache))
                position += hidden.shape[1]
        return outs

    def close(self) -> None:
        for manager in self.managers:
            manager.shutdown()
        for handler in self.handlers.values():
            handler.context.scheduler.shutdown()


def steps(*lengths: int, batch: int = 1, seed: int = 1) -> list[torch.Tensor]:
    """Random hidden states for consecutive steps of these many tokens."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, HIDDEN, generator=generator) for n in lengths]
