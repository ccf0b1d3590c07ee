"""Every record that crosses the wire or the DHT: typed, frozen and versioned.

Records ignore unknown fields, so a newer peer that adds a field still talks to an older one. Each
carries `version`; a peer refuses a record whose major protocol version it does not speak.

Tensors travel beside the metadata as hivemind `runtime_pb2.Tensor`s (see `swarmllm.wire`); the records
here say what those tensors mean.
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Literal, NewType

from pydantic import BaseModel, ConfigDict, Field, model_validator

from swarmllm import __version__

PROTOCOL_VERSION = 1

PeerIdStr = NewType("PeerIdStr", str)
SessionId = NewType("SessionId", str)
DType = Literal["float32", "float16", "bfloat16"]
# How a server stores and computes its blocks, as it announces them. Plain names rather than Literals: a
# peer must keep the records of servers that use a dtype or quantization it does not know yet (a newer
# release's), since it talks to them in the same hidden-state tensors all the same.
SettingName = Annotated[str, Field(pattern=r"^[a-z0-9_]{1,32}$")]
# How a message's floating tensors are encoded on the wire (see `swarmllm.compression` for error bounds).
# The sender picks it; whoever replies to a request replies in the request's compression.
Compression = Literal["none", "float16", "bfloat16", "blockwise8"]

# RPC handler names, one per verb; the version is part of the name so incompatible peers never mix.
RPC_INFO = f"swarmllm.v{PROTOCOL_VERSION}.info"
RPC_FORWARD = f"swarmllm.v{PROTOCOL_VERSION}.forward"
RPC_BACKWARD = f"swarmllm.v{PROTOCOL_VERSION}.backward"
RPC_INFERENCE = f"swarmllm.v{PROTOCOL_VERSION}.inference"
RPC_LORA_PUT = f"swarmllm.v{PROTOCOL_VERSION}.lora_put"
RPC_PUSH = f"swarmllm.v{PROTOCOL_VERSION}.push"


# Block indices: a range [start, end) of a model's blocks.
BlockStart = Annotated[int, Field(ge=0)]
BlockEnd = Annotated[int, Field(gt=0)]


class Record(BaseModel):
    """Base of every wire record: immutable, strict about types (`"7"` is not an int, nor `"yes"` a bool),
    tolerant of unknown fields. A record with a block range needs `start < end`."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    version: int = PROTOCOL_VERSION

    @model_validator(mode="after")
    def _a_range_is_not_empty(self):
        start, end = getattr(self, "start", None), getattr(self, "end", None)
        if isinstance(start, int) and isinstance(end, int) and end <= start:
            raise ValueError(f"block range {start}:{end} is empty")
        return self

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes):
        return cls.model_validate_json(data)

    @classmethod
    def from_value(cls, value: object):
        """A record out of a DHT value (what `model_dump(mode="json")` stored), read as strictly as from the
        wire: as JSON, where an enum is its string and a tuple a list, but `"7"` is still no int. Raises
        ValueError (pydantic's ValidationError is one) for anything else."""
        try:
            data = json.dumps(value)
        except (TypeError, ValueError) as e:  # bytes, or a circular structure: not a record
            raise ValueError(f"not a {cls.__name__}: {e}") from e
        return cls.model_validate_json(data)


class ServerState(enum.StrEnum):
    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"  # finishing its sessions before it moves to other blocks; takes no new ones
    OFFLINE = "offline"  # announced on shutdown so that clients stop routing to the server at once


