"""The chain of blocks a client runs: remote spans, with any blocks the client runs itself in between.

With `trainable_blocks=[i, ...]` those blocks are loaded on the client as ordinary trainable modules; with
`local_blocks=K` the first (and optionally last) K blocks run on the client, frozen, so that no server sees
token embeddings or final hidden states. The rest stay remote. The pipeline runs the segments in order,
for stateless forward (training) and for inference sessions (local blocks keep their own attention cache
on the client).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from swarmllm.client.positions import default_positions
from swarmllm.client.remote_sequential import RemoteSequential
from swarmllm.client.session_base import SessionBase
from swarmllm.client.tuning import ClientTuning
from swarmllm.models.span import Span


class LocalBlocks(nn.Module):
    """Blocks `[start, end)` run on the client (trainable or not: see each layer's requires_grad)."""

    tuning: ClientTuning | None  # declared for type checkers: kept outside nn.Module's registry

    def __init__(self, span: Span, tuning: ClientTuning | None):
        super().__init__()
        self.span, self.start, self.end = span, span.start, span.end
        self.__dict__["tuning"] = tuning  # owned and registered by the model

    def _prompts(self) -> torch.Tensor | None:
        t = self.tuning
        return t.deep_prompts[self.start : self.end] if t is not None and t.deep_prompts is not None else None

    def forward(self, hidden, position_ids, attention_mask=None):
        return self.span(hidden, position_ids, attention_mask, prompts=self._prompts())


class _LocalSession:
    def __init__(self, blocks: LocalBlocks):
        self.blocks, self.cache, self.length = blocks, blocks.span.new_cache(), 0

    def step(self, hidden, position_ids, mask):
        prompts = self.blocks._prompts() if self.length == 0 else None
        out = self.blocks.span(hidden, position_ids, mask, self.cache, prompts=prompts)
        self.length += hidden.shape[1]
        return out

    def rewind(self, n: int) -> None:
        if n < self.length:  # crop counts the tokens to remove (a positive count meant a size before 5.25)
            self.cache.crop(n - self.length)
            self.length = n

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        self.cache.reorder_cache(hypo_ids.to(self.blocks.span.device))  # type: ignore[arg-type]  # any int64 tensor

    def close(self) -> None:
        self.cache = self.blocks.span.new_cache()  # drop the keys and values now, not when the session is collected


class Pipeline(nn.Module):
    """Segments covering all blocks in order; slicing-free, since segments are fixed at load time."""

    def __init__(self, segments: list[nn.Module]):
        super().__init__()
        self.segments = nn.ModuleList(segments)

    def forward(self, hidden, position_ids, attention_mask=None):
        for seg in self.segments:
            hidden = seg(hidden, position_ids, attention_mask)
        return hidden

    def inference_session(self, max_length: int, batch_size: int | None = None) -> PipelineSession:
        return PipelineSession(self, max_length, batch_size)


class PipelineSession(SessionBase):
    """An inference session over a pipeline: remote sessions for remote segments, local caches otherwise.
    A `GenerationSession` (session_base.py), as `InferenceSession` is."""

    def __init__(self, pipeline: Pipeline, max_length: int, batch_size: int | None):
        super().__init__(max_length)
        self.parts = [
            seg.inference_session(max_length, batch_size) if isinstance(seg, RemoteSequential)
            else _LocalSession(cast(LocalBlocks, seg)) for seg in pipeline.segments
        ]

    def step(self, hidden, position_ids=None, attention_mask=None):
        if hidden.shape[1] == 0:
            return hidden
        if position_ids is None:
            position_ids = default_positions(hidden, self.position, attention_mask)
        for part in self.parts:
            hidden = part.step(hidden, position_ids, attention_mask)
        self._advance(hidden.shape[1])
        return hidden

    def _rewind_parts(self, n: int) -> None:
        for part in self.parts:
            part.rewind(n)

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        for part in self.parts:
            part.reorder(hypo_ids)

    def close(self) -> None:
        for part in self.parts:
            part.close()


def split_segments(num_blocks: int, local: set[int]) -> list[tuple[int, int, bool]]:
    """[(start, end, is_local)] runs of consecutive blocks, e.g. 6 blocks with {2, 3} local ->
    [(0, 2, False), (2, 4, True), (4, 6, False)]."""
    out: list[tuple[int, int, bool]] = []
    for b in range(num_blocks):
        is_local = b in local
        if out and out[-1][2] == is_local:
            out[-1] = (out[-1][0], b + 1, is_local)
        else:
            out.append((b, b + 1, is_local))
    return out

