"""Server lifecycle: load a span, join the DHT, serve RPCs, keep the record fresh, withdraw on shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import torch
from hivemind import DHT

from swarmllm.dht.records import announce, get_servers
from swarmllm.models.source import model_display_name, resolve_model
from swarmllm.models.span import check_span, load_config, load_span
from swarmllm.protocol import ServerRecord, ServerState
from swarmllm.server.block_selection import choose_span
from swarmllm.server.cache import CacheBudget
from swarmllm.server.config import ServerConfig, parse_blocks
from swarmllm.server.handler import Handler

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Server:
    """One server process. `run()` blocks until SIGINT/SIGTERM, then withdraws its record and exits."""

    def __init__(self, config: ServerConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_dir = resolve_model(config.model)
        self.model_name = model_display_name(config.model)
        self.model_config = load_config(self.model_dir)
        num_blocks = self.model_config.num_hidden_layers
        if config.blocks is not None:  # checked before joining the swarm, so a bad span leaves nothing behind
            check_span(*parse_blocks(config.blocks), num_blocks)
        self.dht = DHT(
            initial_peers=config.initial_peers,
            host_maddrs=config.host_maddrs,
            announce_maddrs=config.announce_maddrs or None,
            start=True,
        )
        try:
            if config.blocks is not None:
                self.start, self.end = parse_blocks(config.blocks)
            else:
                records = get_servers(self.dht, self.model_name)
                self.start, self.end = choose_span(records, num_blocks, config.num_blocks)
            logger.info("loading blocks %d:%d of %s (%s)", self.start, self.end, self.model_name, config.dtype)
            self.span = load_span(self.model_dir, self.start, self.end, DTYPES[config.dtype])
        except BaseException:
            self.dht.shutdown()
            raise
        self.budget = CacheBudget(config.max_cache_tokens)
        self.handler = Handler(self.span, self.budget, config.session_timeout, self.record)
        self.peer_id = str(self.dht.peer_id)

    def record(self, state: ServerState = ServerState.ONLINE) -> ServerRecord:
        return ServerRecord(
            peer_id=self.peer_id,
            start=self.start,
            end=self.end,
            dtype=self.config.dtype,
            state=state,
            cache_tokens_left=self.budget.free,
        )

    def run(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self.dht.shutdown()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        p2p = await self.dht.replicate_p2p()
        await self.handler.register(p2p)
        ttl = self.config.announce_ttl
        await loop.run_in_executor(None, announce, self.dht, self.model_name, self.record(), ttl)
        maddrs = " ".join(str(m) for m in self.dht.get_visible_maddrs())
        # One line that launchers and tests wait for; the maddrs let others join through this server too.
        print(f"server ready: {self.model_name} blocks {self.start}:{self.end} peer {self.peer_id} at {maddrs}", flush=True)
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), ttl / 3)
                except TimeoutError:
                    await loop.run_in_executor(None, announce, self.dht, self.model_name, self.record(), ttl)
        finally:
            logger.info("shutting down: withdrawing the record of blocks %d:%d", self.start, self.end)
            await loop.run_in_executor(
                None, announce, self.dht, self.model_name, self.record(ServerState.OFFLINE), ttl
            )
            await p2p.shutdown()
            self.handler.executor.shutdown(wait=False, cancel_futures=True)
