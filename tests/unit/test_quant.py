"""Weight quantization on tiny random layers and blocks: outputs near float, gradients to the input, spans
and LoRA still working on quantized blocks.

Tolerances are relative errors of the output, ||y_quant - y_float|| / ||y_float||, for Gaussian weights:
int8 per-channel rounding alone is ~0.8%, plus ~0.4% for the bfloat16 rounding of the matmul's inputs and
outputs, so 2% is asserted; int4 (groups of 32, min..max grid) measures ~6.1%, so 10% is asserted; NF4 at
4.5 bits per weight is ~9% (the known NF4 figure), so 15% is asserted.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swarmllm.adapters import lora
from swarmllm.models import quant
from swarmllm.models.span import load_span

REL_TOL = {"int8": 2e-2, "int4": 0.10, "nf4": 0.15}
MODES = ["int8", "int4", "nf4"]
# Rows that take the dequantize-and-GEMM branch of both int8 and int4 (fewer take their kernels).
GEMM_ROWS = max(quant.INT8_GEMM_MIN_ROWS, quant.INT4_GEMM_MIN_ROWS) + 1
# int8 and int4 multiply in bfloat16 on CPU (their kernels); nf4 in the input's float32.
BF16_MATMUL = {"int8", "int4"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _linear(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(96, 80, bias=bias).requires_grad_(False)
    layer.weight.normal_(0, 0.05)
    return layer


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [3, GEMM_ROWS])  # the kernel and the GEMM branches
def test_quantized_linear_is_close_to_float(mode, rows):
    layer = _linear()
    q = quant.quantize_linear(layer, mode)
    x = torch.randn(1, rows, 96)  # (batch, seq, in): leading dims are kept
    y = q(x)
    assert y.shape == (1, rows, 80) and y.dtype == torch.float32
    assert _rel(y, layer(x)) < REL_TOL[mode]
    assert _rel(q.weight, layer.weight) < REL_TOL[mode]
    # It computes its own dequantized weight's function (up to the bfloat16 matmuls of int8 and int4 on CPU).
    own = nn.functional.linear(x, q.dequantize(torch.float32), layer.bias)
    assert _rel(y, own) < (1e-2 if mode in BF16_MATMUL else 1e-6)


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
@pytest.mark.parametrize("rows", [1, GEMM_ROWS])
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


def test_int4_codes_span_each_groups_min_to_max_and_pack_two_per_byte():
    layer = _linear(bias=False)
    q = quant.Int4Linear(layer)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (80, 96 // 2)
    assert q.scales_and_zeros.dtype == torch.bfloat16 and q.scales_and_zeros.shape == (96 // 32, 80, 2)
    codes = quant._unpack_int4(q.qweight, 96, quant._layout()).T.reshape(80, 3, 32)  # (out, groups, group)
    assert codes.amin(dim=2).eq(0).all() and codes.amax(dim=2).eq(15).all()  # each group's min and max
    assert quant.weight_bytes(q) < quant.weight_bytes(quant.Int8Linear(layer)) / 1.5


def test_int4_kernel_reads_scales_and_zeros_as_our_dequantize_does():
    """The zero-point convention: torch's kernel computes w = (q - 8) * scale + zero. Its output must match a
    float64 matmul with `dequantize()` up to the kernel's bfloat16 rounding of inputs and output, and a
    misreading (zero taken as the value of code 0) would be off by 8 scales per weight, far outside that."""
    layer = _linear(bias=False, seed=3)
    q = quant.Int4Linear(layer)
    x = torch.randn(4, 96).to(torch.bfloat16)  # rows below INT4_GEMM_MIN_ROWS: the kernel
    got = q(x).double()
    w = q.dequantize(torch.float64)  # (out, in), exact: bfloat16 scales and 4-bit codes
    want = x.double() @ w.T
    # The output is rounded to bfloat16 once (relative 2^-9); accumulation in float32 adds far less.
    torch.testing.assert_close(got, want, rtol=2**-8, atol=1e-4)
    sz = q.scales_and_zeros.double()  # (groups, out, 2)
    misread = w + 8 * sz[..., 0].T.repeat_interleave(32, dim=1)  # w = q * scale + zero
    assert _rel(got, x.double() @ misread.T) > 0.5


def test_int4_pads_rows_to_16_and_refuses_inputs_off_the_group():
    layer = nn.Linear(64, 40).requires_grad_(False)  # 40 rows: packed as 48, the last 8 dropped
    q = quant.Int4Linear(layer)
    assert q.qweight.shape == (48, 32) and q.dequantize().shape == (40, 64)
    x = torch.randn(2, 64)
    assert q(x).shape == (2, 40) and q(torch.randn(GEMM_ROWS, 64)).shape == (GEMM_ROWS, 40)
    assert _rel(q(x), layer(x)) < REL_TOL["int4"]
    with pytest.raises(ValueError, match="divisible by the group size 32"):
        quant.Int4Linear(nn.Linear(48, 16))
    with pytest.raises(ValueError, match="group size must be one of"):
        quant.Int4Linear(layer, group=16)


def _reference_pack(codes: torch.Tensor, block: int, split: bool) -> torch.Tensor:
    """torch's int4 CPU packing as described in int4mm_kernel.cpp, one byte at a time: (rows, in) codes ->
    (rows, in / 2) bytes, rows in blocks whose bytes are (in, block / 2), k-major."""
    rows, k = codes.shape
    out = []
    for start in range(0, rows, block):
        b = codes[start : start + block].tolist()
        n = len(b)
        for kk in range(k):
            for j in range(n // 2):
                lo, hi = (b[j][kk], b[j + n // 2][kk]) if split and n == block else (b[2 * j][kk], b[2 * j + 1][kk])
                out.append(lo | hi << 4)
    return torch.tensor(out, dtype=torch.uint8).view(rows, k // 2)


@pytest.mark.parametrize("layout", [(64, True), (32, True), (32, False)])  # AVX-512, AVX2, scalar builds
def test_int4_unpacking_inverts_each_known_packing(layout):
    codes = torch.randint(0, 16, (112, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = _reference_pack(codes, *layout)  # 112 rows: full blocks and a partial one in every layout
    assert torch.equal(quant._unpack_int4(packed, 64, layout), codes.T)


@pytest.mark.parametrize("native", [True, False])
def test_int4_prefill_gemm_runs_in_bfloat16_only_where_the_cpu_has_it(native, monkeypatch):
    monkeypatch.setattr(quant, "_native_bf16", lambda: native)
    assert quant._cpu_gemm_dtype(torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    assert quant._cpu_gemm_dtype(torch.float16) == torch.float32
    assert quant._cpu_gemm_dtype(torch.float32) == torch.float32
    q = quant.Int4Linear(_linear())
    y = q(torch.randn(GEMM_ROWS, 96, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (GEMM_ROWS, 80)


def test_int4_refuses_a_packing_layout_it_does_not_know(monkeypatch):
    monkeypatch.setattr(quant, "_pack_layout", lambda: None)
    with pytest.raises(NotImplementedError, match="use int8 or nf4"):
        quant.Int4Linear(_linear())


def test_unknown_mode_is_refused_and_none_or_requantizing_changes_nothing():
    layer = _linear()
    with pytest.raises(ValueError, match="unknown quantization mode"):
        quant.quantize_linear(layer, "int3")  # type: ignore[arg-type]
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
            reference.layers.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
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

    cache = span.new_cache()  # prefill, then one-row decode steps (the kernel branches)
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
    hidden, pos = torch.randn(2, 9, 32), torch.arange(9).expand(2, -1)  # 18 rows: int8's GEMM, int4's kernel
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
    # int8 and int4 multiply in bfloat16 on CPU, nf4 in the input's float32: the same function up to that
    # rounding.
    tol = dict(rtol=3e-2, atol=3e-2) if mode in BF16_MATMUL else dict(rtol=1e-4, atol=1e-5)
    for got, want in zip(results[0], results[1]):
        torch.testing.assert_close(got, want, **tol)
