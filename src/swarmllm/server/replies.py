"""Request parsing and typed error replies, shared by every RPC of a server (handler.py, sessions.py)."""

from __future__ import annotations

import logging

import torch
from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.adapters import lora
from swarmllm.adapters.package import AdapterError
from swarmllm.models.device import is_out_of_memory
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
    """The typed code a client gets for `e`; INTERNAL for anything not expected of a bad or unlucky request.

    The device running out of memory is `cache_full`: this server has no room for the request now, so the
    client goes to another one (a session that hit it is closed, and its cache pages freed)."""
    if isinstance(e, AdapterError):
        return ErrorCode.ADAPTER
    if is_out_of_memory(e):
        return ErrorCode.CACHE_FULL
    return next((_ERRORS[c] for c in type(e).__mro__ if c in _ERRORS), ErrorCode.INTERNAL)


def error_reply(e: Exception) -> runtime_pb2.ExpertResponse:
    """The `ErrorReply` for `e`; an internal error is also logged with its traceback."""
    code = error_code(e)
    if code == ErrorCode.INTERNAL:
        logger.exception("internal error while serving a request")
    elif is_out_of_memory(e):
        logger.warning("out of device memory while serving a request: %s", str(e).splitlines()[0])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the failed request's blocks back before the next one
    return wire.error_response(code, str(e))


def parse_request(msg, cls, device: torch.device | None = None):
    """`wire.parse` of a request: an ErrorReply where a request belongs is malformed, not a remote failure.

    Its tensors are moved to `device` (the span's) here, once: from then on everything the server computes
    for the request lives there, and only replies come back to the CPU, to be serialized."""
    try:
        meta, tensors = wire.parse(msg, cls)
    except wire.RemoteError:
        raise wire.ProtocolError(f"expected {cls.__name__}, got an ErrorReply") from None
    if device is not None and device.type != "cpu":
        tensors = [t.to(device) for t in tensors]
    return meta, tensors


def unpack(tensors: list, n_required: int, has_mask: bool, has_prompts: bool = False) -> tuple:
    """(required..., mask or None, prompts or None) out of a request's tensors, checking their count."""
    expected = n_required + int(has_mask) + int(has_prompts)
    if len(tensors) != expected:
        raise compute.BadRequest(f"expected {expected} tensors, got {len(tensors)}")
    mask = tensors[n_required] if has_mask else None
    prompts = tensors[-1] if has_prompts else None
    return (*tensors[:n_required], mask, prompts)
