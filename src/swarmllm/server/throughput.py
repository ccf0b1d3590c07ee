"""A server measures its own speed on its own blocks and announces it; the measurement is cached on disk.

No external speed test: clients route by these numbers (inference step time) and spread training batches
by them (forward throughput). Both are per block, so servers of different span lengths compare directly.

Measuring costs seconds for a small model but minutes for a span of a 70B model on a CPU, so the result is
kept in a JSON file keyed by everything that changes it (model, blocks, device and its name, dtype, quant,
threads, torch version): a restart with the same key announces at once.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from swarmllm.models.device import dtype_name
from swarmllm.models.span import Span

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Throughput:
    step_time: float  # seconds per block for one inference step (batch 1, one new token, short cache)
    forward_tps: float  # tokens per second per block, forward of a (1, batch_tokens) batch


@torch.inference_mode()
def measure(span: Span, repeats: int = 3, context: int = 32, batch_tokens: int = 128) -> Throughput:
    """Median of `repeats` timings after one warm-up, on the span's own device and dtype."""
    dtype, device = span.dtype, span.device
    hidden_size, blocks = span.config.hidden_size, len(span.layers)
    prefix = torch.randn(1, context, hidden_size, dtype=dtype, device=device)
    step_input = torch.randn(1, 1, hidden_size, dtype=dtype, device=device)
    batch = torch.randn(1, batch_tokens, hidden_size, dtype=dtype, device=device)

    def timed(fn) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)  # GPU kernels run asynchronously: time them to completion
        return time.perf_counter() - t0

    def one_step() -> float:
        cache = span.new_cache()
        span(prefix, torch.arange(context, device=device)[None], None, cache)
        return timed(lambda: span(step_input, torch.tensor([[context]], device=device), None, cache))

    def one_forward() -> float:
        return timed(lambda: span(batch, torch.arange(batch_tokens, device=device)[None], None))

    one_step(), one_forward()  # warm-up: allocator, kernels
    step = sorted(one_step() for _ in range(repeats))[repeats // 2]
    fwd = sorted(one_forward() for _ in range(repeats))[repeats // 2]
    # Per block: a span of k blocks takes k times as long as one block.
    return Throughput(step_time=step / blocks, forward_tps=batch_tokens * blocks / fwd)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measurement_key(model: str, span: Span, quant: str) -> str:
    """What a measurement depends on, as one string: a change of any part measures again."""
    device = span.device
    if device.type == "cuda":
        where = f"cuda:{torch.cuda.get_device_name(device)}"
    else:
        where = f"{device.type}:{_cpu_name()}:{torch.get_num_threads()}threads"
    return f"{model}|{span.start}:{span.end}|{where}|{dtype_name(span.dtype)}|{quant}|torch {torch.__version__}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class ThroughputCache:
    """Measurements by key in one JSON file. A corrupt or unreadable file is treated as empty (and
    rewritten): the cost of losing it is one measurement."""

    def __init__(self, path: Path):
        self.path = path

    def get(self, key: str) -> Throughput | None:
        entry = self._read().get(key)
        try:
            return Throughput(**entry) if entry is not None else None
        except TypeError:
            return None

    def put(self, key: str, value: Throughput) -> None:
        entries = self._read()
        entries[key] = asdict(value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, self.path)  # atomic: concurrent servers on one host never read half a file

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def cached_measure(span: Span, key: str, cache: ThroughputCache | None, remeasure: bool, run=None) -> Throughput:
    """The cached measurement for `key`, or a new one (stored) if there is none or `remeasure`. `run(fn, span)`
    runs the measurement where the server computes (its compute thread); default: here."""
    if cache is not None and not remeasure:
        found = cache.get(key)
        if found is not None:
            logger.info("speed for %s taken from %s (--remeasure to measure again)", key, cache.path)
            return found
    result = run(measure, span) if run is not None else measure(span)
    if cache is not None:
        try:
            cache.put(key, result)
        except OSError as e:
            logger.warning("could not cache the speed measurement in %s: %s", cache.path, e)
    return result
