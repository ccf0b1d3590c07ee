"""Quantized linear weights on CUDA: bitsandbytes' maintained kernels (LLM.int8 and QLoRA's NF4).

On a GPU, dequantizing a whole weight matrix on every call (what `models/quant.py`'s own layers do off the
CPU) triples the memory traffic that decode is bound by. bitsandbytes multiplies from the quantized codes:
`Linear8bitLt` (int8 codes, one float32 scale per row, outlier columns above `INT8_THRESHOLD` in 16 bits,
as Dettmers et al. 2022) and `Linear4bit` (NF4 codes in blocks of 64, one float32 absmax per block). Petals
serves with the same two. Both subclass `nn.Linear` under the same module names, so LoRA finds its targets
and forward hooks work; both give gradients with respect to their input, so servers run backward and LoRA
trains on top of them.

Which modes run here: int8 and nf4. `int4` (group-wise asymmetric, GGUF Q4_1's grid) is the CPU 4-bit mode;
on CUDA it is refused at start with the alternatives, rather than served by a slow dequantizing path.

bitsandbytes also runs on the CPU, so `tests/unit/test_quant_cuda.py` exercises these layers here with
`backend="bitsandbytes"`; CPU servers keep `models/quant.py`'s kernels, which were faster there.
"""

from __future__ import annotations

import importlib.util

from torch import nn

# LLM.int8's outlier threshold: input columns with a magnitude above it are multiplied in 16 bits. 6.0 is
# the paper's and transformers' default, and what Petals serves with.
INT8_THRESHOLD = 6.0
MODES = ("int8", "nf4")


class QuantUnavailable(ValueError):
    """A quantization mode this device cannot run through a maintained kernel; the message says what can."""


def available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def check(mode: str) -> None:
    """Refuse, before anything loads, a mode that CUDA would not run through bitsandbytes."""
    if mode not in MODES:
        raise QuantUnavailable(
            f"--quant {mode} runs on CPUs only (its kernel is torch's CPU int4); on CUDA use --quant int8 or nf4 "
            "(bitsandbytes), or no quantization"
        )
    if not available():
        raise QuantUnavailable(
            f"--quant {mode} on CUDA needs bitsandbytes (pip install bitsandbytes): its kernels multiply from the "
            "quantized weights, where dequantizing on every call would be slower than not quantizing"
        )


def quantized_types() -> tuple[type, ...]:
    """The bitsandbytes layer classes (empty if it is not installed): already quantized, never again."""
    if not available():
        return ()
    import bitsandbytes as bnb

    return bnb.nn.Linear8bitLt, bnb.nn.Linear4bit


def quantize_linear(linear: nn.Linear, mode: str) -> nn.Linear:
    """A bitsandbytes copy of `linear` on the same device, its weight quantized (the float one is not kept).

    bitsandbytes quantizes a weight as it moves from the CPU to its device, so the float weight goes through
    the CPU once; peak memory is one float matrix more than the result, which `load_span` bounds to one
    block at a time."""
    check(mode)
    import bitsandbytes as bnb

    weight = linear.weight.detach()
    device, dtype = weight.device, weight.dtype
    bias = linear.bias is not None
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype,
                                  compress_statistics=False, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=False, module=layer)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(device)  # quantizes the weight on its way to `device`
