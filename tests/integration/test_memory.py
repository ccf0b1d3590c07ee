"""A server loads only its own blocks: 10 of SmolLM2's 30 blocks hold about a third of the block weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from swarmllm.models.span import block_weight_bytes, load_span

pytestmark = pytest.mark.real_model

_MEASURE = """
import json, resource, sys, torch
from pathlib import Path
from swarmllm.models.span import load_span
def rss():  # current resident set, in bytes
    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
before = rss()
span = load_span(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
for p in span.parameters(): p.sum()  # touch every page, mapped or not
print(json.dumps({"rss_delta": rss() - before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "params": span.weight_bytes()}))
"""


def test_span_holds_a_third_of_the_block_weights(smollm2_dir) -> None:
    sizes = block_weight_bytes(smollm2_dir)
    assert sorted(sizes) == list(range(30))
    total = sum(sizes.values())
    span = load_span(smollm2_dir, 10, 20)
    assert span.weight_bytes() == sum(sizes[i] for i in range(10, 20))
    assert 0.30 < span.weight_bytes() / total < 0.37


def _measure(model_dir, start: int, end: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(model_dir), str(start), str(end)],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_a_span_never_materializes_the_whole_model(smollm2_dir) -> None:
    """Measured in fresh processes: a third of the blocks costs a third of the blocks' memory.

    Both processes pay the same fixed cost (torch, transformers, a meta skeleton; about 65 MB seen), so the
    difference between them is what the 20 blocks not loaded would have cost.
    """
    sizes = block_weight_bytes(smollm2_dir)
    total, not_loaded = sum(sizes.values()), sum(sizes[i] for i in (*range(10), *range(20, 30)))
    third, whole = _measure(smollm2_dir, 10, 20), _measure(smollm2_dir, 0, 30)
    saved = whole["rss_delta"] - third["rss_delta"]
    assert abs(saved - not_loaded) < 0.1 * total, (third, whole, not_loaded)
    assert third["rss_delta"] < 0.5 * whole["rss_delta"], (third, whole)
