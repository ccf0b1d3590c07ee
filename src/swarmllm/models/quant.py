"""Weight-only quantization of the Linear layers inside decoder blocks: int8, int4 and NF4.

`quantize_blocks(layers, mode)` swaps every `nn.Linear` of the given blocks, in place, for a module that
stores its weight quantized and computes approximately the same function. Activations are never quantized:
the team measured torch's dynamic int8 (which quantizes activations per token) agreeing with float32 on only
about 40% of SmolLM2's next tokens, because a few hidden channels carry outliers. Weights are well behaved.

The replacements subclass `nn.Linear` and keep `in_features`, `out_features`, `bias` and their module
names, so everything that finds target layers by name and type (LoRA in `swarmllm.adapters.lora`) and
forward hooks work unchanged. Their `weight` is a property that returns a fresh dequantized copy: correct
for inspection and references, never used on the hot path. Quantized weights are buffers, not parameters,
so the first floating-point parameter of a block still names its compute dtype (`Span.dtype`), and
`.to(dtype)` converts the float scales while the integer codes stay as they are (int4's scales are kept in
the bfloat16 its kernel reads; see `Int4Linear`).

Guarantees: the weights are frozen (no gradient reaches them), but autograd flows to the layer's input, so
servers can run backward with respect to hidden states and LoRA trains on top of quantized blocks. The
input's gradient is computed in the gradient's dtype against the dequantized weight.

CPU kernels (measured on this project's 2-core Xeon with AVX-512 and AMX, torch 2.13, SmolLM2 shapes):
- int8: `aten._weight_int8pack_mm` is a matrix-vector kernel, fast in bfloat16 (1536x576 times one row:
  ~23 us, float32 `F.linear` ~33 us) but slow in float32 (~240 us per row), and its cost grows with the
  rows. So int8 layers always multiply in bfloat16 on CPU (float32 inputs are rounded to bfloat16 for the
  matmul, accumulation stays float32, the output is cast back): with the kernel below
  `INT8_GEMM_MIN_ROWS` rows (decode), with a dequantized bfloat16 weight and `F.linear` from there on
  (prefill, training, scoring), where AMX makes the bfloat16 GEMM several times faster than float32.
- nf4: dequantize to the input dtype, then `F.linear`. NF4 halves int8's memory but costs speed on CPU:
  every call rebuilds the float weight (~0.45 ms for a 1536x576 matrix).
- int4 (measured on a 2-core AMD EPYC with AVX2 only, one thread): `aten._weight_int4pack_mm_for_cpu`, the
  group-wise int4 kernel, vectorized for bfloat16 inputs only. Per call on 1536x576 it is slower than float32
  `F.linear` with the weight hot in cache (one row: 0.6-0.7x its speed) but reads 1/6 of the memory
  traffic, so a decode step through SmolLM2's 30 blocks, whose float32 weights do not fit in cache, is
  1.2-1.5x float32's speed. Its cost grows ~70 us per row; below `INT4_GEMM_MIN_ROWS` rows it runs, from
  there on a dequantized weight (~1-1.4 ms to build) and a GEMM do.
On CUDA, int8 and nf4 layers are bitsandbytes' (`models/quant_cuda.py`: kernels that multiply from the
codes) and int4 is refused; on other devices these layers dequantize to the input dtype and call `F.linear`.
bitsandbytes is not used on the CPU: it was slower than float32 there.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from swarmllm.models import quant_cuda
from swarmllm.models.quant_experts import QuantizedExperts, is_fused_experts

logger = logging.getLogger(__name__)

QuantMode = Literal["none", "int8", "int4", "nf4"]

# Weights per NF4 absmax block: QLoRA's 64. Smaller blocks did not buy SmolLM2 its 5% perplexity gate
# (measured ratios to float32 on swarmllm/data/eval.txt: 64 -> 1.24, 32 -> 1.27, 16 -> 1.21, 8 -> 1.13, the
# last at int8's memory), so the cheapest block stays; docs/quantization.md has the numbers.
NF4_BLOCK = 64

# From this many rows on, int8 layers dequantize and use a GEMM instead of the int8 matrix-vector kernel:
# measured crossover ~16-24 rows for 1536x576 in bfloat16 (kernel ~10 us per row; dequantizing plus the
# GEMM ~240 us in all), so decode steps take the kernel and prefill takes the GEMM.
INT8_GEMM_MIN_ROWS = 16

# Input weights per int4 scale and zero: GGUF Q4_1's 32, so weights that come from a Q4_1 file (SmolLM2's)
# get their own 4-bit codes back (perplexity 1.0003x float32). 5 bits per weight with the bfloat16 scale
# and zero; group 64 would save half a bit but was only ~5% faster per call.
INT4_GROUP = 32
_INT4_GROUPS = (32, 64, 128, 256)  # the group sizes `_weight_int4pack_mm_for_cpu` accepts
_INT4_ROW_MULTIPLE = 16  # `_convert_weight_to_int4pack_for_cpu` needs out_features divisible by this
# From this many rows on, int4 layers dequantize and use a GEMM instead of the int4 kernel. Measured for
# 1536x576 on an AVX2 EPYC (one thread, bench/quant.py): the kernel costs ~70 us per row, dequantizing
# ~1-1.4 ms plus the GEMM; the kernel was faster at 32 rows (2.37 against 2.60 ms for float32 inputs, 2.31
# against 2.45 for bfloat16), the GEMM at 40 (2.69 against 2.94 ms; bfloat16 a tie). Decode steps take the
# kernel, prefill the GEMM.
INT4_GEMM_MIN_ROWS = 40

# Dtypes that `_weight_int8pack_mm` runs vectorized on CPU; int8 layers multiply other inputs in bfloat16.
_INT8_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat4 levels of QLoRA (Dettmers et al. 2023), ascending in [-1, 1], as float32.

    Built from their definition rather than copied: quantiles of N(0, 1), 8 for the positive half and 7
    for the negative half (so that 0 is exactly representable), spread evenly in probability between
    `offset` and 1/2, then normalized by the largest magnitude.
    """
    offset = 0.9677083  # QLoRA's choice: the mean of the quantiles of 1 - 1/(2*15) and 1 - 1/(2*16)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).to(torch.float32)


