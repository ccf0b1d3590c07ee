"""Pure compute of a server: validate inputs, then run forward or backward of a span (inference steps: `inference.py`).

Nothing here knows about the network. Every function checks shapes, dtypes and finiteness before any
model code runs, and raises `BadRequest` with a message meant for the caller.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

from swarmllm.adapters import lora
from swarmllm.models.span import Span

# Rotary angles are computed in float32, where integers are exact only below 2^24: positions beyond mean
# nothing any model was trained on, and a forged huge one must not overflow the arithmetic on them.
MAX_POSITION = 2**24


class BadRequest(ValueError):
    pass


class TooLong(ValueError):
    pass


class NotServing(BadRequest):
    """The blocks asked for are not (or no longer) this server's: the client's view is stale."""


def sub_span(span: Span | None, start: int, end: int) -> Span:
    """The blocks `[start, end)` of a server's span, sharing its weights; None is a server between spans."""
    if span is None:
        raise NotServing("this server is moving to other blocks")
    if not (span.start <= start < end <= span.end):
        if start < end:
            raise NotServing(f"blocks {start}:{end} are not within this server's span {span.start}:{span.end}")
        raise BadRequest(f"invalid block range {start}:{end}")
    if (start, end) == (span.start, span.end):
        return span
    layers = list(span.layers[start - span.start : end - span.start])
    return Span(span.config, start, end, layers, span.rotary)