class ServerRecord(Record):
    """What a server announces about itself in the DHT, under the model's key with its peer id as subkey."""

    peer_id: PeerIdStr
    start: BlockStart
    end: BlockEnd
    dtype: SettingName  # float32, float16, bfloat16, or a newer peer's
    quant: SettingName = "none"  # how its linear weights are stored: none, int8, int4, nf4 (see models/quant.py)
    device: SettingName = "cpu"  # the kind of device its blocks run on: cpu, cuda, mps (for monitors)
    state: ServerState = ServerState.ONLINE
    cache_tokens_left: Annotated[int, Field(ge=0)]
    software_version: str = __version__
    # Measured by the server on its own blocks at start (see server/throughput.py); 0 = not measured.
    step_time: Annotated[float, Field(ge=0)] = 0.0  # seconds per block for one inference step (batch 1, 1 token)
    forward_tps: Annotated[float, Field(ge=0)] = 0.0  # tokens per second per block for forward/backward batches
    # Round-trip times (seconds) it measured to servers holding the block right after its span.
    next_rtts: dict[str, float] = Field(default_factory=dict)
    adapters: tuple[str, ...] = ()  # named adapters loaded and ready to apply
    # A fine-tuned version of some of its blocks, published under this name. Clients route a block to a
    # server only if both agree on which version of that block they mean (see `client.routing`).
    override: str | None = None
    override_blocks: tuple[int, ...] = ()
    # For monitors (`swarmllm status`, the web monitor); 0 from servers older than these fields.
    num_blocks: Annotated[int, Field(ge=0)] = 0  # blocks in the whole model, so gaps at its end show too
    active_sessions: Annotated[int, Field(ge=0)] = 0  # inference sessions open now
    tokens_served: Annotated[int, Field(ge=0)] = 0  # tokens run through its span since it started
    started_at: Annotated[float, Field(ge=0)] = 0.0  # wall-clock time it came online

    def block_version(self, block: int) -> str | None:
        """Which version of `block` this server runs: its override's name, or None for the base weights."""
        return self.override if block in self.override_blocks else None

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end


class ModelEntry(Record):
    """One line of the swarm's model index (`swarmllm.v1.models`, subkey = the server's peer id): which model a
    server serves, so monitors can list every model without knowing their names."""

    peer_id: PeerIdStr
    model: str
    num_blocks: Annotated[int, Field(ge=0)] = 0


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"  # malformed, wrong shapes or span outside the server's blocks
    CACHE_FULL = "cache_full"  # the session's cache does not fit the server's budget
    TOO_LONG = "too_long"  # more tokens than the session declared in max_length
    SESSION_TIMEOUT = "session_timeout"
    NOT_SERVING = "not_serving"  # the server does not hold these blocks (any more): route elsewhere
    NOT_CACHED = "not_cached"  # the LoRA weights named by hash are not (or no longer) cached: send them
    ADAPTER = "adapter"  # a named adapter or override is unknown, fails verification, is too large or does not fit
    VERSION = "version"  # protocol version mismatch
    NOT_MEMBER = "not_member"  # a private swarm's server got no valid proof of membership: nothing was run
    # A per-peer limit was hit (sessions, tokens or bytes in flight, request rate or size; see
    # server/limits.py): nothing was run, and the server is healthy. Retry later, or on another server.
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"


# How clients treat each error, in one place. The request itself is wrong: every server would refuse it the
# same way, so nothing is retried elsewhere and no server is blamed.
CALLER_ERRORS = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.TOO_LONG, ErrorCode.VERSION, ErrorCode.ADAPTER,
                           ErrorCode.NOT_MEMBER})
# A healthy server that is full or busy right now: never banned, retried a bounded number of times.
BUSY_ERRORS = frozenset({ErrorCode.CACHE_FULL, ErrorCode.RATE_LIMITED})


class ErrorReply(Record):
    """Sent instead of a result. The server keeps serving everyone else."""

    code: ErrorCode
    message: str


class LoraRef(Record):
    """Client-owned LoRA weights for blocks `[start, end)` of a request, named by their content hash.

    The weights travel once (in `LoraPut` messages) and are then cached by the server per requester; a
    request carries only this reference. For each block in order and each target module in `targets`
    order there are two tensors: A (rank, in_features) and B (out_features, rank). `seed` fixes the
    dropout masks, so a backward recomputation sees the same masks as the forward pass.
    """

    sha256: str
    rank: Annotated[int, Field(ge=1)]
    alpha: Annotated[float, Field(allow_inf_nan=False)]
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    targets: tuple[str, ...]
    # Bounded so that the per-block generator seed (see `lora.applied`) fits torch's 64 bits.
    seed: Annotated[int, Field(ge=-(2**43), lt=2**43)] = 0


class Tuning(Record):
    """What, besides the base blocks, a request runs with. The default is the plain base model."""

    adapter: str | None = None  # a named adapter the server applies (fetched from the swarm if needed)
    lora: LoraRef | None = None
    # Deep prompt tuning: one extra tensor (blocks, batch or 1, prefix, hidden) added to the first `prefix`
    # positions before each block; backward returns its gradient.
    prompts: bool = False
    # The block override the client expects (None = base weights); a server running another version refuses.
    override: str | None = None


