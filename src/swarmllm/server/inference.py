"""Inference steps of many sessions in one forward pass.

Each session keeps its own keys/values (`cache.SessionKV`, pages of the server's pool) and its own position. A
batch stacks the sessions' new tokens row-wise. Attention then runs per session over that session's own pages,
in place (`ragged.RaggedPass`), for blocks that allow it (sdpa, keys used as cached). For the others (eager
attention, DeepSeek's latent attention) every attention layer gets, per row, that session's past keys followed
by the new ones, gathered and padded to the longest session, with a mask that hides the padding: a copy of the
batch's whole context per step. A lone session reads a view of its pages, as a local model reads its cache.
Either way a session's output does not depend on who it was batched with, beyond float rounding of a wider
matmul.

Why bother: on a CPU (and a GPU) a decode step is bound by reading the weights, so one pass for 8 sessions
costs little more than a pass for one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from swarmllm.models.family import SLIDING
from swarmllm.models.span import Span, attention_of
from swarmllm.server.cache import SessionKV, nbytes
from swarmllm.server.compute import BadRequest, Extras, TooLong, check_inputs, check_prompts
from swarmllm.server.ragged import RaggedPass, Rows, ragged_capable


class BatchKey(NamedTuple):
    """Steps with equal keys may share a forward pass."""

    start: int
    end: int
    q: int  # new tokens per row
    lora: int | None  # id of a named adapter's weights (one shared object), None for the base model
    scaling: float


@dataclass
class Session:
    """The state of one inference session on one server: its blocks, cache and tuning."""

    span: Span
    batch_size: int
    max_length: int
    kv: SessionKV
    extras: Extras

    @property
    def length(self) -> int:
        return self.kv.length

    def check(self, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
              past: int | None = None) -> None:
        """Validate a step before anything of it is done; the session is unchanged by this. `past`: the tokens
        the step follows (fewer than `length` after a rewind that goes with the step)."""
        past = self.length if past is None else past
        check_inputs(self.span, hidden, position_ids, mask, past=past)
        if hidden.shape[0] != self.batch_size:
            raise BadRequest(f"session was opened for batch {self.batch_size}, step has batch {hidden.shape[0]}")
        if past + hidden.shape[1] > self.max_length:
            raise TooLong(
                f"session declared max_length={self.max_length}; it holds {past} tokens and cannot take "
                f"{hidden.shape[1]} more"
            )
        check_prompts(self.span, hidden, self._prompts(past))

    def _prompts(self, past: int | None = None) -> torch.Tensor | None:
        # Deep prompts belong to the first positions of the sequence: only a step from position 0 adds them.
        return self.extras.prompts if (self.length if past is None else past) == 0 else None

    def batch_key(self, q: int) -> BatchKey | None:
        """The key of a step of `q` tokens; None means it runs alone."""
        if self._prompts() is not None:
            return None
        lora = id(self.extras.lora) if self.extras.lora else None
        return BatchKey(self.span.start, self.span.end, q, lora, self.extras.scaling)


@dataclass
class StepInput:
    session: Session
    hidden: torch.Tensor  # (batch, q, hidden)
    position_ids: torch.Tensor  # (batch, q)
    mask: torch.Tensor | None  # (batch, past + q); None = no padding
    # The longest position id of the client's whole step, when this is a chunk of it (longrope picks its
    # rotary table by it); None: this step's own.
    last_position: int | None = None

    @property
    def table(self) -> int:
        return self.last_position if self.last_position is not None else int(self.position_ids.max())

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]


class _BatchCache:
    """What the attention layers see as the cache during one batched pass that cannot attend per session:
    `update` stores the new keys and values in each session and returns, per row, [past, new, padding] up to
    `kv_len`."""

    def __init__(self, steps: list[StepInput], pasts: list[int], kv_len: int):
        self.steps, self.pasts, self.kv_len = steps, pasts, kv_len

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: (rows, kv_heads, q, head_dim)
        q = key.shape[2]
        if len(self.steps) == 1:  # alone: a view of the session's pages where they are one run
            kv, past = self.steps[0].session.kv, self.pasts[0]
            kv.write(layer_idx, key, value, past)
            return kv.read(layer_idx, past + q)
        out_k = key.new_zeros((key.shape[0], key.shape[1], self.kv_len, key.shape[3]))
        out_v = value.new_zeros((value.shape[0], value.shape[1], self.kv_len, value.shape[3]))
        row = 0
        for step, past in zip(self.steps, self.pasts):
            kv, rows = step.session.kv, slice(row, row + step.rows)
            kv.write(layer_idx, key[rows], value[rows], past)
            out_k[rows, :, : past + q], out_v[rows, :, : past + q] = kv.read(layer_idx, past + q)
            kv.copied += nbytes(out_k[rows, :, : past + q]) + nbytes(out_v[rows, :, : past + q])
            row += step.rows
        return out_k, out_v


def _masks(span: Span, steps: list[StepInput], pasts: list[int], q: int, kv_len: int) -> dict[str, torch.Tensor | None]:
    """Per layer type, a (rows, 1, q, kv_len) mask in the form the span's attention takes, or None where sdpa's
    plain causal attention over all keys is exact (one session, no padding): that keeps a lone session on the
    same kernel path as a local transformers model.

    sdpa takes a boolean mask (True = attend). Eager attention adds its mask to the scores, as transformers'
    eager masks do: 0 where allowed, the dtype's most negative value elsewhere (a boolean mask would add 1 and
    0, attending everywhere), and it has no implicit causal mask, so it always gets one."""
    eager = attention_of(span.config) == "eager"
    masks: dict[str, torch.Tensor | None] = {}
    device = steps[0].hidden.device
    j = torch.arange(q, device=device)[:, None]  # (q, 1) query offset within the step
    k = torch.arange(kv_len, device=device)[None, :]  # (1, kv_len) key position
    diagonal = torch.arange(q, device=device)
    for lt in set(span.types):
        window = getattr(span.config, "sliding_window", None) if lt == SLIDING else None
        simple = len(steps) == 1 and steps[0].mask is None and (q == 1 or pasts[0] == 0)
        if simple and (window is None or kv_len <= window) and not eager:
            masks[lt] = None
            continue
        rows = []
        for step, past in zip(steps, pasts):
            allowed = k <= past + j  # (q, kv_len): causal, and never a later session's padding
            if window is not None:
                allowed = allowed & (past + j - k < window)
            allowed = allowed.expand(step.rows, q, kv_len).clone()
            if step.mask is not None:
                padding = torch.zeros(step.rows, kv_len, dtype=torch.bool, device=device)
                padding[:, : past + q] = step.mask.bool()
                allowed &= padding[:, None, :]
                # A padding query whose keys are all padding would attend to nothing (NaN in sdpa); let it see
                # itself. Real positions never attend to padding, so their outputs are unaffected.
                lost = ~allowed.any(-1)  # (rows, q)
                diag = allowed[:, diagonal, past + diagonal]
                allowed[:, diagonal, past + diagonal] = diag | lost
            rows.append(allowed)
        allowed = torch.cat(rows)[:, None]
        masks[lt] = _additive(allowed, span.dtype) if eager else allowed
    return masks


def _rows(span: Span, steps: list[StepInput], pasts: list[int], q: int) -> list[Rows]:
    """Each session's rows of the pass, with the masks it would get alone (None where plain sdpa is exact)."""
    parts, row = [], 0
    for step, past in zip(steps, pasts):
        parts.append(Rows(step.session.kv, slice(row, row + step.rows), past, _masks(span, [step], [past], q, past + q)))
        row += step.rows
    return parts


