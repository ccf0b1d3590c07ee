"""Attention of a batched pass, computed per session over that session's own cache, in place.

A batched pass stacks the sessions' new tokens row-wise for everything that shares weights (the projections
and the MLPs): that is what batching pays for. Attention shares no weights: each row's queries attend to
its own session's keys. Gathering every session's past into one padded tensor per block (what
`inference._BatchCache` does) copies the whole context of the batch at every step, outside the cache budget.
Here the pass instead runs the model's own `sdpa` attention once per session, over a view of that session's
pages in the server's pool: a step copies only its new keys and values (into the pool), whatever the context.
A session whose pages are not one run (the pool was short of consecutive room) attends over each run in place
and merges them in one softmax (`_over_runs`); that, too, copies nothing.

How it reaches the attention: a block calls `cache.update(key, value, layer)` and then the function that
`transformers.ALL_ATTENTION_FUNCTIONS` registers for its attention implementation. `install()` replaces the
registered "sdpa" function with `_attention`, which is transformers' own function unchanged unless the calling
thread is inside `RaggedPass.active()` (the server's compute thread, during one pass). There, `update` stores
each session's new keys and values and hands back what it was given; `_attention` checks that the block passed
exactly that on (a block that transforms its keys between the two, such as DeepSeek's latent attention, is
refused loudly, never computed wrong) and attends per session.

Only sdpa blocks whose attention takes the cache's keys as stored can run this way (`ragged_capable`); others
keep the padded gather.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from swarmllm.models.span import Span, attention_of
from swarmllm.server.cache import SessionKV

_local = threading.local()  # .plan: the RaggedPass this thread is running, if any
_sdpa: Callable | None = None  # transformers' own sdpa attention, once `install` has wrapped it
_install_lock = threading.Lock()


def ragged_capable(span: Span) -> bool:
    """Whether a batched pass of `span` may attend per session: its blocks use the registered sdpa function on
    the keys and values the cache hands back."""
    return attention_of(span.config) == "sdpa" and span.family.attention_reads_cache


def install() -> None:
    """Wrap transformers' registered sdpa attention (once per process; idempotent and thread-safe)."""
    global _sdpa
    with _install_lock:
        if _sdpa is None:
            _sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
            ALL_ATTENTION_FUNCTIONS["sdpa"] = _attention


@dataclass
class Rows:
    """One session's rows of a pass."""

    kv: SessionKV
    rows: slice
    past: int  # tokens before this step
    masks: dict[str, torch.Tensor | None]  # per layer type: its own mask alone, or None for plain sdpa


