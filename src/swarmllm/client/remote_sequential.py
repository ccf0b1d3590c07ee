"""Remote blocks that behave like a local `nn.Module`: slicing, forward, and autograd through servers."""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
import uuid
from collections.abc import Sequence

import torch
from torch import nn

from swarmllm import wire
from swarmllm.client import loop
from swarmllm.client.inference_session import InferenceSession
from swarmllm.client.positions import default_positions
from swarmllm.client.routing import NoHolderError
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.client.tuning import ClientTuning
from swarmllm.client.verification import relative_error, verdict
from swarmllm.protocol import RPC_BACKWARD, RPC_FORWARD, ErrorCode, SpanReply, SpanRequest, Tuning
from swarmllm.wire import Blame, blame

logger = logging.getLogger(__name__)


class RemoteSequential(nn.Module):
    """Blocks `[start, end)` of the model, computed by servers of the swarm.

    `forward` is stateless (no cache) and differentiable with respect to its input and to the client's
    tuning parameters (deep prompts, LoRA weights): gradients flow back through every server via the
    `backward` RPC. A server that fails a call is banned and its blocks are rerouted, up to `max_retries`
    times. If the server that ran a forward is gone by the backward, the backward recomputes that span's
    forward on other servers first, so the step still succeeds with the same gradients.
    """

    tuning: ClientTuning | None  # declared for type checkers: kept outside nn.Module's registry (see below)

    def __init__(self, manager: SequenceManager, start: int = 0, end: int | None = None, tuning: ClientTuning | None = None):
        super().__init__()
        self.manager = manager
        self.start = start
        self.end = manager.num_blocks if end is None else end
        # Not a submodule: the model owns (and registers) the tuning parameters once.
        self.__dict__["tuning"] = tuning

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, item: slice | int) -> RemoteSequential:
        if isinstance(item, int):
            item = slice(item, item + 1) if item >= 0 else slice(len(self) + item, len(self) + item + 1)
        start, stop, step = item.indices(len(self))
        if step != 1 or stop <= start:
            raise IndexError("remote blocks can only be sliced into a non-empty contiguous range")
        return RemoteSequential(self.manager, self.start + start, self.start + stop, self.tuning)

    def forward(
        self,
        hidden: torch.Tensor,  # (batch, seq, hidden)
        position_ids: torch.Tensor | None = None,  # (batch, seq); None: 0, 1, ... (counting real tokens)
        attention_mask: torch.Tensor | None = None,  # (batch, seq)
        prompts: torch.Tensor | None = None,  # (blocks, batch or 1, prefix, hidden), as Petals takes deep prompts
    ) -> torch.Tensor:
        """The blocks' output; differentiable with respect to `hidden`, `prompts` and the model's tuning."""
        if position_ids is None:  # as nn.Sequential and Petals take blocks: the input alone
            position_ids = default_positions(hidden, 0, attention_mask)
        t = self.tuning
        tuned = t.deep_prompts[self.start : self.end] if t is not None and t.deep_prompts is not None else None
        if prompts is not None:
            if tuned is not None:
                raise ValueError("prompts were passed to a model that sends its own trained deep prompts: pass one")
            if prompts.ndim != 4 or prompts.shape[0] != len(self):
                raise ValueError(f"prompts must be ({len(self)} blocks, 1 or batch, prefix, hidden), "
                                 f"got {tuple(prompts.shape)}")
        else:
            prompts = tuned
        lora_tensors = t.lora_tensors(self.start, self.end) if t is not None else []
        return _RemoteSpanFn.apply(hidden, position_ids, attention_mask, self, prompts, *lora_tensors)

    def inference_session(self, max_length: int, batch_size: int | None = None) -> InferenceSession:
        tuned = self.tuning is not None and self.tuning.deep_prompts is not None
        return InferenceSession(self.manager, self.start, self.end, max_length, batch_size,
                                extras=self._session_extras, tuned_prompts=tuned)

    async def _session_extras(self, hop) -> tuple[Tuning, list[torch.Tensor]]:
        """What an inference session sends when it opens on `hop`: tuning record and deep prompts."""
        t = self.tuning
        prompts = t.deep_prompts[hop.start : hop.end].detach() if t is not None and t.deep_prompts is not None else None
        lora_tensors = [x.detach() for x in t.lora_tensors(hop.start, hop.end)] if t is not None else []
        tuning, ref = self._tuning(hop.start, hop.end, prompts, lora_tensors)
        if ref is not None:
            await self._uploads().ensure_uploaded(self.manager, hop.peer_id, ref, hop.start, hop.end, lora_tensors)
        return tuning, [prompts] if prompts is not None else []

    def _tuning(self, start, end, prompts, lora_tensors):
        override = self.manager.override_for(start, end)
        if self.tuning is None:
            return Tuning(adapter=self.manager.config.adapter, override=override), None
        return self.tuning.request(start, end, prompts, lora_tensors, override)

    # --- plumbing used by the autograd function ---

    @property
    def _rng(self) -> random.Random:
        return self.manager.verify_rng

    def _uploads(self) -> ClientTuning:
        """The tuning whose weights a call refers to by hash: a call has a `ref` only when there is one."""
        assert self.tuning is not None
        return self.tuning

    def _call_once(self, peer: str, verb: str, msg, start: int, end: int, ref, lora_tensors,
                   tokens: int) -> list[torch.Tensor]:
        if ref is not None:
            loop.run(self._uploads().ensure_uploaded(self.manager, peer, ref, start, end, lora_tensors))
        self.manager.points.count(peer, end - start, tokens)
        reply = loop.run(asyncio.wait_for(self.manager.call_split(peer, verb, msg), self.manager.config.request_timeout))
        return wire.parse(reply, SpanReply, peer)[1]

    def _verified(self, peer: str, out: list[torch.Tensor], verb: str, msg, start: int, end: int, ref,
                  lora_tensors, tokens: int) -> list[torch.Tensor]:
        """Check a stateless call on a second holder of the blocks; a third settles a mismatch (see
        client/verification.py). Returns the output the majority vouches for."""
        manager, tolerance = self.manager, self.manager.config.verify_tolerance
        checkers = iter(manager.checkers(peer, start, end))
        answer = self._answer_from(checkers, verb, msg, start, end, ref, lora_tensors, tokens)
        if answer is None:
            logger.warning("no other server could check blocks %d:%d: this %s is not verified", start, end, verb)
            return out
        second_peer, second = answer
        error = relative_error(_flat(out), _flat(second))
        if error <= tolerance:
            return out
        third = self._answer_from(checkers, verb, msg, start, end, ref, lora_tensors, tokens)
        wrong = verdict(_flat(out), _flat(second), None if third is None else _flat(third[1]), tolerance,
                        f"{verb} of blocks {start}:{end}")
        manager.report(peer if wrong == "primary" else second_peer, start, end, error, tolerance)
        return second if wrong == "primary" else out

    def _answer_from(self, peers, verb: str, msg, start: int, end: int, ref, lora_tensors,
                     tokens: int) -> tuple[str, list[torch.Tensor]] | None:
        """The first of `peers` (an iterator, consumed as far as needed) that answers the call, with its answer.
        One that fails is avoided for a while, as a failed primary is: a checker that cannot be reached must
        not leave the call unchecked while another holder could check it."""
        for other in peers:
            for _ in range(2):  # a second try only after an evicted LoRA upload, which is sent again
                try:
                    return other, self._call_once(other, verb, msg, start, end, ref, lora_tensors, tokens)
                except Exception as e:
                    match blame(e):
                        case Blame.CALLER:  # the request, not the checker: every holder would refuse it
                            raise
                        case Blame.EXPIRED:  # the LoRA upload was evicted: send it again
                            self._uploads().forget(other, ref.sha256)
                            continue
                    if not _rate_limited(e):  # one that limits us is healthy: just ask the next one
                        self.manager.ban(other, repr(e))
                break
        return None

    def call_span(self, verb: str, start: int, end: int, tensors: list[torch.Tensor], mask: torch.Tensor | None,
                  prompts: torch.Tensor | None = None, lora_tensors: Sequence[torch.Tensor] = (),
                  keep: str | None = None) -> list[torch.Tensor]:
        """Run `verb` over blocks `[start, end)` on one server that holds them all, trying another such
        server after a failure. Raises NoHolderError once no unbanned server holds the whole range.

        `prompts` (blocks, 1, prefix, hidden) and `lora_tensors` (wire order) are those of these blocks.
        `keep` pairs a forward with its backward, so the server can reuse the forward's activations.
        """
        tuning, ref = self._tuning(start, end, prompts, lora_tensors)
        meta = SpanRequest(start=start, end=end, has_mask=mask is not None, tuning=tuning, keep=keep,
                           compression=self.manager.config.compression)
        extra = [t for t in (mask, prompts) if t is not None]
        msg = wire.request(meta, *tensors, *extra, compression=meta.compression)
        error: Exception | None = None
        tokens = tensors[0].shape[0] * tensors[0].shape[1]  # hidden: (batch, seq, hidden)
        limiting: frozenset[str] = frozenset()  # holders that refused this call by a per-peer limit
        for _ in range(self.manager.config.max_retries + 1):
            peer = self.manager.holder(start, end, prefer_not=limiting)
            if peer in limiting:  # every holder limits us: give its bucket a moment to refill
                time.sleep(0.2)
            try:
                out = self._call_once(peer, verb, msg, start, end, ref, lora_tensors, tokens)
            except Exception as e:
                error = e
                match blame(e):
                    case Blame.CALLER:
                        raise
                    case Blame.EXPIRED:  # the LoRA upload was evicted: send the weights again
                        self._uploads().forget(peer, ref.sha256)
                        continue
                if _rate_limited(e):  # healthy but limiting us: no ban; the next try goes elsewhere if it can
                    limiting |= {peer}
                    continue
            else:
                if self.manager.config.verify > 0 and self._rng.random() < self.manager.config.verify:
                    # The checkers keep no graph: the backward pairs with the primary's forward.
                    plain = wire.request(meta.model_copy(update={"keep": None}), *tensors, *extra,
                                         compression=meta.compression)
                    out = self._verified(peer, out, verb, plain, start, end, ref, lora_tensors, tokens)
                return out
            self.manager.ban(peer, repr(error))
        raise RuntimeError(f"{verb} of blocks {start}:{end} failed {self.manager.config.max_retries + 1} times") from error


