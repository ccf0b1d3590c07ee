"""Server lifecycle: load a span, join the DHT, serve RPCs, keep the record fresh, withdraw on shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from pathlib import Path

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from swarmllm.adapters import blocks as block_ckpt
from swarmllm.adapters import lora
from swarmllm.adapters.package import AdapterError
from swarmllm.adapters.resolve import resolve_adapter
from swarmllm.adapters.store import AdapterStore
from swarmllm.adapters.swarm_hub import SwarmHub
from swarmllm.dht.node import join_as
from swarmllm.dht.points import get_receipts, publish_receipts
from swarmllm.dht.records import announce, get_servers
from swarmllm.models.device import dtype_name, free_memory, resolve_device, resolve_dtype, trim_heap
from swarmllm.models.quant import check_supported as check_quant
from swarmllm.models.shards import block_key_filter, no_tensors
from swarmllm.models.source import default_cache_dir, model_display_name, resolve_model
from swarmllm.models.span import Span, check_span, load_config, load_span
from swarmllm.protocol import (
    RPC_INFO,
    RPC_POINTS_BIND,
    RPC_RECEIPT,
    RPC_SETTLE,
    PeerIdStr,
    ServerRecord,
    ServerState,
)
from swarmllm.server import sizing
from swarmllm.server.audit import AuditLog
from swarmllm.server.block_selection import choose_span, should_move
from swarmllm.server.cache import CacheMemory, bytes_per_token
from swarmllm.server.config import ServerConfig, parse_blocks
from swarmllm.server.context import Faults, NamedAdapter, Override, ServingContext, SpanSlot, TuningResolver
from swarmllm.server.handler import Handler
from swarmllm.server.kept_graphs import KeptGraphs
from swarmllm.server.limits import Limits, PeerLimits
from swarmllm.server.lora_cache import LoraCache
from swarmllm.server.metrics import ServerMetrics
from swarmllm.server.points import ServerPoints
from swarmllm.server.scheduler import Scheduler
from swarmllm.server.throughput import Throughput, ThroughputCache, cached_measure, measurement_key

logger = logging.getLogger(__name__)


def _release_memory(device: torch.device) -> None:
    """Return freed memory to the device (CUDA's caching allocator) or the OS (glibc's heap)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        trim_heap()


