"""A server loads only its own blocks, and holds them at their quantized size.

10 of SmolLM2's 30 blocks hold about a third of the block weights; quantized blocks add to a process's RSS
what their codes and scales weigh, not what the float checkpoint does. Memory is measured in fresh
processes (one forked child per configuration), so that nothing another test loaded or freed counts.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from swarmllm.models.shards import block_weight_bytes
from swarmllm.models.span import load_span

pytestmark = pytest.mark.real_model

# One fresh process imports torch and transformers once, then forks a child per configuration: each child
# starts from the same pages and measures only what its own load adds (8 fresh interpreters cost ~60 s of
# imports on 2 cores). The fork happens before any torch op, so no thread pool is copied half-alive.
_MEASURE = """
import json, os, resource, sys, torch
from pathlib import Path
from swarmllm.models.span import load_span
torch.set_num_threads(1)
def rss():  # current resident set, in bytes
    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
def peak():  # this process's highest resident set (ru_maxrss would include the parent's from before exec)
    return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM'))
def measure(start, end, quant):
    before = rss()
    span = load_span(Path(sys.argv[1]), start, end, quant=quant)
    for p in span.parameters(): p.sum()  # touch every page, mapped or not
    with torch.inference_mode():  # one small forward, as a server's first step: 4 rows take the decode kernels
        span(torch.zeros(1, 4, span.config.hidden_size), torch.arange(4)[None])
    return {"rss": rss(), "rss_delta": rss() - before, "peak": peak(), "params": span.weight_bytes()}
results = []
for start, end, quant in json.loads(sys.argv[2]):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, json.dumps(measure(start, end, quant)).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        results.append(json.loads(f.read()))
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
print(json.dumps(results))
"""

# Every configuration either test measures: (start, end, quantization).
_QUANTS = ("none", "int8", "int4")
_CONFIGS = [(10, 20, "none"), (0, 30, "none"), *((0, end, quant) for quant in _QUANTS for end in (1, 10))]


@pytest.fixture(scope="module")
def measured(smollm2_dir) -> dict[tuple[int, int, str], dict]:
    """(start, end, quant) -> what loading that span added, each measured in its own forked child of one fresh
    process."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(smollm2_dir), json.dumps(_CONFIGS)],
                         capture_output=True, text=True, timeout=600, check=True)
    return dict(zip(_CONFIGS, json.loads(out.stdout.strip().splitlines()[-1]), strict=True))


def test_span_holds_a_third_of_the_block_weights(smollm2_dir) -> None:
    sizes = block_weight_bytes(smollm2_dir)
    assert sorted(sizes) == list(range(30))
    total = sum(sizes.values())
    span = load_span(smollm2_dir, 10, 20)
    assert span.weight_bytes() == sum(sizes[i] for i in range(10, 20))
    assert 0.30 < span.weight_bytes() / total < 0.37


def test_loading_a_span_never_materializes_the_whole_model(smollm2_dir, measured) -> None:
    """Measured in fresh children: a third of the blocks costs a third of the blocks' memory.

    Both children pay the same fixed cost of loading (a meta skeleton, the rotary tables, torch's first
    forward), so the difference between them is what the 20 blocks not loaded would have cost. That cost
    is not compared with the weights: it was 82 MiB in one run and 160 MiB in another, on the same machine.
    """
    sizes = block_weight_bytes(smollm2_dir)
    total, not_loaded = sum(sizes.values()), sum(sizes[i] for i in (*range(10), *range(20, 30)))
    third, whole = measured[10, 20, "none"], measured[0, 30, "none"]
    saved = whole["rss_delta"] - third["rss_delta"]
    assert abs(saved - not_loaded) < 0.1 * total, (third, whole, not_loaded)


# Measured on SmolLM2 (AMD EPYC, torch 2.13): 9 more blocks added 121.6 MiB in float32 (their weights: 121.5),
# 31.2 MiB in int8 (0.26x) and 20.0 MiB in int4 (0.16x). Before blocks were quantized as they load, and the
# checkpoint's file mapping and glibc's freed heap were let go, 9 more int8 blocks added 297 MiB (2.4x).
MAX_ADDED_RATIO = {"int8": 0.35, "int4": 0.25}


def test_memory_follows_the_quantized_size(measured, record_property) -> None:
    """What 9 more blocks add to a process's RSS: a fraction of float32's, close to the codes' own size.

    Each configuration runs in a forked child of a fresh process that loads blocks 0:1 or 0:10 and takes one forward step;
    the difference between the two cancels everything fixed (torch, transformers, the rotary tables).
    """
    added, held = {}, {}
    for quant in _QUANTS:
        one, ten = measured[0, 1, quant], measured[0, 10, quant]
        added[quant], held[quant] = ten["rss"] - one["rss"], ten["params"] - one["params"]
        record_property(f"added_mib_{quant}", round(added[quant] / 2**20, 1))
        record_property(f"peak_mib_10_blocks_{quant}", round(ten["peak"] / 2**20, 1))
    # Float32 adds its weights (copied out of the file mapping, not counted twice or lost).
    assert abs(added["none"] - held["none"]) < 0.1 * held["none"], (added, held)
    for quant, bound in MAX_ADDED_RATIO.items():
        assert added[quant] <= bound * added["none"], (quant, added, held)
