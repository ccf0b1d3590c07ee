"""Packing records and tensors into hivemind protobuf messages, and typed errors out of them.

A message is a hivemind `ExpertRequest`/`ExpertResponse`: `metadata` holds one JSON record from
`swarmllm.protocol`, `tensors` hold the tensors that record describes. An `ErrorReply` in place of the
expected record becomes a `RemoteError` on the caller's side.

Tensors are encoded by `swarmllm.compression`: the sender picks a mode per message (the request's record
says which, so the reply can use the same), and `parse` decodes any mode back to the original dtype.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from typing import TypeVar

import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming
from pydantic import ValidationError

from swarmllm import compression
from swarmllm.protocol import (
    BUSY_ERRORS,
    CALLER_ERRORS,
    PROTOCOL_VERSION,
    Compression,
    ErrorCode,
    ErrorReply,
    Record,
)

R = TypeVar("R", bound=Record)


class RemoteError(RuntimeError):
    """A server refused or failed a request; `code` says why (see `protocol.ErrorCode`)."""

    def __init__(self, code: ErrorCode, message: str, peer: str = "?"):
        super().__init__(f"server {peer[-8:]} refused: [{code}] {message}")
        self.code, self.remote_message, self.peer = code, message, peer


class ProtocolError(ValueError):
    """A message that does not parse as the record it should hold."""


class Blame(enum.Enum):
    """Whom a failed request blames, which decides what a client does next (see `blame`)."""

    CALLER = "caller"  # the request is wrong: every server would refuse it, so none is tried or banned
    BUSY = "busy"  # a healthy server that is full or limits us right now: a session skips it without a ban
    EXPIRED = "expired"  # a healthy server that dropped what we gave it (an idle session, an upload): not banned
    SERVER = "server"  # a crash, a stall, a broken stream or the server's own error: banned for a while


def blame(error: BaseException) -> Blame:
    """The one place where clients sort failures; a server's refusal says why in its `ErrorCode`."""
    if not isinstance(error, RemoteError):
        return Blame.SERVER  # timeouts, dropped connections, vanished peers, malformed replies
    if error.code in CALLER_ERRORS:
        return Blame.CALLER
    if error.code in BUSY_ERRORS:
        return Blame.BUSY
    if error.code in (ErrorCode.SESSION_TIMEOUT, ErrorCode.NOT_CACHED):
        return Blame.EXPIRED
    return Blame.SERVER


def request(record: Record, *tensors: torch.Tensor, compression: Compression = "none") -> runtime_pb2.ExpertRequest:
    """A request; its floating tensors are encoded in `compression`, others travel as they are."""
    return runtime_pb2.ExpertRequest(metadata=record.to_bytes(), tensors=_encode(tensors, compression))


def response(record: Record, *tensors: torch.Tensor, compression: Compression = "none") -> runtime_pb2.ExpertResponse:
    """A reply; a reply to a request that names a compression should use the same one."""
    return runtime_pb2.ExpertResponse(metadata=record.to_bytes(), tensors=_encode(tensors, compression))


def _encode(tensors: tuple[torch.Tensor, ...], mode: Compression) -> list[runtime_pb2.Tensor]:
    return [compression.encode(t, mode) for t in tensors]


def error_response(code: ErrorCode, message: str) -> runtime_pb2.ExpertResponse:
    return response(ErrorReply(code=code, message=message))


def parse(msg, cls: type[R], peer: str = "?") -> tuple[R, list[torch.Tensor]]:
    """Decode one message into (record, tensors in their original dtypes, whatever their compression).

    Raises RemoteError if the peer sent an ErrorReply, ProtocolError if the record or a tensor is malformed.
    """
    # Errors are checked first: no other record has both `code` and `message`.
    try:
        err = ErrorReply.from_bytes(msg.metadata)
    except ValidationError:
        err = None
    if err is not None:
        raise RemoteError(err.code, err.message, peer)
    try:
        record = cls.from_bytes(msg.metadata)
    except ValidationError as e:
        raise ProtocolError(f"expected {cls.__name__}: {e.errors()[:2]}") from None
    if record.version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {record.version} is not {PROTOCOL_VERSION}")
    try:
        tensors = [compression.decode(t) for t in msg.tensors]
    except compression.MalformedTensor as e:
        raise ProtocolError(f"{cls.__name__}: {e}") from None
    return record, tensors


# --- messages larger than one P2P frame ---
# hivemind sends a unary message in one frame of at most 2 MiB. Forward and backward carry whole batches
# (and LoRA gradients), so they travel as streams of parts instead: the first part holds the record,
# every part holds a few tensor pieces, and no part exceeds `max_part_bytes`.

MAX_PART_BYTES = 1 << 20


def split(msg, max_part_bytes: int = MAX_PART_BYTES) -> list:
    """One ExpertRequest/ExpertResponse -> parts of the same type, each at most about `max_part_bytes`."""
    cls = type(msg)
    pieces = [p for t in msg.tensors for p in split_for_streaming(t, max_part_bytes)]
    current: list[runtime_pb2.Tensor] = []
    parts, size = [cls(metadata=msg.metadata)], 0
    for piece in pieces:
        if current and size + len(piece.buffer) > max_part_bytes:
            parts[-1].tensors.extend(current)
            parts.append(cls())
            current, size = [], 0
        current.append(piece)
        size += len(piece.buffer)
    parts[-1].tensors.extend(current)
    return parts


def join(parts: list):
    """Inverse of `split`. Raises ProtocolError on a truncated or malformed sequence of parts."""
    if not parts:
        raise ProtocolError("empty message stream")
    pieces = [p for part in parts for p in part.tensors]
    tensors, i = [], 0
    while i < len(pieces):
        n = pieces[i].chunks or 1
        if n < 1:  # a forged negative count would walk backwards forever
            raise ProtocolError(f"a tensor cannot come in {n} chunks")
        if i + n > len(pieces):
            raise ProtocolError("message stream ended in the middle of a tensor")
        tensors.append(combine_from_streaming(pieces[i : i + n]))
        i += n
    return type(parts[0])(metadata=parts[0].metadata, tensors=tensors)


async def drain(requests, seconds: float, max_messages: int | None = None) -> None:
    """Read and drop what a refused sender still writes, so that it reads the refusal instead of a broken
    stream: until it closes its side, `seconds` pass, or (for senders who may not make us read much)
    `max_messages` have been read."""
    with contextlib.suppress(Exception):  # the end of its stream, the timeout, or a broken stream
        async with asyncio.timeout(seconds):
            read = 0
            async for _ in requests:
                read += 1
                if max_messages is not None and read >= max_messages:
                    return
