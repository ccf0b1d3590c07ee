"""The CUDA quantized layers (bitsandbytes, models/quant_cuda.py), exercised on the CPU where bitsandbytes
runs too: what a GPU server builds, minus the GPU. Speed is measured by bench/gpu_bench.py on a GPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from swarmllm.models import quant_cuda
from swarmllm.models.quant import check_supported, quantize_blocks
from swarmllm.models.span import span_from_model

pytest.importorskip("bitsandbytes")


def _span():
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, vocab_size=50, hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config._attn_implementation = "sdpa"
    return span_from_model(AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval(), 0, 2)


@pytest.mark.parametrize("mode, tolerance", [("int8", 0.05), ("nf4", 0.2)])
def test_bitsandbytes_blocks_compute_the_blocks_and_pass_gradients_to_their_input(mode, tolerance) -> None:
    span = _span()
    hidden = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    pos = torch.arange(5).expand(2, -1)
    with torch.no_grad():
        want = span(hidden, pos, None).float()
    before = span.weight_bytes()
    quantize_blocks(span.layers, mode, backend="bitsandbytes")
    import bitsandbytes as bnb

    kind = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert isinstance(span.layers[0].self_attn.q_proj, kind) and isinstance(span.layers[1].mlp.down_proj, kind)
    assert span.weight_bytes() < (0.6 if mode == "int8" else 0.4) * before
    x = hidden.clone().requires_grad_(True)
    got = span(x, pos, None)
    error = (got.float() - want).norm() / want.norm()
    assert error < tolerance, error
    got.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    quantized = [m for m in span.modules() if isinstance(m, kind)]
    assert len(quantized) == 14 and all(not m.weight.requires_grad for m in quantized)  # frozen weights
    quantize_blocks(span.layers, mode, backend="bitsandbytes")  # already quantized: left as they are
    assert isinstance(span.layers[0].self_attn.q_proj, kind)


def test_cuda_refuses_what_it_cannot_run_through_a_kernel(monkeypatch) -> None:
    cuda = torch.device("cuda", 0)
    check_supported("int8", cuda)
    check_supported("nf4", cuda)
    check_supported("int4", torch.device("cpu"))
    with pytest.raises(quant_cuda.QuantUnavailable, match="--quant int4 runs on CPUs only.*use --quant int8 or nf4"):
        check_supported("int4", cuda)
    monkeypatch.setattr(quant_cuda, "available", lambda: False)
    with pytest.raises(quant_cuda.QuantUnavailable, match="needs bitsandbytes"):
        check_supported("int8", cuda)
    check_supported("none", cuda)