class RaggedPass:
    """The cache of one batched pass (`Span.forward(cache=...)`) that stores each session's new keys and values
    in its own `SessionKV` and lets `_attention` read them there."""

    def __init__(self, span: Span, parts: list[Rows], q: int):
        """`parts`: every session's rows, in row order; `q`: new tokens per row."""
        self.span, self.parts, self.q = span, parts, q
        self._layer: int | None = None
        self._handed: torch.Tensor | None = None  # the keys `update` last handed back
        # Where every new token goes in the pool, row by row (the order of `key`'s rows and tokens): one copy per
        # block stores the whole batch's new keys, instead of one per session. All of a pass's sessions are in
        # the server's one pool; `update` falls back to writing session by session if they were not.
        self._pool = parts[0].kv.pool if parts and all(p.kv.pool is parts[0].kv.pool for p in parts) else None
        slots: list[int] = []
        for part in parts if self._pool is not None else ():
            pieces = part.kv.segments(part.past, part.past + q)
            for row in range(part.rows.stop - part.rows.start):
                for a, b, starts in pieces:
                    slots.extend(range(starts[row], starts[row] + b - a))
        self._slots = torch.tensor(slots, dtype=torch.long, device=span.device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: (rows, kv_heads, q, head_dim) of every session, stacked
        if self._pool is not None:
            for store, new in self._pool.stores(layer_idx, key, value):  # (kv_heads, slots, width) each
                store.index_copy_(1, self._slots, new.transpose(0, 1).reshape(new.shape[1], -1, new.shape[3]))
        else:
            for part in self.parts:
                part.kv.write(layer_idx, key[part.rows], value[part.rows], part.past)
        self._layer, self._handed = layer_idx, key
        return key, value

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        install()
        _local.plan = self
        try:
            yield
        finally:
            _local.plan = None

    def attend(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs):
        """Each session's queries over its own keys and values, in place; (rows, q, heads, head_dim)."""
        if key is not self._handed or self._layer is None:
            raise RuntimeError(f"blocks of {self.span.config.model_type} changed their keys between the cache and "
                               "attention: they cannot attend per session (mark the family attention_reads_cache=False)")
        layer, n = self._layer, self.q
        layer_type = self.span.types[layer - self.span.start]
        outs = []
        for part in self.parts:
            length, mask = part.past + n, part.masks[layer_type]
            if part.kv.evenly(length):  # all rows in one strided view per piece
                outs.append(_attend(module, query[part.rows], part.kv.views(layer, length), mask, part.past, kwargs))
                continue
            for row in range(part.rows.stop - part.rows.start):  # beams that share pages: each row its own views
                at = part.rows.start + row
                outs.append(_attend(module, query[at : at + 1], part.kv.views(layer, length, row),
                                    None if mask is None else mask[row : row + 1], part.past, kwargs))
        return torch.cat(outs), None


def _attend(module, query: torch.Tensor, runs: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor | None,
            past: int, kwargs: dict) -> torch.Tensor:
    """Queries (rows, heads, q, width) over their keys and values held as `runs` of the pool: transformers' own
    sdpa over a single run, `_over_runs` over several. Returns (rows, q, heads, value width)."""
    if len(runs) == 1:
        assert _sdpa is not None  # installed before any pass
        out, _ = _sdpa(module, query, *runs[0], mask, **kwargs)
        return out
    allowed = mask if mask is not None else _causal(past, query.shape[2], query.device)
    return _over_runs(query, runs, allowed, **kwargs)


def _causal(past: int, q: int, device: torch.device) -> torch.Tensor:
    """(1, 1, q, past + q) True where a query may attend: what sdpa does without a mask."""
    return (torch.arange(past + q, device=device)[None, :] <= past + torch.arange(q, device=device)[:, None])[None, None]


# Arguments of transformers' attention functions that attention over runs cannot honour unless they are unset.
_UNSUPPORTED = ("softcap", "s_aux", "sinks")


def _over_runs(query: torch.Tensor, runs: list[tuple[torch.Tensor, torch.Tensor]], allowed: torch.Tensor,
               *, scaling: float | None = None, dropout: float = 0.0, **kwargs) -> torch.Tensor:
    """Attention of `query` (rows, heads, q, width) over keys and values held as several runs of the pool (a
    session whose pages are not consecutive), without copying them together: the scores of every run side by
    side, one softmax, then each run's share of the values. `allowed`: (rows or 1, 1, q, tokens) booleans.
    Returns (rows, q, heads, value width), as transformers' attention functions do."""
    unsupported = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if unsupported or dropout:
        raise RuntimeError(f"attention over a session's pages cannot apply {unsupported or 'dropout'}")
    rows, heads, q, width = query.shape
    kv_heads = runs[0][0].shape[1]
    groups = heads // kv_heads  # query heads per key head, as transformers' repeat_kv pairs them
    scale = scaling if scaling is not None else width**-0.5
    outs = []
    for r in range(rows):  # per row: a run's (kv_heads, tokens, width) view multiplies without a copy
        grouped = query[r].reshape(kv_heads, groups * q, width)
        scores = torch.cat([grouped @ k[r].transpose(-1, -2) for k, _ in runs], dim=-1).float() * scale
        scores = scores.view(kv_heads, groups, q, -1).masked_fill(~allowed[min(r, len(allowed) - 1)][:, None], float("-inf"))
        probs = scores.softmax(-1).to(query.dtype).view(kv_heads, groups * q, -1)
        out, at = None, 0
        for _, v in runs:
            part = probs[..., at : at + v.shape[2]] @ v[r]  # (kv_heads, groups * q, value width)
            out = part if out is None else out + part
            at += v.shape[2]
        assert out is not None
        outs.append(out.view(heads, q, -1).transpose(0, 1))  # (q, heads, value width)
    return torch.stack(outs)


def _attention(module, query, key, value, attention_mask, **kwargs):
    """The registered "sdpa": per session within a ragged pass on this thread, transformers' own otherwise."""
    plan = getattr(_local, "plan", None)
    assert _sdpa is not None
    if plan is None:
        return _sdpa(module, query, key, value, attention_mask, **kwargs)
    return plan.attend(module, query, key, value, **kwargs)
