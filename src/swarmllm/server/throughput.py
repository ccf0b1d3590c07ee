"""A server measures its own speed on its own blocks, once at start, and announces it.

No external speed test: clients route by these numbers (inference step time) and spread training batches
by them (forward throughput). Both are per block, so servers of different span lengths compare directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from swarmllm.models.span import Span


@dataclass(frozen=True)
class Throughput:
    step_time: float  # seconds per block for one inference step (batch 1, one new token, short cache)
    forward_tps: float  # tokens per second per block, forward of a (1, batch_tokens) batch


@torch.inference_mode()
def measure(span: Span, repeats: int = 3, context: int = 32, batch_tokens: int = 128) -> Throughput:
    """Median of `repeats` timings after one warm-up; costs well under a second for small spans."""
    dtype = span.dtype
    hidden_size, blocks = span.config.hidden_size, len(span.layers)
    prefix = torch.randn(1, context, hidden_size, dtype=dtype)

    def one_step() -> float:
        cache = span.new_cache()
        span(prefix, torch.arange(context)[None], None, cache)
        t0 = time.perf_counter()
        span(torch.randn(1, 1, hidden_size, dtype=dtype), torch.tensor([[context]]), None, cache)
        return time.perf_counter() - t0

    batch = torch.randn(1, batch_tokens, hidden_size, dtype=dtype)

    def one_forward() -> float:
        t0 = time.perf_counter()
        span(batch, torch.arange(batch_tokens)[None], None)
        return time.perf_counter() - t0

    one_step(), one_forward()  # warm-up: allocator, kernels
    step = sorted(one_step() for _ in range(repeats))[repeats // 2]
    fwd = sorted(one_forward() for _ in range(repeats))[repeats // 2]
    # Per block: a span of k blocks takes k times as long as one block.
    return Throughput(step_time=step / blocks, forward_tps=batch_tokens * blocks / fwd)
