"""What a server's RPC classes share: one `ServingContext`, built once by the server (or a test) and passed to
`Handler` (info, forward, backward, lora_put) and `Sessions` (inference, push).

Nothing is assigned into an RPC class from outside: what changes while a server runs has one owner here,
with one way to change it. The span moves with `SpanSlot.set_span` (a rebalance), a block override is set
on the `TuningResolver`, and test-only corruption lives in `Faults`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch
from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.adapters import lora
from swarmllm.adapters.package import AdapterError
from swarmllm.models.span import Span
from swarmllm.protocol import ErrorCode, Tuning
from swarmllm.server import compute
from swarmllm.server.audit import AuditLog
from swarmllm.server.cache import CacheMemory, PagePool
from swarmllm.server.config import default
from swarmllm.server.kept_graphs import KeptGraphs
from swarmllm.server.limits import PeerLimits
from swarmllm.server.lora_cache import LoraCache
from swarmllm.server.metrics import Kind, ServerMetrics
from swarmllm.server.points import ServerPoints
from swarmllm.server.replies import error_code, error_reply
from swarmllm.server.scheduler import Scheduler
from swarmllm.trust.membership import PUBLIC, Membership

NamedAdapter = tuple[lora.LoraSpec, lora.LoraWeights]


class SpanSlot:
    """The span a server serves now, and the pool of cache pages allocated for it; both None while it moves to
    other blocks (requests then get `not_serving`). The device never changes: every tensor a request brings is
    moved there as it is parsed.

    The pool takes `memory`'s whole budget, in pages of `page_tokens` tokens; the budget is trimmed to whole
    pages, so that every byte `memory` grants is a page that exists."""

    def __init__(self, span: Span, memory: CacheMemory, page_tokens: int = default("cache_page_tokens")):
        self.device: torch.device = span.device
        self.memory, self.page_tokens, self._budget = memory, page_tokens, memory.budget
        self.span: Span | None = None
        self.pool: PagePool | None = None
        self.set_span(span)

    def set_span(self, span: Span | None) -> None:
        """Serve `span` from now on (None: nothing), with a new pool; no session may hold pages of the old one."""
        if span is not None and span.device != self.device:
            raise ValueError(f"a server's span stays on {self.device}, got one on {span.device}")
        if self.memory.used:
            raise RuntimeError(f"sessions still hold {self.memory.used} bytes of the attention cache")
        self.span, self.pool = span, None  # the old pool is freed before the new one is allocated
        if span is not None:
            self.pool = PagePool(span, self._budget, self.page_tokens)
            self.memory.budget = self.pool.capacity

    def sub_span(self, start: int, end: int) -> Span:
        """Blocks [start, end) of the span served now (read once per request: a move may clear it)."""
        return compute.sub_span(self.span, start, end)


@dataclass(frozen=True)
class Override:
    """A fine-tuned version of some blocks that this server runs instead of the base weights."""

    name: str
    blocks: frozenset[int]


class TuningResolver:
    """Turns a request's `Tuning` into what compute applies: a client's uploaded LoRA weights (by hash, from
    `lora_cache`), a named adapter (`adapter(name)` fetches it on first use), or deep prompts; and refuses a
    request whose idea of the block override differs from this server's."""

    def __init__(self, lora_cache: LoraCache | None = None,
                 adapter: Callable[[str], Awaitable[NamedAdapter]] | None = None, override: Override | None = None):
        self.lora_cache = lora_cache if lora_cache is not None else LoraCache(default("lora_cache_bytes"))
        self.adapter, self.override = adapter, override

    async def extras(self, tuning: Tuning, span: Span, peer: str, prompts) -> compute.Extras:
        self._check_override(tuning, span)
        if tuning.lora is not None and tuning.adapter is not None:
            raise compute.BadRequest("a request uses either client LoRA weights or a named adapter, not both")
        if tuning.lora is not None:
            ref = tuning.lora
            trainable = self.lora_cache.get(peer, ref, span.start, span.end)
            weights = lora.unflatten(trainable, range(span.start, span.end), ref.targets)
            return compute.Extras(prompts, weights, ref.alpha / ref.rank, ref.dropout, ref.seed, trainable)
        if tuning.adapter is not None:
            if self.adapter is None:
                raise compute.BadRequest("this server does not serve named adapters")
            spec, weights = await self.adapter(tuning.adapter)
            return compute.Extras(prompts, weights, spec.scaling)
        return compute.Extras(prompts)

    def _check_override(self, tuning: Tuning, span: Span) -> None:
        mine = self.override.name if self.override else None
        touches = self.override is not None and any(b in self.override.blocks for b in range(span.start, span.end))
        # A client that asks for an override must get it, and one that does not must never get it.
        if tuning.override != mine and (tuning.override is not None or touches):
            raise AdapterError(
                f"blocks {span.start}:{span.end} here run {mine or 'the base weights'}, "
                f"the request expects {tuning.override or 'the base weights'}"
            )


@dataclass
class Faults:
    """TEST ONLY (`--test-corrupt-outputs`): what a faulty or malicious server returns, to test verification."""

    corrupt: float = 0.0  # noise added to every output, in units of the output's standard deviation

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        if not self.corrupt:
            return out
        return out + self.corrupt * out.float().std() * torch.randn_like(out)


@dataclass(frozen=True)
class ServingContext:
    """Everything the RPC classes of one server read; each part has one owner and is never replaced."""

    spans: SpanSlot
    memory: CacheMemory
    session_timeout: float  # seconds a session (or a request's parts) may stay silent
    scheduler: Scheduler = field(default_factory=Scheduler)
    tuning: TuningResolver = field(default_factory=TuningResolver)
    kept: KeptGraphs = field(default_factory=lambda: KeptGraphs(default("max_kept_graphs"), default("kept_graph_ttl")))
    audit: AuditLog = field(default_factory=lambda: AuditLog(None))
    membership: Membership = PUBLIC
    limits: PeerLimits = field(default_factory=PeerLimits)
    points: ServerPoints | None = None  # counts work per requester (contribution points); None: not counted
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    faults: Faults = field(default_factory=Faults)

    @property
    def device(self) -> torch.device:
        return self.spans.device

    def count(self, peer: str, span: Span, tokens: int, kind: Kind, seconds: float) -> None:
        """Record `tokens` run through `span` for `peer` in `seconds`: in the metrics, and as `peer`'s
        contribution points where this server counts them."""
        self.metrics.served(kind, tokens, seconds)
        if self.points is not None:
            self.points.count(peer, span.end - span.start, tokens)

    def reply_error(self, e: Exception) -> runtime_pb2.ExpertResponse:
        """The typed `ErrorReply` for `e` (see `replies.error_reply`), counted by its code."""
        self.metrics.error(error_code(e))
        return error_reply(e)

    def reply_timeout(self, message: str) -> runtime_pb2.ExpertResponse:
        self.metrics.error(ErrorCode.SESSION_TIMEOUT)
        return wire.error_response(ErrorCode.SESSION_TIMEOUT, message)

    def audit_call(self, peer: str, rpc: str, span: tuple[int, int] | None, tokens: int, outcome, began: float) -> None:
        """The audit line of one stateless call (forward, backward); `span` None: the request did not parse."""
        start, end = span if span is not None else (-1, -1)
        self.audit.record(peer, rpc, start, end, tokens, str(outcome), began)