class LoraPut(Record):
    """Upload (part of) client-owned LoRA weights. Tensors: A and B per (block in `blocks`, target), in order.

    Parts may arrive in several messages (a size limit applies per message); the server verifies the hash
    once every block of `[start, end)` has arrived, then caches the weights for this requester.
    """

    lora: LoraRef
    start: BlockStart
    end: BlockEnd
    blocks: tuple[int, ...]


class LoraStored(Record):
    complete: bool


class SpanRequest(Record):
    """`forward` and `backward`: run blocks `[start, end)` (a sub-range of the server's span) on a batch.

    Tensors: forward = (hidden, position_ids[, attention_mask]); backward = (hidden, position_ids,
    grad_output[, attention_mask]). `hidden` is the *input* of the span in both cases: the server recomputes
    the forward pass for backward, so it keeps no activations between calls.
    """

    start: BlockStart
    end: BlockEnd
    has_mask: bool = False
    tuning: Tuning = Tuning()
    # forward: keep the autograd graph under this id for a backward soon; backward: use the graph kept
    # under this id if the server still has it (else it recomputes, with the same result).
    keep: str | None = None
    # The request's floating tensors are encoded so, and the reply's must be too. A server that predates the
    # field ignores it and replies uncompressed, which a client decodes all the same (it reads "float16" too).
    compression: Compression = "none"


class SpanReply(Record):
    """Reply of `forward` (tensors: hidden out) and of `backward` (tensors: grad wrt hidden in, then the
    gradient of the deep prompts if sent, then one per LoRA tensor in `LoraRef` order if a LoRA was used)."""


class OpenSession(Record):
    """First message of an `inference` stream: declares the session's size so it can be admitted."""

    session_id: SessionId
    start: BlockStart
    end: BlockEnd
    batch_size: Annotated[int, Field(ge=1)]
    max_length: Annotated[int, Field(ge=1)]
    tuning: Tuning = Tuning()  # deep prompts, if any, travel as this message's one tensor
    # Encoding of the floating tensors of every Step of this session and of every StepDone in reply.
    compression: Compression = "none"


class SessionOpened(Record):
    session_id: SessionId
    cache_tokens: int


# The step id of a replay: a replacement (or checking) server rebuilding its cache from the session's
# history. Server-to-server pushes never carry it, so the server never mistakes it for a duplicate.
REPLAY_STEP = -1


class Step(Record):
    """One step of a session. Tensors: (hidden, position_ids[, attention_mask]).

    `attention_mask` is the full 2D padding mask (past + new tokens); it is omitted when there is no padding.
    """

    step_id: int  # counts the client's steps from 0 (a pushed copy and the client's share it), or REPLAY_STEP
    has_mask: bool = False
    # Server-to-server push: the peers after this one in the route, in order. The server sends its output
    # straight to the first of them (which pushes on to the rest) as well as back to the client.
    push_to: tuple[str, ...] = ()
    # A rewind: before this step the server keeps only the first `keep` tokens of the session's cache
    # (assisted generation, cache invalidation); None keeps them all. A server too old to know the field
    # would ignore it: the client checks `StepDone.length`.
    keep: int | None = None
    # Beam search: a (batch,) int64 tensor of row indices follows the other tensors; before this step, row i
    # of the session's cache becomes what row hypo_ids[i] was.
    has_hypo_ids: bool = False


class Push(Record):
    """A step pushed by the previous server of a session's route (RPC `push`). Tensors as in `Step`.

    The receiver runs it if it has not run that step yet; the client's own copy of the step, which
    follows, is then ignored (and vice versa), so a lost push only costs time.
    """

    session_id: SessionId
    start: BlockStart  # the receiving hop's first block: one server may run two hops of a route
    step: Step


class Pushed(Record):
    """Reply to a push: the step is queued at the receiver."""


class StepDone(Record):
    """Reply to a step. Tensors: (hidden,). `length` is how many tokens the session's cache now holds."""

    step_id: int
    length: int


# --- adapter hub ---
# Trained adapters shared through the swarm itself (see `swarmllm.adapters.swarm_hub`): a name record says
# which content a name means, provider records say who holds that content, and `adapter_get` streams it.

RPC_ADAPTER_GET = f"swarmllm.v{PROTOCOL_VERSION}.adapter_get"

