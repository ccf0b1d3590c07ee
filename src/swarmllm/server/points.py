"""A server's side of contribution points: count the work served, issue receipts, collect countersigned
ones, publish them, and rank queued work by the requester's balance (see `swarmllm.points`).

Balances come from every receipt in the DHT (refreshed with the server's record), minus the work this
server has served an account that the account has not countersigned yet: a client that never settles gains
nothing here by it.
"""

from __future__ import annotations

import base64
import binascii
import logging

from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.points import Ledger, ReceiptError, ServedWork, check, work_units
from swarmllm.protocol import (
    AccountBinding,
    Bound,
    ErrorCode,
    Receipt,
    ReceiptRequest,
    Settle,
    Settled,
    binding_bytes,
)
from swarmllm.trust.identity import Identity, verify

logger = logging.getLogger(__name__)


class ServerPoints:
    """Thread-safe where the scheduler calls it (`priority`); the RPC methods run on the event loop."""

    def __init__(self, identity: Identity):
        self.identity = identity
        self.served = ServedWork()
        self.settled = Ledger()  # receipts our clients countersigned: what we publish
        self.swarm = Ledger()  # everyone's receipts, as last read from the DHT
        self.accounts: dict[str, str] = {}  # transport peer id -> the account it proved it acts for

    def account(self, peer: str) -> str:
        return self.accounts.get(peer, peer)

    def count(self, peer: str, blocks: int, tokens: int) -> None:
        """Work just served to `peer`: `tokens` positions (batch x new) through `blocks` blocks."""
        if peer:
            self.served.add(self.account(peer), work_units(blocks, tokens))

    def unsettled(self, account: str) -> int:
        receipt = self.settled.latest((self.identity.peer_id, account, self.served.epoch))
        return self.served.total(account) - (receipt.total_work if receipt is not None else 0)

    def priority(self, peer: str) -> float:
        """The requester's balance as this server sees it: what the scheduler orders queued work by."""
        account = self.account(peer)
        return self.swarm.balance(account) - self.unsettled(account)

    def refresh(self, receipts: list[Receipt]) -> None:
        self.swarm = Ledger.from_receipts([*receipts, *self.settled.receipts()])

    # --- RPCs ---

    async def rpc_bind(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        peer = str(context.remote_id)
        try:
            meta, _ = wire.parse(request, AccountBinding)
            key = base64.b64decode(meta.account_key, validate=True)
            if not verify(meta.account, key, binding_bytes(peer), base64.b64decode(meta.signature, validate=True)):
                return wire.error_response(ErrorCode.BAD_REQUEST, "the account binding's signature does not verify")
        except (wire.ProtocolError, binascii.Error, ValueError) as e:
            return wire.error_response(ErrorCode.BAD_REQUEST, f"bad account binding: {e}")
        self.accounts[peer] = meta.account
        logger.info("peer %s acts for account %s", peer[-8:], meta.account[-8:])
        return wire.response(Bound())

    async def rpc_receipt(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        try:
            wire.parse(request, ReceiptRequest)
            account = self.account(str(context.remote_id))
            if account == self.identity.peer_id:
                raise ReceiptError("a peer cannot get a receipt from itself")
            return wire.response(self.served.receipt(self.identity, account))
        except (wire.ProtocolError, ReceiptError) as e:
            return wire.error_response(ErrorCode.BAD_REQUEST, str(e))

    async def rpc_settle(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Take a countersigned receipt back: it must be ours, for this account, this epoch, within what we
        served, validly signed by both, and newer than the last one (a replay is refused)."""
        try:
            meta, _ = wire.parse(request, Settle)
            r, account = meta.receipt, self.account(str(context.remote_id))
            if (r.server, r.client, r.epoch) != (self.identity.peer_id, account, self.served.epoch):
                raise ReceiptError("the receipt is not one this server issued to this account in this epoch")
            if r.total_work > self.served.total(account):
                raise ReceiptError(f"the receipt claims {r.total_work} work units; {self.served.total(account)} were served")
            check(r)
            self.settled.add(r)
            return wire.response(Settled(total_work=r.total_work))
        except (wire.ProtocolError, ReceiptError) as e:
            logger.info("refused a receipt from %s: %s", str(context.remote_id)[-8:], e)
            return wire.error_response(ErrorCode.BAD_REQUEST, f"receipt refused: {e}")
