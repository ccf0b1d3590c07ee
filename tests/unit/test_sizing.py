"""Sizing spans to a device's memory (server/sizing.py) and the speed measurement cache (server/throughput.py)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from swarmllm.models.quant import quantize_blocks
from swarmllm.models.span import load_span, meta_block
from swarmllm.server import sizing
from swarmllm.server.throughput import Throughput, ThroughputCache, cached_measure, measurement_key
from tests.unit.test_span_exact import _model

GiB = 2**30

# Llama-3-70B's block geometry: what a user of `--num-blocks auto` on a real GPU has.
LLAMA3_70B = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                         num_hidden_layers=80, vocab_size=128256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_bytes_equal_what_a_loaded_block_holds(tiny_llama_dir, dtype) -> None:
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    for quant in ("none", "int8", "int4", "nf4"):
        span = load_span(tiny_llama_dir, 0, 2, dtype)
        quantize_blocks(span.layers, quant)
        assert sizing.block_bytes(config, dtype, quant) * 2 == span.weight_bytes(), quant


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_moe_block_bytes_count_quantized_experts_and_the_largest_block(name, tmp_path) -> None:
    """Expert weights are quantized too, so sizing counts them quantized; and `--num-blocks` sizes by the
    largest block (DeepSeek's first block is dense, far smaller than its expert blocks)."""
    model = _model(name)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    for quant in ("none", "int8", "int4", "nf4"):
        held = [load_span(tmp_path, i, i + 1, quant=quant).weight_bytes() for i in range(config.num_hidden_layers)]
        assert [sizing.block_bytes(config, torch.float32, quant, i) for i in range(len(held))] == held, quant
        assert sizing.largest_block_bytes(config, torch.float32, quant) == max(held)
    if name == "deepseek_v3":
        assert held[0] < held[1]


def test_quantized_storage_per_weight_matches_the_real_layers_at_big_shapes() -> None:
    # (out, in) of Llama-3-8B's projections, cut in rows to stay small; the scale overhead is per row/group.
    for quant in ("int8", "int4", "nf4"):
        linear = torch.nn.Linear(4096, 64, bias=False).to(torch.bfloat16)
        block = torch.nn.Sequential(linear)
        quantize_blocks([block], quant)
        held = sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()])
        assert held == sizing.linear_bytes(64, 4096, 2, quant), quant


def test_a_70b_block_takes_what_the_arithmetic_says() -> None:
    # 8192*(8192*2 + 1024*2) + 3*8192*28672 = 855.6M weights + two norms.
    weights = 8192 * (8192 * 2 + 1024 * 2) + 3 * 8192 * 28672
    assert sizing.block_bytes(LLAMA3_70B, torch.bfloat16, "none") == 2 * (weights + 2 * 8192)
    int8 = sizing.block_bytes(LLAMA3_70B, torch.bfloat16, "int8")
    int4 = sizing.block_bytes(LLAMA3_70B, torch.bfloat16, "int4")
    assert 0.5 < int8 / (2 * weights) < 0.51 and 0.31 < int4 / (2 * weights) < 0.32