AdapterKind = Literal["lora", "blocks"]
# Content is named by the sha256 of its packed bytes (`adapters.package.pack`): lowercase hex, exactly 64.
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# Names are DHT subkeys and table cells, never paths: a word character first, then no spaces.
AdapterName = Annotated[str, Field(pattern=r"^\w[\w.\-/+]{0,127}$")]


class AdapterRecord(Record):
    """A named adapter, stored under `swarmllm.v1.adapters` with `name` as subkey.

    `size` is the length of the packed bytes that `adapter_get` streams, so a fetcher can refuse an adapter
    larger than its limit before downloading anything. `model` is the base model's display name.
    """

    name: AdapterName
    sha256: Sha256Hex
    size: Annotated[int, Field(gt=0)]
    kind: AdapterKind
    model: Annotated[str, Field(min_length=1)]
    publisher: PeerIdStr


class AdapterProvider(Record):
    """A peer that serves some content, stored under `swarmllm.v1.adapter.<sha256>` with `peer_id` as subkey."""

    peer_id: PeerIdStr


class AdapterGet(Record):
    """Request of `adapter_get`: stream the packed bytes of `sha256`, starting at `offset`."""

    sha256: Sha256Hex
    offset: Annotated[int, Field(ge=0)] = 0


class AdapterChunk(Record):
    """One reply of the `adapter_get` stream. Tensors: (uint8 bytes [offset, offset + n) of `total`,)."""

    sha256: Sha256Hex
    offset: Annotated[int, Field(ge=0)]
    total: Annotated[int, Field(gt=0)]


# --- verification reports ---
# A client that caught a server returning wrong results (see `client.verification`) publishes a report
# under `swarmllm.v1.<model>.reports` with subkey `<reporter>/<offender>`: the DHT accepts it only if the
# reporter signed it (see `trust.records`), so nobody reports in another peer's name.


class Report(Record):
    """`reporter` saw `offender` return outputs for blocks `[start, end)` that a second and a third server,
    given the same inputs, agreed were wrong by `error` (relative L2 distance) > `tolerance`."""

    reporter: PeerIdStr
    offender: PeerIdStr
    start: BlockStart
    end: BlockEnd
    error: Annotated[float, Field(ge=0)]
    tolerance: Annotated[float, Field(ge=0)]
    at: float  # unix time of the mismatch


# --- contribution points (see `swarmllm.points`) ---
# Receipts are published under `swarmllm.v1.points`, subkey `<server>/<client>/<epoch>` (so only the server
# stores them), and exchanged by three unary RPCs: a client binds its transport peer id to its points
# account once per server, asks for a receipt, and sends it back countersigned.

RPC_POINTS_BIND = f"swarmllm.v{PROTOCOL_VERSION}.points_bind"
RPC_RECEIPT = f"swarmllm.v{PROTOCOL_VERSION}.receipt"
RPC_SETTLE = f"swarmllm.v{PROTOCOL_VERSION}.settle"


class Receipt(Record):
    """Server `server` did `total_work` block-tokens for `client` since `epoch`, as both of them signed.

    Keys and signatures are base64 text (keys: DER SubjectPublicKeyInfo), so the record stays plain JSON.
    The client's fields stay empty until it countersigns.
    """

    server: PeerIdStr
    client: PeerIdStr
    total_work: Annotated[int, Field(ge=0)]
    # When the server's ledger began (unix seconds); a new epoch restarts the server's totals.
    epoch: Annotated[int, Field(ge=0)]
    issued_at: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    server_key: str
    server_sig: str = ""
    client_key: str = ""
    client_sig: str = ""

    @property
    def pair(self) -> tuple[str, str, int]:
        """What the receipt is the latest of: one running total per (server, client, epoch)."""
        return self.server, self.client, self.epoch

    @property
    def countersigned(self) -> bool:
        return bool(self.client_sig)


class AccountBinding(Record):
    """`account` (an identity, e.g. the one its owner's server runs as) signs that the sending peer spends
    and is prioritized on its behalf. Without one, a peer is its own account."""

    account: PeerIdStr
    account_key: str  # base64 DER public key of `account`
    signature: str  # base64, over `binding_bytes(sender peer id)`


class Bound(Record):
    pass


class ReceiptRequest(Record):
    """Ask a server for a receipt of everything it served this account in its current epoch."""


class Settle(Record):
    receipt: Receipt  # countersigned by the client


class Settled(Record):
    total_work: int


def binding_bytes(peer_id: str) -> bytes:
    return b"swarmllm account binding v1\0" + peer_id.encode()