_NF4 = nf4_levels()  # (16,)
# Byte -> (value of the low nibble, value of the high nibble): one gather decodes two weights.
_NF4_PAIRS = torch.stack([_NF4.repeat(16), _NF4.repeat_interleave(16)], dim=1)  # (256, 2)
_NF4_MIDPOINTS = (_NF4[1:] + _NF4[:-1]) / 2  # (15,) nearest-level boundaries
_PAIR_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    if key not in _PAIR_TABLES:
        _PAIR_TABLES[key] = _NF4_PAIRS.to(device=device, dtype=dtype)
    return _PAIR_TABLES[key]


class _FrozenWeightMatmul(torch.autograd.Function):
    """x @ W.T for a quantized W: the layer computes the forward, backward gives only the input's gradient."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:  # (rows, in) -> (rows, out)
        ctx.layer = layer
        return layer._matmul(x2d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # grad: (rows, out)
        return grad @ ctx.layer.dequantize(grad.dtype), None  # (rows, in)


class QuantizedLinear(nn.Linear):
    """Base of the quantized layers: y = x @ W.T + b with W stored quantized (frozen) and b in float.

    Subclasses store their codes as buffers and implement `dequantize` and `_matmul`. Inputs may have any
    number of leading dimensions; the output has the input's dtype.
    """

    def __init__(self, linear: nn.Linear):
        # nn.Linear.__init__ would allocate a float weight: skip it, keep the attributes callers read.
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = linear.bias
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False))

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """A fresh dequantized copy (out, in), in the dtype of the stored scales. Not for hot paths."""
        return self.dequantize()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # (out, in)
        """The weight this layer computes with, as a new float tensor in `dtype` (default: the layer's float
        dtype, which is its scales' for int8 and NF4)."""
        raise NotImplementedError

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:  # (rows, in) -> (rows, out), no bias
        return F.linear(x2d, self.dequantize(x2d.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        x2d = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _FrozenWeightMatmul.apply(x2d, self)
        else:
            y = self._matmul(x2d)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    """Per-output-channel symmetric int8 weights: W[o, :] ~ q[o, :] * scale[o], q in [-127, 127].

    Buffers: `qweight` int8 (out, in), `scales` (out,) in the original weight's float dtype.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        w = linear.weight.detach().to(torch.float32)  # (out, in)
        scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (out,)
        qweight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(linear.weight.dtype))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # (out, in)
        dtype = dtype or self.scales.dtype
        return self.qweight.to(dtype).mul_(self.scales.to(dtype)[:, None])

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:  # (rows, in) -> (rows, out)
        if x2d.device.type != "cpu":
            return F.linear(x2d, self.dequantize(x2d.dtype))
        # float32 (or float64) inputs are multiplied in bfloat16: the kernel's float32 path is 7x slower
        # than float32 F.linear. Both branches accumulate in float32 from inputs rounded to bfloat16. The
        # GEMM branch multiplies in bfloat16 where the CPU does so natively (AMX: several times faster than
        # float32), else in float32 (emulated bfloat16 GEMMs were ~9x slower than float32 on an AVX2 EPYC).
        dtype = x2d.dtype if x2d.dtype in _INT8_KERNEL_DTYPES else torch.bfloat16
        x = x2d.to(dtype)
        if x.shape[0] < INT8_GEMM_MIN_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.qweight, self._scales(dtype))
        else:
            gemm = _cpu_gemm_dtype(dtype)
            y = F.linear(x.to(gemm), self.dequantize(gemm))
        return y.to(x2d.dtype)

    def _scales(self, dtype: torch.dtype) -> torch.Tensor:  # (out,), the kernel wants the input's dtype
        return self.scales if self.scales.dtype == dtype else self.scales.to(dtype)


class NF4Linear(QuantizedLinear):
    """NormalFloat4 weights (QLoRA): the flattened weight is cut into blocks of `block` values, each stored
    as 4-bit indices into `nf4_levels()` times the block's absmax. Two codes are packed per byte (even
    positions in the low nibble).

    Buffers: `codes` uint8 (blocks, block // 2), `absmax` (blocks, 1) in the original weight's float dtype.
    """

    def __init__(self, linear: nn.Linear, block: int = NF4_BLOCK):
        super().__init__(linear)
        if block % 2:
            raise ValueError(f"NF4 block size must be even, got {block}")
        self.block = block
        w = linear.weight.detach().to(torch.float32).reshape(-1)  # (out * in,)
        w = F.pad(w, (0, -w.numel() % block)).view(-1, block)  # (blocks, block), zero padded
        absmax = w.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)  # (blocks, 1)
        idx = torch.bucketize(w / absmax, _NF4_MIDPOINTS).to(torch.uint8)  # (blocks, block) in [0, 16)
        codes = idx[:, 0::2] | (idx[:, 1::2] << 4)  # (blocks, block // 2)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("absmax", absmax.to(linear.weight.dtype))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # (out, in)
        dtype = dtype or self.absmax.dtype
        table = _pair_table(dtype, self.codes.device)  # (256, 2)
        values = table.index_select(0, self.codes.view(-1).to(torch.int32))  # (blocks * block // 2, 2)
        values = values.view(-1, self.block).mul_(self.absmax.to(dtype))  # (blocks, block)
        return values.view(-1)[: self.out_features * self.in_features].view(self.out_features, self.in_features)


class Int4Linear(QuantizedLinear):
    """Group-wise asymmetric 4-bit weights: each run of `group` weights along a row (input features) has
    its own bfloat16 scale and zero, W[o, k] ~ (q[o, k] - 8) * scale[g, o] + zero[g, o] with codes q in
    [0, 15] and g = k // group. The grid spans each group's min..max (scale = (max - min) / 15, zero =
    min + 8 * scale): GGUF's Q4_1, written the way torch's CPU int4 kernel reads it.

    Buffers: `qweight` uint8 (out_padded, in / 2), two codes per byte in the layout that
    `aten._convert_weight_to_int4pack_for_cpu` produces on this CPU; `scales_and_zeros` bfloat16
    (in / group, out_padded, 2), the kernel's operand. out_padded rounds out_features up to a multiple of 16,
    which the packing needs; the padding rows are zero and their outputs are dropped. The scales are
    bfloat16 whatever the layer's dtype, so `weight` and `dequantize()` default to the dtype of an empty
    buffer that follows `.to(dtype)` instead. `.to(dtype)` converts the scales too (exactly, for float32);
    the kernel then converts them back on every call (~20 us for 1536x576), so `load_span` casts blocks
    before it quantizes them.

    Construction raises ValueError if in_features is not a multiple of `group` or `group` is not one the
    kernel takes (32, 64, 128, 256): a group straddling rows has no meaning for the kernel, and every
    decoder this project serves has widths that are multiples of 32. It raises NotImplementedError if
    torch packs in a layout `_unpack_int4` does not know (checked on every layer, so never silently).
    """

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP):
        super().__init__(linear)
        if group not in _INT4_GROUPS:
            raise ValueError(f"int4 group size must be one of {_INT4_GROUPS}, got {group}")
        if self.in_features % group:
            raise ValueError(f"int4 needs in_features divisible by the group size {group}, got {self.in_features}")
        self.group = group
        w = linear.weight.detach().to(torch.float32)  # (out, in)
        w = F.pad(w, (0, 0, 0, -self.out_features % _INT4_ROW_MULTIPLE))  # (out_padded, in)
        g = w.view(w.shape[0], -1, group)  # (out_padded, groups, group)
        lo, hi = g.amin(dim=2), g.amax(dim=2)  # (out_padded, groups)
        # Scale and zero are rounded to bfloat16 first and each weight then takes its nearest code on the
        # grid as stored, so the codes fit what the kernel computes rather than the unrounded grid.
        scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
        zero = (lo + 8 * scale.float()).to(torch.bfloat16)
        q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None]).add_(8).clamp_(0, 15)
        codes = q.to(torch.int32).view_as(w).cpu()  # (out_padded, in); the packing op is CPU-only
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # (out_padded, in / 2)
        # Unpacking follows a layout read from torch's source, so check it here: a torch build that packs
        # differently fails at load time instead of computing with scrambled weights.
        if not torch.equal(_unpack_int4(packed, self.in_features, _layout()), codes.T.to(torch.uint8)):
            raise NotImplementedError(f"torch {torch.__version__}'s int4 CPU packing did not round-trip")
        self.register_buffer("qweight", packed.to(w.device))
        self.register_buffer("scales_and_zeros", torch.stack([scale.T, zero.T], dim=2).contiguous())
        # Empty and not saved: it only carries the layer's float dtype through `.to(dtype)`.
        dtype_ref = torch.empty(0, dtype=linear.weight.dtype, device=w.device)
        self.register_buffer("dtype_ref", dtype_ref, persistent=False)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # (out, in)
        """The weight as a new float tensor; a transposed view of an (in, out) matrix, which is the order
        the packed codes unpack in and which `F.linear` and matmuls take without a copy."""
        dtype = dtype or self.dtype_ref.dtype
        sz = self.scales_and_zeros.to(dtype)  # (groups, out_padded, 2)
        # Contiguous (groups, out_padded): broadcasting a strided operand made the multiply ~10x slower.
        scale = sz[..., 0].contiguous()
        zero = sz[..., 1] - 8 * scale  # w = q * scale + zero
        codes = _unpack_int4(self.qweight, self.in_features, _layout())  # (in, out_padded)
        w = codes.to(dtype).view(scale.shape[0], self.group, -1)  # (groups, group, out_padded)
        w = w.mul_(scale[:, None]).add_(zero[:, None]).view(self.in_features, -1)  # (in, out_padded)
        return w[:, : self.out_features].T

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:  # (rows, in) -> (rows, out)
        if x2d.device.type != "cpu":
            return F.linear(x2d, self.dequantize(x2d.dtype))
        if x2d.shape[0] >= INT4_GEMM_MIN_ROWS:
            return self._gemm_matmul(x2d)
        return self._kernel_matmul(x2d)

    def _gemm_matmul(self, x2d: torch.Tensor) -> torch.Tensor:  # (rows, in) -> (rows, out), on CPU
        dtype = _cpu_gemm_dtype(x2d.dtype)
        return F.linear(x2d.to(dtype), self.dequantize(dtype)).to(x2d.dtype)

    def _kernel_matmul(self, x2d: torch.Tensor) -> torch.Tensor:  # (rows, in) -> (rows, out), on CPU
        # The kernel is vectorized for bfloat16 only (float32 and float16 take a scalar loop, ~10x slower),
        # so inputs are rounded to bfloat16; it accumulates in float32 and returns bfloat16.
        sz = self.scales_and_zeros
        sz = sz if sz.dtype == torch.bfloat16 else sz.to(torch.bfloat16)
        x = x2d.to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group, sz)  # (rows, out_padded)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        return y.to(x2d.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}"


def _cpu_gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a dequantized CPU GEMM for inputs of `dtype`: bfloat16 only for bfloat16 inputs on a
    CPU that multiplies bfloat16 natively (AVX512-BF16, AMX); float32 otherwise. Without native support
    bfloat16 GEMMs are emulated: measured ~9x slower than float32 on this project's AVX2 EPYC."""
    if dtype == torch.bfloat16 and _native_bf16():
        return dtype
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@functools.cache
def _native_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private: absent means unknown, so no
    return bool(probe and probe())


def _unpack_int4(packed: torch.Tensor, in_features: int, layout: tuple[int, bool]) -> torch.Tensor:
    """Invert `_convert_weight_to_int4pack_for_cpu`: (rows, in / 2) packed bytes -> (in, rows) uint8 codes,
    transposed because that is the packing's own order (whole runs of rows are copied, not single bytes).

    `layout` is (rows per block, split). The packing, as read from torch's int4mm_kernel.cpp: rows go in
    blocks of `block`, and each block's bytes form an (in, block / 2) matrix. A full block of the AVX2 and
    AVX-512 builds puts row j in the low nibble of byte j and row j + block / 2 in the high nibble
    ("split"); a partial last block, and every block of a scalar build, pair adjacent rows instead.
    """
    block, split = layout
    rows, k = packed.shape[0], in_features
    full = rows // block * block
    flat = packed.reshape(-1)
    parts = []
    if full:
        b = flat[: full * k // 2].view(-1, k, block // 2).transpose(0, 1)  # (in, blocks, block / 2)
        parts.append(torch.stack([b & 15, b >> 4], dim=2 if split else 3).view(k, full))  # (in, full)
    if rows > full:
        b = flat[full * k // 2 :].view(k, (rows - full) // 2)  # (in, rest / 2)
        parts.append(torch.stack([b & 15, b >> 4], dim=2).view(k, rows - full))  # (in, rest)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


@functools.cache
def _pack_layout() -> tuple[int, bool] | None:
    """The layout of torch's int4 CPU packing here (see `_unpack_int4`), or None if none of the known ones
    reproduces a probe. Cached: it is fixed for a torch build and a CPU."""
    probe = torch.randint(0, 16, (80, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)  # 80 rows: full and partial blocks
    for layout in ((64, True), (32, True), (64, False), (32, False), (16, False)):
        if torch.equal(_unpack_int4(packed, 64, layout), probe.T.to(torch.uint8)):
            return layout
    return None


def _layout() -> tuple[int, bool]:
    layout = _pack_layout()
    if layout is None:
        raise NotImplementedError(
            f"torch {torch.__version__} packs int4 weights in a layout swarmllm does not know on this CPU "
            f"(capability {torch.backends.cpu.get_cpu_capability()}); use int8 or nf4")
    return layout


_MODES: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}


Backend = Literal["torch", "bitsandbytes"]


def backend_for(device: torch.device) -> Backend:
    """Whose layers quantize on `device`: bitsandbytes' CUDA kernels on a GPU, this module's elsewhere."""
    return "bitsandbytes" if device.type == "cuda" else "torch"


def check_supported(mode: QuantMode, device: torch.device) -> None:
    """Refuse, before anything loads, a mode that `device` cannot run through a maintained kernel."""
    if mode != "none" and backend_for(device) == "bitsandbytes":
        quant_cuda.check(mode)


def _already_quantized() -> tuple[type, ...]:
    return (QuantizedLinear, *quant_cuda.quantized_types())


def quantize_linear(linear: nn.Linear, mode: QuantMode) -> nn.Linear:
    """A quantized copy of one Linear (the Linear itself if `mode` is "none" or it is already quantized)."""
    if mode == "none" or isinstance(linear, QuantizedLinear):
        return linear
    if mode not in _MODES:
        raise ValueError(f"unknown quantization mode {mode!r}: expected one of none, {', '.join(_MODES)}")
    return _MODES[mode](linear)


def quantize_blocks(layers: Iterable[nn.Module], mode: QuantMode, backend: Backend | None = None) -> None:
    """Replace every nn.Linear inside `layers` with its quantized version, in place, under the same name, and
    every module of fused expert weights (MoE blocks) with `QuantizedExperts` of such linears.

    `backend`: whose layers, by default `backend_for` the layers' device (bitsandbytes on CUDA). Frees the
    float weights (the caller's other references aside). Blocks already quantized are left as they are, so
    calling twice is harmless; mixing modes is not supported. Experts in a layout that cannot be quantized
    are refused (UnsupportedExpertsError), never left in full precision.
    """
    if mode == "none":
        return
    done = _already_quantized()
    count = 0
    for layer in layers:
        targets = [
            (name, module) for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and not isinstance(module, done) or is_fused_experts(module)
        ]
        for name, module in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            device = next(module.parameters()).device
            chosen = backend or backend_for(device)

            def quantize(linear: nn.Linear, chosen=chosen) -> nn.Module:
                return quant_cuda.quantize_linear(linear, mode) if chosen == "bitsandbytes" else quantize_linear(linear, mode)

            setattr(parent, attr, QuantizedExperts(module, quantize) if is_fused_experts(module) else quantize(module))
            count += 1
    logger.debug("quantized %d linear and expert modules to %s", count, mode)  # per block while loading: not info


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by `module`'s parameters and buffers (quantized codes and scales included)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