def _keys(steps: list[StepInput], pasts: list[int], q: int, kv_len: int) -> torch.Tensor:
    """(rows, kv_len) 1 where a row has a real key: each session's own 2D mask (all ones without padding), then
    zeros up to the longest session. ALiBi counts a key's position along it, as the full model does."""
    rows = []
    for step, past in zip(steps, pasts):
        keys = torch.zeros(step.rows, kv_len, dtype=torch.long, device=step.hidden.device)
        keys[:, : past + q] = 1 if step.mask is None else step.mask
        rows.append(keys)
    return torch.cat(rows)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as eager attention adds it to the scores: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


@torch.inference_mode()
def run_batch(steps: list[StepInput]) -> list[torch.Tensor]:
    """One forward pass for steps of equal `batch_key`; returns each step's output, in its input dtype.

    Each session's length advances only if the whole pass succeeds (a failed pass leaves garbage beyond
    `length`, which the next step overwrites)."""
    for s in steps:
        s.session.kv.copy_pages()  # pages that beams shared and a row is about to write (`SessionKV.prepare`)
    session0 = steps[0].session
    span, q = session0.span, steps[0].hidden.shape[1]
    dtype = span.dtype
    pasts = [s.session.length for s in steps]
    kv_len = max(pasts) + q
    hidden = torch.cat([s.hidden.to(dtype) for s in steps])  # (rows, q, hidden)
    position_ids = torch.cat([s.position_ids for s in steps])  # (rows, q)
    prompts = session0._prompts() if len(steps) == 1 else None
    keys = _keys(steps, pasts, q, kv_len) if span.family.positions == "alibi" else None
    tables = torch.cat([torch.full((s.rows,), s.table, device=position_ids.device) for s in steps])
    cache: RaggedPass | _BatchCache
    attending: contextlib.AbstractContextManager[None]
    # A lone session whose pages are several runs attends per run too, rather than copy them together.
    if ragged_capable(span) and (len(steps) > 1 or not session0.kv.in_place(pasts[0] + q)):
        cache = RaggedPass(span, _rows(span, steps, pasts, q), q)
        masks: dict[str, torch.Tensor | None] = dict.fromkeys(span.types)  # each session's own are in `cache`
        attending = cache.active()
    else:
        cache, masks = _BatchCache(steps, pasts, kv_len), _masks(span, steps, pasts, q, kv_len)
        attending = contextlib.nullcontext()
    with session0.extras.applied(span), attending:
        out = span(hidden, position_ids, cache=cache, prompts=prompts, masks=masks, keys=keys, tables=tables)
    results, row = [], 0
    for s in steps:
        results.append(out[row : row + s.rows].to(s.hidden.dtype))
        row += s.rows
        s.session.kv.commit(q)
    return results