def check_inputs(
    span: Span, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None, past: int = 0
) -> None:
    """Validate a (hidden, position_ids, mask) triple for a span whose cache already holds `past` tokens."""
    if hidden.ndim != 3 or hidden.shape[-1] != span.config.hidden_size or 0 in hidden.shape:
        raise BadRequest(f"hidden states must be (batch>0, seq>0, {span.config.hidden_size}), got {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise BadRequest(f"hidden states must be floating point, got {hidden.dtype}")
    if not torch.isfinite(hidden).all():
        raise BadRequest("hidden states contain NaN or infinity")
    if position_ids.shape != hidden.shape[:2] or position_ids.dtype != torch.int64:
        raise BadRequest(f"position_ids must be int64 {tuple(hidden.shape[:2])}, got {position_ids.dtype} {tuple(position_ids.shape)}")
    if position_ids.min() < 0 or position_ids.max() >= MAX_POSITION:
        raise BadRequest(f"position_ids must be in [0, {MAX_POSITION}), got {position_ids.min()}..{position_ids.max()}")
    if mask is not None:
        if mask.shape != (hidden.shape[0], past + hidden.shape[1]):
            raise BadRequest(f"attention_mask must be (batch, past + seq) = {(hidden.shape[0], past + hidden.shape[1])}, got {tuple(mask.shape)}")
        # Any dtype will do (clients send int64 or bool), but only 1 = real token and 0 = padding mean anything.
        if not ((mask == 0) | (mask == 1)).all():
            raise BadRequest("attention_mask must hold only 0 (padding) and 1 (real token)")


@dataclass
class Extras:
    """What a request adds to the base span, resolved by the handler (see `protocol.Tuning`).

    `trainable` lists client-owned LoRA tensors in wire order: backward returns their gradients. A named
    adapter's weights are applied but are not trainable.
    """

    prompts: torch.Tensor | None = None  # (blocks, batch or 1, prefix, hidden)
    lora: lora.LoraWeights | None = None
    scaling: float = 1.0
    dropout: float = 0.0
    seed: int = 0
    trainable: list[torch.Tensor] = field(default_factory=list)

    def with_leaves(self) -> Extras:
        """A copy whose trainable tensors are fresh autograd leaves (sharing memory with the originals,
        which stay untouched: they may be cached and shared by other requests)."""
        leaves = [t.detach().requires_grad_(True) for t in self.trainable]
        swap = {id(t): leaf for t, leaf in zip(self.trainable, leaves)}
        weights = self.lora
        if weights and swap:
            weights = {b: {p: (swap.get(id(a), a), swap.get(id(bb), bb)) for p, (a, bb) in m.items()} for b, m in weights.items()}
        return dataclasses.replace(self, lora=weights, trainable=leaves)

    def applied(self, span: Span):
        if not self.lora:
            return contextlib.nullcontext()
        return lora.applied(span.layers, span.start, self.lora, self.scaling, self.dropout, self.seed)


NO_EXTRAS = Extras()


def check_prompts(span: Span, hidden: torch.Tensor, prompts: torch.Tensor | None) -> None:
    check_prompt_shape(span, hidden.shape[0], hidden.shape[1], prompts)


def check_prompt_shape(span: Span, batch: int, seq: int, prompts: torch.Tensor | None) -> None:
    """Deep prompts for `batch` rows of at most `seq` tokens (`seq` = a session's max_length at its open)."""
    if prompts is None:
        return
    n_blocks, width = len(span.layers), span.config.hidden_size
    if (prompts.ndim != 4 or prompts.shape[0] != n_blocks or prompts.shape[1] not in (1, batch)
            or not 0 < prompts.shape[2] <= seq or prompts.shape[3] != width):
        raise BadRequest(
            f"deep prompts must be ({n_blocks}, 1 or {batch}, prefix <= {seq}, {width}), got {tuple(prompts.shape)}"
        )
    if not prompts.is_floating_point() or not torch.isfinite(prompts).all():
        raise BadRequest("deep prompts must be finite floating point")


def check_hypo_ids(hypo_ids: torch.Tensor, batch: int) -> None:
    """Beam search's row order for a session of `batch` rows: (batch,) integers, each a row of the session."""
    if hypo_ids.shape != (batch,) or hypo_ids.dtype != torch.int64 or not bool(((hypo_ids >= 0) & (hypo_ids < batch)).all()):
        raise BadRequest(f"hypo_ids must be ({batch},) int64 row indices below {batch}, got {tuple(hypo_ids.shape)} "
                         f"{hypo_ids.dtype}")


def check_grad(grad_out: torch.Tensor, hidden: torch.Tensor) -> None:
    """The gradient a backward request sends: finite floating point, shaped like the span's input."""
    if grad_out.shape != hidden.shape or not grad_out.is_floating_point() or not torch.isfinite(grad_out).all():
        raise BadRequest(f"grad_output must be finite floating point and shaped like hidden {tuple(hidden.shape)}")


@torch.inference_mode()
def forward(
    span: Span, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None, extras: Extras = NO_EXTRAS
) -> torch.Tensor:
    check_inputs(span, hidden, position_ids, mask)
    check_prompts(span, hidden, extras.prompts)
    dtype = span.dtype
    with extras.applied(span):
        return span(hidden.to(dtype), position_ids, mask, prompts=extras.prompts).to(hidden.dtype)


@dataclass
class Graph:
    """A forward pass kept with its autograd graph, so that backward need not recompute it."""

    hidden: torch.Tensor  # the request's input, as sent
    wrt: list[torch.Tensor]  # input (in compute dtype), deep prompts, LoRA tensors: the leaves
    out: torch.Tensor


def forward_with_graph(
    span: Span, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None, extras: Extras = NO_EXTRAS
) -> tuple[torch.Tensor, Graph]:
    """Forward that keeps its graph for `backward_from_graph`."""
    check_inputs(span, hidden, position_ids, mask)
    check_prompts(span, hidden, extras.prompts)
    dtype = span.dtype
    extras = extras.with_leaves()
    with torch.enable_grad():
        x = hidden.detach().to(dtype).requires_grad_(True)
        prompts = extras.prompts.detach().requires_grad_(True) if extras.prompts is not None else None
        with extras.applied(span):
            out = span(x, position_ids, mask, prompts=prompts)
    wrt = [x] + ([prompts] if prompts is not None else []) + list(extras.trainable)
    return out.detach().to(hidden.dtype), Graph(hidden, wrt, out)


def backward_from_graph(graph: Graph, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Gradients wrt the graph's leaves (input, deep prompts, LoRA tensors), in that order."""
    check_grad(grad_out, graph.hidden)
    with torch.enable_grad():
        grads = torch.autograd.grad(graph.out, graph.wrt, grad_out.to(graph.out.dtype), allow_unused=True)
    return [
        (g if g is not None else torch.zeros_like(w)).to(w.dtype if i else graph.hidden.dtype)
        for i, (g, w) in enumerate(zip(grads, graph.wrt))
    ]


def backward(
    span: Span, hidden: torch.Tensor, position_ids: torch.Tensor, grad_out: torch.Tensor, mask: torch.Tensor | None,
    extras: Extras = NO_EXTRAS,
) -> list[torch.Tensor]:
    """Gradients of the span's output wrt its input, the deep prompts (if any) and the client's LoRA tensors
    (if any), in that order, by recomputing the forward pass. Base weights are frozen and never receive
    gradients."""
    check_grad(grad_out, hidden)
    _, graph = forward_with_graph(span, hidden, position_ids, mask, extras)
    return backward_from_graph(graph, grad_out)
