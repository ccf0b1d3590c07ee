"""The swarm itself as an adapter hub, for swarms without internet access: BitTorrent style.

A publisher stores an adapter, announces its name (`AdapterRecord`) and itself as a provider of the
content. A fetcher reads the name record, downloads the packed bytes from any provider over the
`adapter_get` stream, checks them against the announced sha256, stores them and becomes a provider too,
so popular adapters spread and outlive their publisher. See `adapters.records` for the DHT schema.

Names are not owned: the latest publish of a name wins, and a peer that finds its name taken over by
other content stops re-announcing it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from hivemind import DHT
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2
from pydantic import TypeAdapter, ValidationError

from swarmllm import wire
from swarmllm.adapters import records
from swarmllm.adapters.config import DEFAULT_MAX_BYTES, SwarmHubConfig
from swarmllm.adapters.package import (
    AdapterError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    AdapterUnavailableError,
    AdapterVerificationError,
    adapter_kind,
    pack,
)
from swarmllm.adapters.store import AdapterStore
from swarmllm.client import loop as io_loop
from swarmllm.dht.node import join_as
from swarmllm.protocol import (
    RPC_ADAPTER_GET,
    AdapterChunk,
    AdapterGet,
    AdapterName,
    AdapterRecord,
    ErrorCode,
    PeerIdStr,
)
from swarmllm.trust.membership import PUBLIC, Membership, gate_stream

logger = logging.getLogger(__name__)

__all__ = ["CHUNK_BYTES", "SwarmHub", "SyncSwarmHub", "check_name"]

# hivemind caps one message at 2 MiB; half of that leaves ample room for the record and framing.
CHUNK_BYTES = 1 << 20
_NAME = TypeAdapter(AdapterName)


def check_name(name: str) -> None:
    """AdapterError unless `name` is a valid adapter name (see `protocol.AdapterName`)."""
    try:
        _NAME.validate_python(name)
    except ValidationError:
        raise AdapterError(
            f"invalid adapter name {name!r}: up to 128 letters, digits and . - / +, starting with a letter or digit"
        ) from None


class _BadProvider(Exception):
    """A provider sent bytes that contradict what was announced (wrong hash, too many, malformed)."""


class SwarmHub:
    """Publishes, finds and fetches adapters peer to peer, and serves the ones its store holds.

    Guarantees: `fetch` returns a folder only after its packed bytes matched the announced sha256; it
    never downloads more than `max_bytes` (the announced size is checked before anything is requested, and
    the bytes again as they arrive); a failed fetch leaves nothing in the store. All coroutines must run on
    the event loop that `register` ran on, since the P2P streams are bound to it.
    """

    def __init__(self, dht: DHT, store: AdapterStore, max_bytes: int = DEFAULT_MAX_BYTES, *,
                 ttl: float = 120.0, request_timeout: float = 30.0, membership: Membership = PUBLIC):
        self.dht, self.store, self.max_bytes, self.membership = dht, store, max_bytes, membership
        self.ttl, self.request_timeout = ttl, request_timeout
        self.peer_id = str(dht.peer_id)
        self._p2p: P2P | None = None
        self._own_p2p = False
        self._serving = False
        # Name records this peer keeps alive: the ones it published and the ones it fetched.
        self._kept: dict[str, AdapterRecord] = {}

    # --- serving ---

    async def register(self, p2p: P2P | None = None) -> None:
        """Serve `adapter_get` for everything in the store, on `p2p` (else on a P2P of our own)."""
        if p2p is None:
            p2p, self._own_p2p = await self.dht.replicate_p2p(), True
        await p2p.add_protobuf_handler(
            RPC_ADAPTER_GET, gate_stream(self.membership, self.rpc_get, stream_input=False), runtime_pb2.ExpertRequest,
            stream_output=True
        )
        self._p2p, self._serving = p2p, True

    async def rpc_get(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Stream the packed bytes of the requested sha256 from `offset`, in chunks of CHUNK_BYTES."""
        try:
            meta, _ = wire.parse(request, AdapterGet)
        except wire.ProtocolError as e:
            yield wire.error_response(ErrorCode.BAD_REQUEST, str(e))
            return
        try:
            # Read from disk per request, never from memory: what is served is what the store holds now.
            data = await asyncio.to_thread(self.store.packed, meta.sha256)
        except AdapterNotFoundError:
            yield wire.error_response(ErrorCode.ADAPTER, f"this peer does not hold adapter {meta.sha256}")
            return
        if meta.offset >= len(data):
            yield wire.error_response(ErrorCode.BAD_REQUEST, f"offset {meta.offset} is past {len(data)} bytes")
            return
        logger.info("serving adapter %s (%d bytes) to %s", meta.sha256[:12], len(data), str(context.remote_id)[-8:])
        for offset in range(meta.offset, len(data), CHUNK_BYTES):
            chunk = torch.frombuffer(bytearray(data[offset : offset + CHUNK_BYTES]), dtype=torch.uint8)
            yield wire.response(AdapterChunk(sha256=meta.sha256, offset=offset, total=len(data)), chunk)

    # --- publishing and reading the swarm ---

    async def publish(self, folder: str | Path, name: str, model: str) -> AdapterRecord:
        """Store the adapter in `folder`, announce it under `name` for `model`, and provide it.

        `register` must have run: a peer announces only what it serves.
        """
        if not self._serving:
            raise AdapterError("call register() before publish(): a publisher must serve what it announces")
        check_name(name)
        kind = adapter_kind(folder)
        data = await asyncio.to_thread(pack, folder)
        sha = hashlib.sha256(data).hexdigest()
        await asyncio.to_thread(self.store.add_packed, data, sha, len(data), name)
        record = AdapterRecord(name=name, sha256=sha, size=len(data), kind=kind, model=model,
                               publisher=PeerIdStr(self.peer_id))
        previous = await self.lookup(name)
        if previous is not None and previous.sha256 != sha:
            logger.warning("replacing adapter %s (was %s from %s)", name, previous.sha256[:12], previous.publisher[-8:])
        self._kept[name] = record
        await asyncio.to_thread(records.announce_name, self.dht, record, self.ttl)
        await asyncio.to_thread(records.announce_provider, self.dht, sha, self.peer_id, self.ttl)
        return record

    async def list(self) -> list[AdapterRecord]:
        """Every named adapter announced in the swarm now, sorted by name."""
        names = await asyncio.to_thread(records.get_names, self.dht)
        return [names[n] for n in sorted(names)]

    async def lookup(self, name: str) -> AdapterRecord | None:
        return (await asyncio.to_thread(records.get_names, self.dht)).get(name)

    async def providers(self, sha256: str) -> builtins.list[str]:  # (`list` here is the method above)
        """Peer ids that announce they serve `sha256`."""
        return await asyncio.to_thread(records.get_providers, self.dht, sha256)

    async def refresh(self, ttl: float | None = None) -> None:
        """Re-announce the name records this peer keeps and, if serving, itself for all it holds.

        Call it periodically (every `ttl / 3` or so), or run `keep_fresh`; records expire after `ttl`.
        """
        ttl = self.ttl if ttl is None else ttl
        if self._kept:
            current = await asyncio.to_thread(records.get_names, self.dht)
            for name, record in list(self._kept.items()):
                now = current.get(name)
                if now is not None and now.sha256 != record.sha256:
                    # Someone published new content under this name: the latest publish wins.
                    logger.info("adapter name %s now means %s; no longer announcing %s",
                                name, now.sha256[:12], record.sha256[:12])
                    del self._kept[name]
            for record in self._kept.values():
                await asyncio.to_thread(records.announce_name, self.dht, record, ttl)
        if self._serving:
            for sha in await asyncio.to_thread(self.store.shas):
                await asyncio.to_thread(records.announce_provider, self.dht, sha, self.peer_id, ttl)

    async def keep_fresh(self) -> None:
        """Refresh every `ttl / 3` until cancelled; a failed refresh is logged and retried next period."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.refresh()
            except Exception:
                logger.warning("refreshing adapter records failed; retrying in %.0fs", self.ttl / 3, exc_info=True)

    async def close(self) -> None:
        """Stop serving. The DHT, and a P2P given to `register`, belong to the caller and stay up."""
        if self._p2p is not None and self._serving:
            with contextlib.suppress(Exception):
                await self._p2p.remove_protobuf_handler(RPC_ADAPTER_GET, stream_output=True)
        if self._p2p is not None and self._own_p2p:
            await self._p2p.shutdown()
        self._p2p, self._serving, self._own_p2p = None, False, False

    # --- fetching ---

    async def fetch(self, name: str, model: str | None = None) -> Path:
        """The local folder of the adapter called `name` in the swarm, downloaded and verified if needed.

        Raises AdapterNotFoundError if no peer announces the name, AdapterError if it was published for
        another `model`, AdapterTooLargeError if it exceeds `max_bytes` (before downloading),
        AdapterVerificationError if every provider served wrong bytes, and AdapterUnavailableError if no
        provider could serve it.
        """
        record = await self.lookup(name)
        if record is None:
            raise AdapterNotFoundError(f"no peer in the swarm has an adapter named {name!r}")
        if model is not None and record.model != model:
            raise AdapterError(f"adapter {name!r} was published for model {record.model!r}, not {model!r}")
        path = self.store.path(record.sha256)
        if path is None:
            if record.size > self.max_bytes:
                raise AdapterTooLargeError(
                    f"adapter {name!r} is {record.size} bytes, more than the limit of {self.max_bytes} bytes"
                )
            data = await self._download_any(record)
            path = await asyncio.to_thread(self.store.add_packed, data, record.sha256, self.max_bytes, name)
        else:
            await asyncio.to_thread(self.store.set_name, name, record.sha256)
        self._kept[name] = record
        if self._serving:
            await asyncio.to_thread(records.announce_provider, self.dht, record.sha256, self.peer_id, self.ttl)
        return path

    async def _download_any(self, record: AdapterRecord) -> bytes:
        """Verified packed bytes of `record` from the first provider that serves them right."""
        providers = [p for p in await self.providers(record.sha256) if p != self.peer_id]
        if not providers:
            raise AdapterUnavailableError(
                f"adapter {record.name!r} is announced, but no peer provides its content {record.sha256[:12]} now"
            )
        random.shuffle(providers)  # spread the load over every holder, as in BitTorrent
        bad, failed = [], []
        for peer in providers:
            try:
                data = await self._download(peer, record)
                actual = hashlib.sha256(data).hexdigest()
                if actual != record.sha256:
                    raise _BadProvider(f"its bytes hash to {actual[:12]}")
                return data
            except _BadProvider as e:
                logger.warning("provider %s served a bad copy of %s: %s", peer[-8:], record.name, e)
                bad.append(f"{peer[-8:]}: {e}")
            except (wire.RemoteError, P2PHandlerError, P2PDaemonError, OSError, EOFError, TimeoutError,
                    ValueError) as e:  # ValueError: ProtocolError, a malformed peer id
                logger.info("provider %s could not serve %s: %s", peer[-8:], record.name, e)
                failed.append(f"{peer[-8:]}: {e}")
        if not failed:
            raise AdapterVerificationError(
                f"every provider of adapter {record.name!r} ({len(bad)}) served bytes that do not match its "
                f"sha256 {record.sha256}: {'; '.join(bad)}"
            )
        raise AdapterUnavailableError(
            f"could not fetch adapter {record.name!r} from any of its {len(providers)} providers: "
            + "; ".join(bad + failed)
        )

    async def _download(self, peer: str, record: AdapterRecord) -> bytes:
        """The bytes one provider streams; _BadProvider as soon as they contradict the record."""
        p2p = await self._get_p2p()
        request = self.membership.stamp(wire.request(AdapterGet(sha256=record.sha256)))
        stream = await asyncio.wait_for(
            p2p.iterate_protobuf_handler(PeerID.from_base58(peer), RPC_ADAPTER_GET, request,
                                         runtime_pb2.ExpertResponse),
            self.request_timeout,
        )
        buf = bytearray()
        async with contextlib.aclosing(stream):
            while True:
                try:
                    msg = await asyncio.wait_for(anext(stream), self.request_timeout)
                except StopAsyncIteration:
                    break
                meta, tensors = wire.parse(msg, AdapterChunk, peer)
                if (meta.sha256, meta.offset, meta.total) != (record.sha256, len(buf), record.size) or len(
                    tensors
                ) != 1 or tensors[0].dtype != torch.uint8:
                    raise _BadProvider(f"chunk at {meta.offset} of {meta.total} bytes does not follow the record")
                chunk = tensors[0].reshape(-1).numpy().tobytes()
                # Checked per chunk, so a provider cannot make us hold more than the announced size.
                if len(buf) + len(chunk) > record.size:
                    raise _BadProvider(f"streamed more than the announced {record.size} bytes")
                buf += chunk
        if len(buf) != record.size:
            raise OSError(f"stream ended after {len(buf)} of {record.size} bytes")
        return bytes(buf)

    async def _get_p2p(self) -> P2P:
        if self._p2p is None:
            self._p2p, self._own_p2p = await self.dht.replicate_p2p(), True
        return self._p2p


class SyncSwarmHub:
    """Blocking facade over `SwarmHub` for code that is not async (the CLI, scripts, notebooks).

    Every call runs on the shared background I/O loop of `swarmllm.client.loop`. With `serve=True` this
    peer serves what its store holds and keeps its records fresh until `shutdown()`; with `serve=False` it
    only reads and downloads, and announces nothing.
    """

    def __init__(self, dht: DHT, store: AdapterStore | None = None, max_bytes: int = DEFAULT_MAX_BYTES, *,
                 serve: bool = True, ttl: float = 120.0, request_timeout: float = 30.0, own_dht: bool = False,
                 membership: Membership = PUBLIC):
        self.hub = SwarmHub(dht, store or AdapterStore(), max_bytes, ttl=ttl, request_timeout=request_timeout,
                            membership=membership)
        self._own_dht = own_dht
        self._refresher: asyncio.Task | None = None
        if serve:
            io_loop.run(self._start())

    @classmethod
    def connect(cls, config: SwarmHubConfig, store: AdapterStore | None = None, serve: bool = True) -> SyncSwarmHub:
        """Join the swarm with a DHT node of our own (in client mode when not serving; shut down with us)."""
        peer = join_as(config, client_mode=not serve)
        dht = peer.dht
        try:
            return cls(dht, store, config.max_bytes, serve=serve, ttl=config.announce_ttl,
                       request_timeout=config.request_timeout, own_dht=True, membership=peer.membership)
        except BaseException:
            dht.shutdown()
            raise

    async def _start(self) -> None:
        await self.hub.register()
        self._refresher = asyncio.create_task(self.hub.keep_fresh())

    @property
    def store(self) -> AdapterStore:
        return self.hub.store

    def publish(self, folder: str | Path, name: str, model: str) -> AdapterRecord:
        return io_loop.run(self.hub.publish(folder, name, model))

    def fetch(self, name: str, model: str | None = None) -> Path:
        return io_loop.run(self.hub.fetch(name, model))

    def list(self) -> list[AdapterRecord]:
        return io_loop.run(self.hub.list())

    def providers(self, sha256: str) -> builtins.list[str]:
        return io_loop.run(self.hub.providers(sha256))

    def refresh(self, ttl: float | None = None) -> None:
        io_loop.run(self.hub.refresh(ttl))

    def shutdown(self) -> None:
        async def stop() -> None:
            if self._refresher is not None:
                self._refresher.cancel()
            await self.hub.close()

        io_loop.run(stop())
        if self._own_dht:
            self.hub.dht.shutdown()

    def __enter__(self) -> SyncSwarmHub:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