def test_auto_takes_as_many_blocks_as_fit_after_the_cache_and_margin() -> None:
    per_block = sizing.block_bytes(LLAMA3_70B, torch.bfloat16, "none")  # ~1.6 GiB
    free = 80 * GiB  # an idle H100
    budget = sizing.Budget(free=free, cache=2 * GiB, margin=sizing.margin_bytes(free))
    n = sizing.fit_blocks(budget, per_block, 80)
    assert n == int((free - 2 * GiB - 1 * GiB - 0.05 * free) // per_block)
    assert n * per_block <= budget.for_blocks < (n + 1) * per_block
    assert sizing.fit_blocks(sizing.Budget(free=10**15, cache=0, margin=0), per_block, 80) == 80  # capped at the model


def test_a_span_that_cannot_fit_is_refused_with_the_sizes() -> None:
    per_block = sizing.block_bytes(LLAMA3_70B, torch.bfloat16, "none")
    budget = sizing.Budget(free=24 * GiB, cache=2 * GiB, margin=sizing.margin_bytes(24 * GiB))
    with pytest.raises(sizing.DoesNotFit, match=r"20 blocks need 31\.\d\d GiB \(1\.59 GiB each\) but cuda:0 has 24\.00 GiB free.*at most 12 blocks fit"):
        sizing.check_span_fits(budget, per_block, 20, "cuda:0")
    sizing.check_span_fits(budget, per_block, 12, "cuda:0")
    with pytest.raises(sizing.DoesNotFit, match="not even one block fits"):
        sizing.fit_blocks(sizing.Budget(free=2 * GiB, cache=2 * GiB, margin=GiB), per_block, 80)
    with pytest.raises(sizing.DoesNotFit, match="no memory left for the attention cache"):
        sizing.auto_cache_bytes(GiB // 2)
    assert sizing.auto_cache_bytes(20 * GiB) == 20 * GiB - GiB - GiB


def test_meta_block_sizes_need_no_weights() -> None:
    block = meta_block(LLAMA3_70B, 3)
    assert all(p.device.type == "meta" for p in block.parameters())


# --- the speed measurement cache ---


def _span(tiny_llama_dir):
    return load_span(tiny_llama_dir, 0, 2)


def test_a_measurement_is_reused_under_the_same_key_and_redone_on_request(tmp_path, tiny_llama_dir) -> None:
    span, cache = _span(tiny_llama_dir), ThroughputCache(tmp_path / "speed.json")
    runs = []

    def run(fn, s):
        runs.append(s)
        return Throughput(step_time=0.01 * len(runs), forward_tps=100.0)

    key = measurement_key("tiny", span, "none")
    first = cached_measure(span, key, cache, remeasure=False, run=run)
    again = cached_measure(span, key, ThroughputCache(tmp_path / "speed.json"), remeasure=False, run=run)
    assert again == first and len(runs) == 1  # a restart with the same key: no new measurement
    fresh = cached_measure(span, key, cache, remeasure=True, run=run)
    assert len(runs) == 2 and fresh.step_time == 0.02 and cache.get(key) == fresh


def test_the_key_names_everything_a_measurement_depends_on(tiny_llama_dir) -> None:
    span = _span(tiny_llama_dir)
    key = measurement_key("tiny", span, "int8")
    assert key.startswith("tiny|0:2|cpu:") and "|float32|int8|torch " + torch.__version__ in key
    assert f"{torch.get_num_threads()}threads" in key
    assert measurement_key("tiny", load_span(tiny_llama_dir, 0, 2, torch.bfloat16), "int8") != key
    assert measurement_key("tiny", load_span(tiny_llama_dir, 1, 3), "int8") != key
    assert measurement_key("other", span, "int8") != key


def test_a_corrupt_cache_file_costs_one_measurement(tmp_path, tiny_llama_dir) -> None:
    path = tmp_path / "speed.json"
    path.write_text("{not json")
    cache = ThroughputCache(path)
    span = _span(tiny_llama_dir)
    key = measurement_key("tiny", span, "none")
    assert cache.get(key) is None
    cached_measure(span, key, cache, remeasure=False, run=lambda fn, s: Throughput(0.5, 2.0))
    assert json.loads(path.read_text())[key] == {"step_time": 0.5, "forward_tps": 2.0}


def test_a_given_speed_needs_both_figures() -> None:
    from swarmllm.server.config import ServerConfig

    config = ServerConfig(model="m", blocks="0:1", step_time=0.002, forward_tps=500)
    assert (config.step_time, config.forward_tps) == (0.002, 500)
    with pytest.raises(ValueError, match="both --step-time and --forward-tps"):
        ServerConfig(model="m", blocks="0:1", step_time=0.002)
