"""Every record that crosses the wire or the DHT: typed, frozen and versioned.

Records ignore unknown fields, so a newer peer that adds a field still talks to an older one. Each
carries `version`; a peer refuses a record whose major protocol version it does not speak.

Tensors travel beside the metadata as hivemind `runtime_pb2.Tensor`s (see `swarmllm.wire`); the records
here say what those tensors mean.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal, NewType

from pydantic import BaseModel, ConfigDict, Field

from swarmllm import __version__

PROTOCOL_VERSION = 1

PeerIdStr = NewType("PeerIdStr", str)
SessionId = NewType("SessionId", str)
DType = Literal["float32", "bfloat16"]

# RPC handler names, one per verb; the version is part of the name so incompatible peers never mix.
RPC_INFO = f"swarmllm.v{PROTOCOL_VERSION}.info"
RPC_FORWARD = f"swarmllm.v{PROTOCOL_VERSION}.forward"
RPC_BACKWARD = f"swarmllm.v{PROTOCOL_VERSION}.backward"
RPC_INFERENCE = f"swarmllm.v{PROTOCOL_VERSION}.inference"


class Record(BaseModel):
    """Base of every wire record: immutable, strict about types, tolerant of unknown fields."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: int = PROTOCOL_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes):
        return cls.model_validate_json(data)


class ServerState(enum.StrEnum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"  # announced on shutdown so that clients stop routing to the server at once


class ServerRecord(Record):
    """What a server announces about itself in the DHT, under the model's key with its peer id as subkey."""

    peer_id: PeerIdStr
    start: Annotated[int, Field(ge=0)]
    end: Annotated[int, Field(gt=0)]
    dtype: DType
    state: ServerState = ServerState.ONLINE
    cache_tokens_left: Annotated[int, Field(ge=0)]
    software_version: str = __version__

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"  # malformed, wrong shapes or span outside the server's blocks
    CACHE_FULL = "cache_full"  # the session's cache does not fit the server's budget
    TOO_LONG = "too_long"  # more tokens than the session declared in max_length
    SESSION_TIMEOUT = "session_timeout"
    VERSION = "version"  # protocol version mismatch
    INTERNAL = "internal"


class ErrorReply(Record):
    """Sent instead of a result. The server keeps serving everyone else."""

    code: ErrorCode
    message: str


class SpanRequest(Record):
    """`forward` and `backward`: run blocks `[start, end)` (a sub-range of the server's span) on a batch.

    Tensors: forward = (hidden, position_ids[, attention_mask]); backward = (hidden, position_ids,
    grad_output[, attention_mask]). `hidden` is the *input* of the span in both cases: the server recomputes
    the forward pass for backward, so it keeps no activations between calls.
    """

    start: int
    end: int
    has_mask: bool = False


class SpanReply(Record):
    """Reply of `forward` (tensors: hidden out) and of `backward` (tensors: grad wrt hidden in)."""


class OpenSession(Record):
    """First message of an `inference` stream: declares the session's size so it can be admitted."""

    session_id: SessionId
    start: int
    end: int
    batch_size: Annotated[int, Field(ge=1)]
    max_length: Annotated[int, Field(ge=1)]


class SessionOpened(Record):
    session_id: SessionId
    cache_tokens: int


class Step(Record):
    """One step of a session. Tensors: (hidden, position_ids[, attention_mask]).

    `attention_mask` is the full 2D padding mask (past + new tokens); it is omitted when there is no padding.
    """

    step_id: int
    has_mask: bool = False


class StepDone(Record):
    """Reply to a step. Tensors: (hidden,). `length` is how many tokens the session's cache now holds."""

    step_id: int
    length: int
