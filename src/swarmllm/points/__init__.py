"""Contribution points: signed work receipts, balances computed from them, and the queue priority they buy."""

from swarmllm.points.ledger import Ledger
from swarmllm.points.priority import PriorityPolicy
from swarmllm.points.receipts import Receipt, ReceiptError, check, countersign, issue
from swarmllm.points.work import RequestedWork, ServedWork, work_units

__all__ = [
    "Ledger",
    "PriorityPolicy",
    "Receipt",
    "ReceiptError",
    "RequestedWork",
    "ServedWork",
    "check",
    "countersign",
    "issue",
    "work_units",
]
