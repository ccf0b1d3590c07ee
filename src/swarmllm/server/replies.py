"""Request parsing and typed error replies, shared by every RPC of a server (handler.py, sessions.py)."""

from __future__ import annotations

import logging

from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.adapters import lora
from swarmllm.adapters.package import AdapterError
from swarmllm.protocol import ErrorCode
from swarmllm.server import compute
from swarmllm.server.cache import CacheFullError
from swarmllm.server.limits import RateLimited
from swarmllm.server.lora_cache import NotCached, UploadsFull

logger = logging.getLogger(__name__)

_ERRORS = {
    compute.BadRequest: ErrorCode.BAD_REQUEST,
    compute.NotServing: ErrorCode.NOT_SERVING,
    wire.ProtocolError: ErrorCode.BAD_REQUEST,
    CacheFullError: ErrorCode.CACHE_FULL,
    compute.TooLong: ErrorCode.TOO_LONG,
    lora.LoraShapeError: ErrorCode.BAD_REQUEST,
    NotCached: ErrorCode.NOT_CACHED,
    RateLimited: ErrorCode.RATE_LIMITED,
    UploadsFull: ErrorCode.RATE_LIMITED,
}


def error_code(e: Exception) -> ErrorCode:
    """The typed code a client gets for `e`; INTERNAL for anything not expected of a bad or unlucky request."""
    if isinstance(e, AdapterError):
        return ErrorCode.ADAPTER
    return next((_ERRORS[c] for c in type(e).__mro__ if c in _ERRORS), ErrorCode.INTERNAL)


def error_reply(e: Exception) -> runtime_pb2.ExpertResponse:
    """The `ErrorReply` for `e`; an internal error is also logged with its traceback."""
    code = error_code(e)
    if code == ErrorCode.INTERNAL:
        logger.exception("internal error while serving a request")
    return wire.error_response(code, str(e))


def parse_request(msg, cls):
    """`wire.parse` of a request: an ErrorReply where a request belongs is malformed, not a remote failure."""
    try:
        return wire.parse(msg, cls)
    except wire.RemoteError:
        raise wire.ProtocolError(f"expected {cls.__name__}, got an ErrorReply") from None


def unpack(tensors: list, n_required: int, has_mask: bool, has_prompts: bool = False) -> tuple:
    """(required..., mask or None, prompts or None) out of a request's tensors, checking their count."""
    expected = n_required + int(has_mask) + int(has_prompts)
    if len(tensors) != expected:
        raise compute.BadRequest(f"expected {expected} tensors, got {len(tensors)}")
    mask = tensors[n_required] if has_mask else None
    prompts = tensors[-1] if has_prompts else None
    return (*tensors[:n_required], mask, prompts)