class _Args:
    """The tuning tensors of a RemoteSequential call, sliced per hop (blocks are absolute indices)."""

    def __init__(self, remote: RemoteSequential, prompts: torch.Tensor | None, lora_tensors: tuple, keep: bool = False):
        self.remote, self.prompts, self.lora, self.keep = remote, prompts, list(lora_tensors), keep
        self.per_block = remote.tuning.per_block() if remote.tuning is not None and self.lora else 0
        self.rows = slice(None)  # the batch rows these arguments are for (per-row prompts are cut to them)

    def for_rows(self, rows: slice) -> _Args:
        """These arguments for a chunk of the batch's rows."""
        if self.prompts is None or self.prompts.shape[1] == 1:
            return self
        part = copy.copy(self)
        part.prompts, part.rows = self.prompts[:, rows], rows
        return part

    def prompts_for(self, start: int, end: int) -> torch.Tensor | None:
        base = self.remote.start
        return None if self.prompts is None else self.prompts[start - base : end - base]

    def lora_for(self, start: int, end: int) -> list[torch.Tensor]:
        base, k = self.remote.start, self.per_block
        return self.lora[(start - base) * k : (end - base) * k]


def _forward_chain(remote: RemoteSequential, hidden, position_ids, mask, args: _Args, start: int, end: int):
    """Forward through blocks [start, end) hop by hop; returns the output and each hop's
    (start, end, input, keep id) for backward."""
    pos, saved, replans = start, [], 0
    while pos < end:
        hop = remote.manager.make_route(pos, end, purpose="forward")[0]
        keep = uuid.uuid4().hex if args.keep else None
        try:
            (out,) = remote.call_span(RPC_FORWARD, hop.start, hop.end, [hidden, position_ids], mask,
                                      args.prompts_for(hop.start, hop.end), args.lora_for(hop.start, hop.end), keep)
        except NoHolderError:
            # Every server of exactly this range failed and is banned now: plan again from here, around them.
            replans += 1
            if replans > remote.manager.config.max_retries:
                raise
            continue
        saved.append((hop.start, hop.end, hidden, keep))
        hidden, pos = out, hop.end
    return hidden, saved