class Server:
    """One server process. `run()` blocks until SIGINT/SIGTERM, then withdraws its record and exits."""

    def __init__(self, config: ServerConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        # Devices and dtypes first: a machine without the device asked for fails before anything loads.
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        check_quant(config.quant, self.device)
        # Metadata first (for a hub repo id: config, tokenizer, index); the span's shards once it is chosen.
        self.model_dir = resolve_model(config.model, tensors=no_tensors)
        self.model_name = model_display_name(config.model)
        self.model_config = load_config(self.model_dir)
        num_blocks = self.model_config.num_hidden_layers
        self.block_bytes = sizing.largest_block_bytes(self.model_config, self.dtype, config.quant)
        span_size = self._span_size(num_blocks)
        self.peer = join_as(config)
        self.dht = self.peer.dht
        try:
            if config.blocks is not None:
                self.start, self.end = parse_blocks(config.blocks)
            else:
                records = get_servers(self.dht, self.model_name)
                self.start, self.end = choose_span(records, num_blocks, span_size)
            logger.info("loading blocks %d:%d of %s (%s on %s, quant %s)", self.start, self.end, self.model_name,
                        dtype_name(self.dtype), self.device, config.quant)
            span = self._load(self.start, self.end)
            cache_bytes = config.max_cache_bytes
            if cache_bytes == "auto":
                cache_bytes = sizing.auto_cache_bytes(free_memory(self.device))
                logger.info("attention cache: %.2f GiB (--max-cache-bytes auto)", cache_bytes / 2**30)
        except BaseException:
            self.dht.shutdown()
            raise
        self.next_rtts: dict[str, float] = {}
        self.started_at = time.time()
        self.state = ServerState.ONLINE
        self.memory = CacheMemory(cache_bytes, config.cache_queue_timeout)
        self.hub = SwarmHub(self.dht, AdapterStore(), max_bytes=config.max_adapter_bytes, membership=self.peer.membership)
        self.adapters: dict[str, NamedAdapter] = {}
        self.points = ServerPoints(self.peer.identity)
        self._adapter_locks: dict[str, asyncio.Lock] = {}
        self.metrics = ServerMetrics()  # counts from the start; served over HTTP only with --metrics-port
        self.context = ServingContext(
            SpanSlot(span, self.memory, config.cache_page_tokens), self.memory, config.session_timeout,
            scheduler=Scheduler(config.max_batch_rows, config.prefill_chunk, config.batch_wait,
                                balance=self.points.priority, newcomer_share=config.newcomer_share),
            tuning=TuningResolver(LoraCache(config.lora_cache_bytes), self.adapter),
            kept=KeptGraphs(config.max_kept_graphs, config.kept_graph_ttl),
            audit=AuditLog(config.audit_log), membership=self.peer.membership,
            limits=PeerLimits(Limits.from_config(config)), points=self.points, metrics=self.metrics,
            faults=Faults(config.test_corrupt_outputs),
        )
        pool = self.context.spans.pool
        assert pool is not None  # built with the span
        logger.info("attention cache: %d pages of %d tokens (%.2f GiB), allocated", pool.pages, pool.page_tokens,
                    pool.capacity / 2**30)
        if pool.pages == 0:
            logger.warning("--max-cache-bytes %d is less than one page (%d bytes): every session will be refused",
                           cache_bytes, pool.page_bytes)
        self.handler = Handler(self.context, self.record)
        if config.test_corrupt_outputs:
            logger.warning("TEST ONLY: this server corrupts its outputs (--test-corrupt-outputs %g)", config.test_corrupt_outputs)
        self.peer_id = self.peer.peer_id
        self._label_metrics()
        self.speed_cache = ThroughputCache(default_cache_dir() / "throughput.json")
        # On the compute thread, like all torch work: OpenMP keeps one thread team per calling thread, and a
        # second team (on the main thread) measurably slows every later step on a small machine.
        self.throughput = self._measure(span, lambda fn, span: self.context.scheduler.call(fn, span).result())
        logger.info("speed: %.2f ms per block per inference step, %.0f tokens/s per block forward",
                    self.throughput.step_time * 1e3, self.throughput.forward_tps)

    def _span_size(self, num_blocks: int) -> int:
        """Blocks to serve, checked against the device's free memory before anything is loaded."""
        config = self.config
        free = free_memory(self.device)
        cache = 0 if config.max_cache_bytes == "auto" else config.max_cache_bytes
        budget = sizing.Budget(free=free, cache=cache, margin=sizing.margin_bytes(free))
        if config.num_blocks == "auto":
            n = sizing.fit_blocks(budget, self.block_bytes, num_blocks)
            logger.info("--num-blocks auto: %d blocks of %.2f GiB fit in %.2f GiB free on %s", n,
                        self.block_bytes / 2**30, free / 2**30, self.device)
            return n
        if config.blocks is not None:
            start, end = parse_blocks(config.blocks)
            check_span(start, end, num_blocks)  # before joining the swarm, so a bad span leaves nothing behind
            n = end - start
        else:
            assert isinstance(config.num_blocks, int)  # the config requires --blocks or --num-blocks
            n = min(config.num_blocks, num_blocks)
        if self.device.type != "meta":
            sizing.check_span_fits(budget, self.block_bytes, n, str(self.device))
        return n

    def _measure(self, span: Span, run) -> Throughput:
        if self.config.step_time is not None:  # the operator's figures, for every span this server holds
            assert self.config.forward_tps is not None  # the config takes both or neither
            return Throughput(step_time=self.config.step_time, forward_tps=self.config.forward_tps)
        key = measurement_key(self.model_name, span, self.config.quant)
        return cached_measure(span, key, self.speed_cache, self.config.remeasure, run)

    def _exchange_points(self) -> None:
        """Publish the receipts our clients countersigned; read everyone's to rank queued work by balance."""
        publish_receipts(self.dht, self.points.settled.receipts(), self.config.receipt_ttl)
        self.points.refresh(get_receipts(self.dht))

    def _load(self, start: int, end: int) -> Span:
        # From a hub repo id, only the shards holding these blocks (a folder of links to them, see source.py).
        self.model_dir = resolve_model(self.config.model, tensors=block_key_filter(start, end))
        span = load_span(self.model_dir, start, end, self.dtype, quant=self.config.quant, device=self.device)
        logger.info("blocks %d:%d hold %.1f MiB of weights (%s on %s, quant %s; %.1f MiB expected)", start, end,
                    span.weight_bytes() / 2**20, dtype_name(self.dtype), self.device, self.config.quant,
                    self.block_bytes * (end - start) / 2**20)
        return span

    def record(self, state: ServerState | None = None) -> ServerRecord:
        span, override = self.context.spans.span, self.context.tuning.override
        return ServerRecord(
            peer_id=PeerIdStr(self.peer_id),
            start=self.start,
            end=self.end,
            dtype=dtype_name(self.dtype),
            quant=self.config.quant,
            device=self.device.type,
            state=state or self.state,
            cache_tokens_left=self.memory.free // bytes_per_token(span) if span is not None else 0,
            # A corrupting test server lies about its speed too, to attract traffic as an attacker would.
            step_time=self.throughput.step_time if not self.config.test_corrupt_outputs else 1e-6,
            forward_tps=self.throughput.forward_tps if not self.config.test_corrupt_outputs else 1e9,
            next_rtts=dict(self.next_rtts),
            adapters=tuple(sorted(self.adapters)),
            override=override.name if override else None,
            override_blocks=tuple(sorted(override.blocks)) if override else (),
            num_blocks=self.model_config.num_hidden_layers,
            active_sessions=self.handler.active_sessions,
            tokens_served=self.metrics.tokens_served,
            started_at=self.started_at,
        )

    def _label_metrics(self) -> None:
        self.metrics.set_info(self.model_name, self.start, self.end, self.peer_id, dtype_name(self.dtype), self.config.quant)

    async def _announce(self) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, announce, self.dht, self.model_name, self.record(), self.config.announce_ttl
        )

    async def _rebalance_loop(self, stop: asyncio.Event) -> None:
        """Every `rebalance_period`, move if that raises the swarm's bottleneck by over `balance_threshold`."""
        loop = asyncio.get_running_loop()
        num_blocks = self.model_config.num_hidden_layers
        while True:
            try:
                await asyncio.wait_for(stop.wait(), self.config.rebalance_period)
                return
            except TimeoutError:
                pass
            records = await loop.run_in_executor(None, get_servers, self.dht, self.model_name)
            target = should_move(records, self.record(), num_blocks, self.config.balance_threshold)
            if target is not None:
                await self._move(target, stop)

    async def _move(self, target: tuple[int, int], stop: asyncio.Event) -> None:
        """Drain, then serve `target` instead: sessions in progress finish here first (a rebalance never
        drops one), and no new ones are routed here meanwhile (the record says DRAINING)."""
        logger.info("moving from blocks %d:%d to %d:%d once %d session(s) finish", self.start, self.end, *target,
                    self.handler.active_sessions)
        self.state = ServerState.DRAINING
        await self._announce()
        while self.handler.active_sessions > 0:
            if stop.is_set():
                return
            await asyncio.sleep(0.5)
        loop = asyncio.get_running_loop()
        # Free the old blocks before loading the new ones, so that a move never needs memory for two spans.
        # Meanwhile requests get `not_serving` (no session is open: they drained above, and the record says
        # DRAINING), and if loading fails the server stops rather than serve a span it does not hold.
        self.context.spans.set_span(None)
        self.context.kept.clear()
        self.adapters.clear()  # named adapters are reloaded for the new blocks on first use
        await self.context.scheduler.run(_release_memory, self.device)
        try:
            span = await loop.run_in_executor(None, self._load, *target)
            self.throughput = await self.context.scheduler.run(self._measure, span, None)
        except Exception:
            logger.exception("could not load blocks %d:%d; shutting down (the old span is already freed)", *target)
            stop.set()
            return
        self.context.spans.set_span(span)
        self.start, self.end = target
        self._label_metrics()
        self.state = ServerState.ONLINE
        await self._announce()
        print(f"server moved: blocks {self.start}:{self.end}", flush=True)

    async def _measure_next_rtts(self, p2p, limit: int = 8, timeout: float = 2.0) -> None:
        """Round trips to servers holding the block right after this span: what a push to them would cost."""
        if self.end >= self.model_config.num_hidden_layers:
            return
        records = await asyncio.get_running_loop().run_in_executor(None, get_servers, self.dht, self.model_name)
        nxt = [r.peer_id for r in records if r.start <= self.end < r.end and r.peer_id != self.peer_id][:limit]

        async def ping(peer: str) -> tuple[str, float]:
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(p2p.call_protobuf_handler(
                    PeerID.from_base58(peer), RPC_INFO, self.peer.membership.stamp(runtime_pb2.ExpertRequest()),
                    runtime_pb2.ExpertResponse
                ), timeout)
                return peer, time.perf_counter() - t0
            except Exception:
                return peer, timeout

        self.next_rtts = dict(await asyncio.gather(*(ping(p) for p in nxt)))

    async def _folder(self, name: str) -> Path:
        hub_dir = Path(self.config.hub_dir) if self.config.hub_dir else None
        return await resolve_adapter(name, swarm_hub=self.hub, hub_dir=hub_dir)

    async def adapter(self, name: str) -> NamedAdapter:
        """A named LoRA adapter's weights for this span, fetched (swarm first, then the hub) on first use."""
        if name in self.adapters:
            return self.adapters[name]
        async with self._adapter_locks.setdefault(name, asyncio.Lock()):
            if name not in self.adapters:
                folder = await self._folder(name)
                try:
                    spec, weights = lora.load_peft(folder)
                    weights = {b: {path: (la.to(self.device), lb.to(self.device)) for path, (la, lb) in w.items()}
                               for b, w in weights.items() if self.start <= b < self.end}
                    for b, w in weights.items():
                        lora.check_fits(self._serving().layers[b - self.start], b, w)
                except (lora.LoraShapeError, ValueError) as e:
                    raise AdapterError(f"adapter {name!r} cannot be served by blocks {self.start}:{self.end}: {e}") from None
                self.adapters[name] = (spec, weights)
                logger.info("adapter %s loaded (%d of its blocks are here)", name, len(weights))
        return self.adapters[name]

    def _serving(self) -> Span:
        """The span served now; a request for it during a move is refused as `not_serving`."""
        return self.context.spans.sub_span(self.start, self.end)

    async def _load_override(self, name: str) -> Override:
        """Replace this span's weights by the fine-tuned blocks published as `name`, after verifying them."""
        folder = await self._folder(name)
        meta, tensors = block_ckpt.load_blocks(folder, set(range(self.start, self.end)))
        expected = block_ckpt.base_hashes(self.model_dir, list(tensors))
        span = self._serving()
        layers = {b: span.layers[b - self.start] for b in tensors}
        block_ckpt.apply_blocks(layers, tensors, expected, meta)
        logger.info("serving override %s for blocks %s", name, sorted(tensors))
        return Override(name, frozenset(meta.blocks))

    def run(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self.metrics.stop()
            self.dht.shutdown()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        p2p = await self.dht.replicate_p2p()
        await self.hub.register(p2p)
        if self.config.block_override:
            self.context.tuning.override = await self._load_override(self.config.block_override)
        for name in self.config.adapters:
            await self.adapter(name)
        await self.handler.register(p2p)
        for name, fn in ((RPC_POINTS_BIND, self.points.rpc_bind), (RPC_RECEIPT, self.points.rpc_receipt),
                         (RPC_SETTLE, self.points.rpc_settle)):
            await p2p.add_protobuf_handler(name, self.handler.gate(fn), runtime_pb2.ExpertRequest)
        ttl = self.config.announce_ttl
        await loop.run_in_executor(None, announce, self.dht, self.model_name, self.record(), ttl)
        maddrs = " ".join(str(m) for m in self.dht.get_visible_maddrs())
        if self.config.metrics_port is not None:
            port = self.metrics.start_http(self.config.metrics_host, self.config.metrics_port)
            host = self.config.metrics_host
            # Printed before the ready line, so that a launcher waiting for that has the bound port too.
            print(f"metrics: http://{f'[{host}]' if ':' in host else host}:{port}/metrics", flush=True)
        # One line that launchers and tests wait for; the maddrs let others join through this server too.
        print(f"server ready: {self.model_name} blocks {self.start}:{self.end} peer {self.peer_id} at {maddrs}", flush=True)
        rebalance = None
        if self.config.num_blocks is not None and self.config.rebalance_period > 0 and not self.config.block_override:
            rebalance = asyncio.create_task(self._rebalance_loop(stop))
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), ttl / 3)
                except TimeoutError:
                    await self._measure_next_rtts(p2p)
                    await loop.run_in_executor(None, announce, self.dht, self.model_name, self.record(), ttl)
                    await self.hub.refresh(ttl)
                    await loop.run_in_executor(None, self._exchange_points)
        finally:
            if rebalance is not None:
                rebalance.cancel()
            logger.info("shutting down: withdrawing the record of blocks %d:%d", self.start, self.end)
            await loop.run_in_executor(
                None, announce, self.dht, self.model_name, self.record(ServerState.OFFLINE), ttl
            )
            await p2p.shutdown()
            self.context.scheduler.shutdown()
