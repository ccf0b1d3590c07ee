"""Weight-only quantization of the Linear layers inside decoder blocks: int8 and NF4.

`quantize_blocks(layers, mode)` swaps every `nn.Linear` of the given blocks, in place, for a module that
stores its weight quantized and computes approximately the same function. Activations are never quantized:
the team measured torch's dynamic int8 (which quantizes activations per token) agreeing with float32 on only
about 40% of SmolLM2's next tokens, because a few hidden channels carry outliers. Weights are well behaved.

The replacements subclass `nn.Linear` and keep `in_features`, `out_features`, `bias` and their module
names, so everything that finds target layers by name and type (LoRA in `swarmllm.adapters.lora`) and
forward hooks work unchanged. Their `weight` is a property that returns a fresh dequantized copy: correct
for inspection and references, never used on the hot path. Quantized weights are buffers, not parameters,
so the first floating-point parameter of a block still names its compute dtype (`Span.dtype`), and
`.to(dtype)` converts the float scales while the integer codes stay as they are.

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
On CUDA both modes dequantize to the input dtype and call `F.linear`: correct and memory-saving, not fast,
and not verified on a GPU here. bitsandbytes is deliberately not used: it was slower than float32 on this CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

QuantMode = Literal["none", "int8", "nf4"]

# Weights per NF4 absmax block: QLoRA's 64. Smaller blocks did not buy SmolLM2 its 5% perplexity gate
# (measured ratios to float32 on swarmllm/data/eval.txt: 64 -> 1.24, 32 -> 1.27, 16 -> 1.21, 8 -> 1.13, the
# last at int8's memory), so the cheapest block stays; docs/quantization.md has the numbers.
NF4_BLOCK = 64

# From this many rows on, int8 layers dequantize and use a GEMM instead of the int8 matrix-vector kernel:
# measured crossover ~16-24 rows for 1536x576 in bfloat16 (kernel ~10 us per row; dequantizing plus the
# GEMM ~240 us in all), so decode steps take the kernel and prefill takes the GEMM.
INT8_GEMM_MIN_ROWS = 16

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
        """The weight this layer computes with, as a new float tensor in `dtype` (default: the scales')."""
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
        # than float32 F.linear, and a bfloat16 GEMM beats a float32 one several times over on AMX.
        # Both accumulate in float32, so only the matmul's inputs and output are rounded, and they are
        # rounded the same way whichever branch the row count picks.
        dtype = x2d.dtype if x2d.dtype in _INT8_KERNEL_DTYPES else torch.bfloat16
        x = x2d.to(dtype)
        if x.shape[0] < INT8_GEMM_MIN_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.qweight, self._scales(dtype))
        else:
            y = F.linear(x, self.dequantize(dtype))
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


_MODES: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "nf4": NF4Linear}


def quantize_linear(linear: nn.Linear, mode: QuantMode) -> nn.Linear:
    """A quantized copy of one Linear (the Linear itself if `mode` is "none" or it is already quantized)."""
    if mode == "none" or isinstance(linear, QuantizedLinear):
        return linear
    if mode not in _MODES:
        raise ValueError(f"unknown quantization mode {mode!r}: expected one of none, {', '.join(_MODES)}")
    return _MODES[mode](linear)


def quantize_blocks(layers: Iterable[nn.Module], mode: QuantMode) -> None:
    """Replace every nn.Linear inside `layers` with its quantized version, in place, under the same name.

    Frees the float weights (the caller's other references aside). Blocks already quantized are left as
    they are, so calling twice is harmless; mixing modes is not supported.
    """
    if mode == "none":
        return
    count = 0
    for layer in layers:
        targets = [
            (name, module) for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and not isinstance(module, QuantizedLinear)
        ]
        for name, module in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, attr, quantize_linear(module, mode))
            count += 1
    logger.info("quantized %d linear layers to %s", count, mode)


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by `module`'s parameters and buffers (quantized codes and scales included)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