def _backward_range(remote: RemoteSequential, start: int, end: int, hidden, grad, position_ids, mask, args: _Args,
                    grads: dict, keep: str | None = None) -> torch.Tensor:
    """Backward of blocks [start, end) given their input; tuning gradients are added into `grads`."""
    prompts, lora_tensors = args.prompts_for(start, end), args.lora_for(start, end)
    try:
        outs = remote.call_span(RPC_BACKWARD, start, end, [hidden, position_ids, grad], mask, prompts, lora_tensors, keep)
    except NoHolderError:
        # No live server holds this whole range any more (its server died after the forward): recompute the
        # range's forward on a new route to get each hop's input, then run backward hop by hop.
        logger.info("recomputing blocks %d:%d on a new route for backward", start, end)
        _, saved = _forward_chain(remote, hidden, position_ids, mask, args, start, end)
        for s, e, h, k in reversed(saved):
            grad = _backward_range(remote, s, e, h, grad, position_ids, mask, args, grads, k)
        return grad
    grad_in, *rest = outs
    if prompts is not None:
        grads[("prompts", start, end)], *rest = rest
    if lora_tensors:
        grads[("lora", start, end)] = rest
    return grad_in


class _RemoteSpanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, position_ids, mask, remote: RemoteSequential, prompts, *lora_tensors):
        # A backward will follow only if something needs a gradient: only then do servers keep activations.
        keep = any(ctx.needs_input_grad)
        args = _Args(remote, prompts.detach() if prompts is not None else None, tuple(t.detach() for t in lora_tensors), keep)
        if remote.tuning is not None and remote.tuning.lora_spec is not None:
            remote.tuning.next_step()
        outs, saved = [], []
        # Large batches go in chunks of rows, bounding the memory a server spends on one request.
        rows = max(1, remote.manager.config.max_chunk_tokens // max(1, hidden.shape[1]))
        for i in range(0, hidden.shape[0], rows):
            m = mask[i : i + rows] if mask is not None else None
            out, chain = _forward_chain(remote, hidden[i : i + rows].detach(), position_ids[i : i + rows], m,
                                        args.for_rows(slice(i, i + rows)), remote.start, remote.end)
            outs.append(out)
            saved.append((i, chain))
        ctx.remote, ctx.args, ctx.saved, ctx.position_ids, ctx.mask, ctx.rows = remote, args, saved, position_ids, mask, rows
        ctx.seed = remote.tuning.seed if remote.tuning is not None else 0
        # Replies arrive on the CPU; the caller's tensors may live on a GPU.
        return torch.cat(outs).to(hidden.device)

    @staticmethod
    def backward(ctx, grad_out):
        remote, args = ctx.remote, ctx.args
        if remote.tuning is not None:
            remote.tuning.seed = ctx.seed  # the same dropout masks as this forward pass
        grad_prompts = torch.zeros_like(args.prompts) if args.prompts is not None else None
        grad_lora = [torch.zeros_like(t) for t in args.lora]
        grad_in = []
        for i, chain in ctx.saved:
            grad = grad_out[i : i + ctx.rows].contiguous()
            pos = ctx.position_ids[i : i + ctx.rows]
            mask = ctx.mask[i : i + ctx.rows] if ctx.mask is not None else None
            grads: dict = {}
            part = args.for_rows(slice(i, i + ctx.rows))
            for start, end, hidden, keep in reversed(chain):
                grad = _backward_range(remote, start, end, hidden, grad, pos, mask, part, grads, keep)
            _accumulate(grads, remote, part, grad_prompts, grad_lora)
            grad_in.append(grad)
        return (torch.cat(grad_in).to(grad_out.device), None, None, None, grad_prompts, *grad_lora)


def _accumulate(grads: dict, remote: RemoteSequential, args: _Args, grad_prompts, grad_lora: list) -> None:
    base, k = remote.start, args.per_block
    for (kind, start, end), g in grads.items():
        if kind == "prompts":
            grad_prompts[start - base : end - base, args.rows] += g.to(grad_prompts.device)
        else:
            for j, gj in enumerate(g):
                grad_lora[(start - base) * k + j] += gj.to(grad_lora[(start - base) * k + j].device)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def _rate_limited(error: Exception) -> bool:
    """A stateless call refused by a per-peer limit. Other busy refusals (a device out of memory) mean that
    server has no room for calls this size now: it is avoided for a while, so the retry goes elsewhere."""
    return isinstance(error, wire.RemoteError) and error.code == ErrorCode.RATE_LIMITED
