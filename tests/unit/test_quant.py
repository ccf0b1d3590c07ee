"""Weight quantization on tiny random layers and blocks: outputs near float, gradients to the input, spans
and LoRA still working on quantized blocks.

Tolerances are relative errors of the output, ||y_quant - y_float|| / ||y_float||, for Gaussian weights:
int8 per-channel rounding alone is ~0.8%, plus ~0.4% for the bfloat16 rounding of the matmul's inputs and
outputs, so 2% is asserted; NF4 at 4.5 bits per weight is ~9% (the known NF4 figure), so 15% is asserted.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swarmllm.adapters import lora
from swarmllm.models import quant
from swarmllm.models.span import load_span

REL_TOL = {"int8": 2e-2, "nf4": 0.15}
MODES = ["int8", "nf4"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _linear(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(96, 80, bias=bias).requires_grad_(False)
    layer.weight.normal_(0, 0.05)
    return layer


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [3, 40])  # below and above INT8_GEMM_MIN_ROWS: kernel and GEMM branches
def test_quantized_linear_is_close_to_float(mode, rows):
    layer = _linear()
    q = quant.quantize_linear(layer, mode)
    x = torch.randn(1, rows, 96)  # (batch, seq, in): leading dims are kept
    y = q(x)
    assert y.shape == (1, rows, 80) and y.dtype == torch.float32
    assert _rel(y, layer(x)) < REL_TOL[mode]
    assert _rel(q.weight, layer.weight) < REL_TOL[mode]
    # It computes its own dequantized weight's function (up to the bfloat16 matmul of int8 on CPU).
    own = nn.functional.linear(x, q.dequantize(), layer.bias)
    assert _rel(y, own) < (1e-2 if mode == "int8" else 1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_backward_reaches_the_input_as_with_the_dequantized_weight(mode):
    layer = _linear()
    q = quant.quantize_linear(layer, mode)
    x = torch.randn(2, 5, 96, requires_grad=True)
    grad_out = torch.randn(2, 5, 80)
    (got,) = torch.autograd.grad(q(x), x, grad_out)
    x_ref = x.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(nn.functional.linear(x_ref, q.dequantize(), layer.bias), x_ref, grad_out)
    torch.testing.assert_close(got, want)
    assert all(not p.requires_grad for p in q.parameters())  # frozen: only the input gets a gradient


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 40])
def test_bfloat16_inputs_and_scales(mode, rows):
    layer = _linear()
    q = quant.quantize_linear(layer, mode).to(torch.bfloat16)
    assert q.dequantize().dtype == torch.bfloat16  # the float scales follow .to(); the codes do not
    x = torch.randn(rows, 96)
    y = q(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert _rel(y, layer(x)) < REL_TOL[mode] + 1e-2  # plus bfloat16's own rounding


def test_int8_codes_are_per_channel_symmetric_and_nf4_packs_two_codes_per_byte():
    layer = _linear(bias=False)
    q8 = quant.Int8Linear(layer)
    assert q8.qweight.dtype == torch.int8 and q8.scales.shape == (80,)
    assert q8.qweight.abs().amax(dim=1).eq(127).all()  # each row's largest weight maps to +-127
    q4 = quant.NF4Linear(layer, block=32)
    assert q4.codes.dtype == torch.uint8 and q4.codes.shape == (80 * 96 // 32, 16)
    assert q4.absmax.shape == (80 * 96 // 32, 1)
    assert quant.weight_bytes(q4) < quant.weight_bytes(q8) < quant.weight_bytes(layer) / 3


def test_nf4_levels_are_qlora_normal_float():
    levels = quant.nf4_levels()
    assert levels.shape == (16,) and levels[0] == -1 and levels[-1] == 1 and levels[7] == 0
    assert torch.all(levels[1:] > levels[:-1])
    # Values published with QLoRA (bitsandbytes' NF4 table), recomputed here from the definition.
    torch.testing.assert_close(levels[[1, 6, 8, 14]], torch.tensor([-0.6961928, -0.0910500, 0.0795803, 0.7229568]),
                               rtol=0, atol=1e-6)


def test_nf4_weight_size_need_not_be_a_multiple_of_the_block():
    layer = nn.Linear(10, 7, bias=False).requires_grad_(False)  # 70 weights: one padded block of 64
    q = quant.NF4Linear(layer)
    assert q.dequantize().shape == (7, 10)
    assert _rel(q.dequantize(), layer.weight) < REL_TOL["nf4"]


def test_unknown_mode_is_refused_and_none_or_requantizing_changes_nothing():
    layer = _linear()
    with pytest.raises(ValueError, match="unknown quantization mode"):
        quant.quantize_linear(layer, "int4")  # type: ignore[arg-type]
    assert quant.quantize_linear(layer, "none") is layer
    q = quant.quantize_linear(layer, "int8")
    assert quant.quantize_linear(q, "nf4") is q


def _span_and_reference(model_dir, mode):
    """A quantized span of all 4 blocks, and a float span whose Linear weights are its dequantized weights."""
    span = load_span(model_dir, 0, 4)
    reference = load_span(model_dir, 0, 4)
    quant.quantize_blocks(span.layers, mode)
    for name, module in span.layers.named_modules():
        if isinstance(module, quant.QuantizedLinear):
            reference.layers.get_submodule(name).weight.copy_(module.dequantize())
    return span, reference


@pytest.mark.parametrize("mode", MODES)
def test_quantize_blocks_replaces_every_linear_and_the_span_still_runs(mode, tiny_llama_dir):
    span = load_span(tiny_llama_dir, 0, 4)
    float_bytes = quant.weight_bytes(span.layers)
    names = [n for n, m in span.layers.named_modules() if isinstance(m, nn.Linear)]
    hidden, pos = torch.randn(2, 9, 32), torch.arange(9).expand(2, -1)  # (batch, seq, hidden)
    with torch.no_grad():
        want = span(hidden, pos)
        quant.quantize_blocks(span.layers, mode)
        quant.quantize_blocks(span.layers, mode)  # idempotent
        got = span(hidden, pos)
    quantized = [n for n, m in span.layers.named_modules() if isinstance(m, quant.QuantizedLinear)]
    assert quantized == names and len(names) == 4 * 7  # same names, all of q k v o gate up down
    assert quant.weight_bytes(span.layers) < float_bytes / (3 if mode == "int8" else 5)
    assert span.dtype == torch.float32
    assert _rel(got - hidden, want - hidden) < 2 * REL_TOL[mode]  # the blocks' updates to the residual

    cache = span.new_cache()  # prefill, then one-row decode steps (the int8 kernel branch)
    with torch.no_grad():
        span(hidden[:, :8], pos[:, :8], cache=cache)
        step = span(hidden[:, 8:], pos[:, 8:], cache=cache)
    torch.testing.assert_close(step, got[:, 8:], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", MODES)
def test_lora_applies_on_quantized_blocks_like_on_their_dequantized_weights(mode, tiny_llama_dir):
    span, reference = _span_and_reference(tiny_llama_dir, mode)
    g = torch.Generator().manual_seed(1)
    paths = lora.target_paths(span.layers[0], ("q_proj", "v_proj"))
    assert paths == lora.target_paths(reference.layers[0], ("q_proj", "v_proj"))
    weights = {b: {p: (torch.randn(4, 32, generator=g) * 0.3, torch.randn(span.layers[0].get_submodule(p).out_features,
                                                                       4, generator=g) * 0.3) for p in paths}
               for b in range(4)}
    for b in range(4):
        lora.check_fits(span.layers[b], b, weights[b])
    hidden, pos = torch.randn(2, 9, 32), torch.arange(9).expand(2, -1)  # 18 rows: the GEMM branch
    grad_out = torch.randn(2, 9, 32)
    results = []
    for s in (span, reference):
        x = hidden.clone().requires_grad_(True)
        leaves = {b: {p: tuple(t.clone().requires_grad_(True) for t in ab) for p, ab in w.items()}
                  for b, w in weights.items()}
        with torch.enable_grad(), lora.applied(s.layers, 0, leaves, 2.0):
            out = s(x, pos)
        flat = [t for b in range(4) for p in paths for t in leaves[b][p]]
        results.append((out, *torch.autograd.grad(out, [x, *flat], grad_out)))
    with torch.no_grad():
        base = span(hidden, pos)
    assert not torch.allclose(base, results[0][0], atol=1e-3)  # the adapter changes the output
    # int8 multiplies in bfloat16 on CPU, nf4 in the input's float32: the same function up to that rounding.
    tol = dict(rtol=3e-2, atol=3e-2) if mode == "int8" else dict(rtol=1e-4, atol=1e-5)
    for got, want in zip(results[0], results[1]):
        torch.testing.assert_close(got, want, **tol)
