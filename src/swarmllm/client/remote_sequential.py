"""Remote blocks that behave like a local `nn.Module`: slicing, forward, and autograd through servers."""

from __future__ import annotations

import asyncio
import logging

import torch
from torch import nn

from swarmllm import wire
from swarmllm.client import loop
from swarmllm.client.inference_session import InferenceSession
from swarmllm.client.routing import NoHolderError
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.protocol import RPC_BACKWARD, RPC_FORWARD, ErrorCode, SpanReply, SpanRequest

logger = logging.getLogger(__name__)

# Errors that say the request itself is wrong: retrying elsewhere would fail the same way.
_CALLER_ERRORS = (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LONG, ErrorCode.VERSION)


class RemoteSequential(nn.Module):
    """Blocks `[start, end)` of the model, computed by servers of the swarm.

    `forward` is stateless (no cache) and differentiable with respect to its input: gradients flow back
    through every server via the `backward` RPC. A server that fails a forward or backward call is banned
    and its blocks are rerouted, up to `max_retries` times.
    """

    def __init__(self, manager: SequenceManager, start: int = 0, end: int | None = None):
        super().__init__()
        self.manager = manager
        self.start = start
        self.end = manager.num_blocks if end is None else end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, item: slice | int) -> RemoteSequential:
        if isinstance(item, int):
            item = slice(item, item + 1) if item >= 0 else slice(len(self) + item, len(self) + item + 1)
        start, stop, step = item.indices(len(self))
        if step != 1 or stop <= start:
            raise IndexError("remote blocks can only be sliced into a non-empty contiguous range")
        return RemoteSequential(self.manager, self.start + start, self.start + stop)

    def forward(
        self,
        hidden: torch.Tensor,  # (batch, seq, hidden)
        position_ids: torch.Tensor,  # (batch, seq)
        attention_mask: torch.Tensor | None = None,  # (batch, seq)
    ) -> torch.Tensor:
        return _RemoteSpanFn.apply(hidden, position_ids, attention_mask, self)

    def inference_session(self, max_length: int, batch_size: int | None = None) -> InferenceSession:
        return InferenceSession(self.manager, self.start, self.end, max_length, batch_size)

    # --- plumbing used by the autograd function ---

    def call_span(self, verb: str, start: int, end: int, *tensors: torch.Tensor | None) -> torch.Tensor:
        """Run `verb` over blocks `[start, end)` on one server that holds them all, trying another such
        server after a failure. Raises NoHolderError once no unbanned server holds the whole range."""
        *args, mask = tensors
        meta = SpanRequest(start=start, end=end, has_mask=mask is not None)
        msg = wire.request(meta, *args, *([mask] if mask is not None else []))
        error: Exception | None = None
        for _ in range(self.manager.config.max_retries + 1):
            peer = self.manager.holder(start, end)
            try:
                reply = loop.run(
                    asyncio.wait_for(self.manager.call(peer, verb, msg), self.manager.config.request_timeout)
                )
                _, (out,) = wire.parse(reply, SpanReply, peer)
                return out
            except wire.RemoteError as e:
                if e.code in _CALLER_ERRORS:
                    raise
                error = e
            except Exception as e:  # timeouts, dropped connections, vanished peers
                error = e
            self.manager.ban(peer, repr(error))
        raise RuntimeError(f"{verb} of blocks {start}:{end} failed {self.manager.config.max_retries + 1} times") from error


def _forward_chain(remote: RemoteSequential, hidden, position_ids, mask) -> tuple[torch.Tensor, list]:
    """Forward through all hops; returns the output and each hop's (start, end, input) for backward."""
    pos, saved, replans = remote.start, [], 0
    while pos < remote.end:
        hop = remote.manager.make_route(pos, remote.end)[0]
        try:
            out = remote.call_span(RPC_FORWARD, hop.start, hop.end, hidden, position_ids, mask)
        except NoHolderError:
            # Every server of exactly this range failed and is banned now: plan again from here, around them.
            replans += 1
            if replans > remote.manager.config.max_retries:
                raise
            continue
        saved.append((hop.start, hop.end, hidden))
        hidden, pos = out, hop.end
    return hidden, saved


class _RemoteSpanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, position_ids, mask, remote: RemoteSequential):
        out, saved = _forward_chain(remote, hidden.detach(), position_ids, mask)
        ctx.remote, ctx.saved, ctx.position_ids, ctx.mask = remote, saved, position_ids, mask
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad = grad_out.contiguous()
        for start, end, hidden in reversed(ctx.saved):
            # Backward is stateless on the server (it recomputes the span), so any server holding all of
            # these blocks can answer it; call_span moves to another one after a failure.
            grad = ctx.remote.call_span(RPC_BACKWARD, start, end, hidden, ctx.position_ids, grad, ctx.mask)
        return grad, None, None, None
