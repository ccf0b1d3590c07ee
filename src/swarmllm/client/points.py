"""A client's side of contribution points: count the work it asks of each server, prove which account it
spends from, and countersign the servers' receipts now and then (see `swarmllm.points`).

The account is an identity file (ClientConfig.account), typically the one the user's own server runs as,
so the points that server earns buy this client priority. Without one, the client is its own account: a
newcomer, served under the scheduler's guaranteed newcomer share.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable

from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.points import RequestedWork, work_units
from swarmllm.protocol import (
    RPC_POINTS_BIND,
    RPC_RECEIPT,
    RPC_SETTLE,
    AccountBinding,
    Bound,
    PeerIdStr,
    Receipt,
    ReceiptRequest,
    Settle,
    Settled,
    binding_bytes,
)
from swarmllm.trust.identity import Identity

logger = logging.getLogger(__name__)

Call = Callable[[str, str, runtime_pb2.ExpertRequest], Awaitable[runtime_pb2.ExpertResponse]]


class ClientPoints:
    def __init__(self, account: Identity, peer_id: str, call: Call):
        self.account, self.peer_id, self._call = account, peer_id, call
        self.requested = RequestedWork()
        self._bound: dict[str, asyncio.Future] = {}
        self._asked: dict[str, int] = {}  # server -> our requested total when we last asked it for a receipt
        self._last: dict[str, tuple[int, int]] = {}  # server -> (epoch, total) of the last receipt we settled

    def count(self, server: str, blocks: int, tokens: int) -> None:
        """Work about to be asked of `server` (counted when sent, so a lost reply never blocks a receipt)."""
        self.requested.add(server, work_units(blocks, tokens))

    async def bind(self, server: str) -> None:
        """Prove to `server`, once, that this peer acts for the account (nothing to prove for our own id)."""
        if self.account.peer_id == self.peer_id:
            return
        if server not in self._bound:
            self._bound[server] = asyncio.ensure_future(self._bind(server))
        try:
            await asyncio.shield(self._bound[server])
        except Exception:
            self._bound.pop(server, None)  # try again next time; the request itself goes on unprioritized
            logger.debug("binding the account at %s failed", server[-8:], exc_info=True)

    async def _bind(self, server: str) -> None:
        binding = AccountBinding(
            account=PeerIdStr(self.account.peer_id), account_key=base64.b64encode(self.account.public_der).decode(),
            signature=base64.b64encode(self.account.sign(binding_bytes(self.peer_id))).decode(),
        )
        wire.parse(await self._call(server, RPC_POINTS_BIND, wire.request(binding)), Bound, server)

    async def settle(self, server: str) -> Receipt:
        """Ask `server` for a receipt, countersign it within what we requested, send it back; returns it."""
        receipt, _ = wire.parse(await self._call(server, RPC_RECEIPT, wire.request(ReceiptRequest())), Receipt, server)
        if self._last.get(server) == (receipt.epoch, receipt.total_work):
            return receipt  # nothing new since the last settlement (sending it again would be a replay)
        signed = self.requested.countersign(self.account, receipt)
        wire.parse(await self._call(server, RPC_SETTLE, wire.request(Settle(receipt=signed))), Settled, server)
        self._last[server] = (receipt.epoch, receipt.total_work)
        return signed

    async def settle_all(self, final: bool = False) -> None:
        """Settle with every server asked for work since we last asked it (failures wait for next time).
        `final`: also every server whose last receipt did not cover all we asked (work still in flight then)."""
        for server in self.requested.servers():
            requested = self.requested.requested(server)
            covered = self._last.get(server, (0, 0))[1]
            if requested <= self._asked.get(server, 0) and not (final and requested > covered):
                continue
            self._asked[server] = requested
            try:
                await self.settle(server)
            except Exception as e:  # unreachable, refused or inflated: nothing is signed; retried next time
                logger.info("no receipt settled with %s: %r", server[-8:], e)
