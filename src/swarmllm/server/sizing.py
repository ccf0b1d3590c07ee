"""How many blocks fit, and whether a span fits, in a device's memory: decided before anything is loaded.

A span that does not fit is refused at start with the sizes, never discovered by an out-of-memory crash
halfway through loading. Sizes come from the model's geometry (a block built on the meta device), the
dtype and the quantization's storage per weight, so nothing is read from disk to decide.

What must stay free besides the blocks:
- the attention cache: `--max-cache-bytes` (2 GiB by default), reserved in full when sizing `--num-blocks
  auto`, since that is what the server promises to sessions;
- a safety margin (`margin_bytes`): activations of the largest pass (prefill chunks, training batches),
  the allocator's fragmentation and, on a GPU, the CUDA context (~0.5 GiB); on the CPU it also covers the
  process's own fixed cost (torch, hivemind, p2pd: ~0.5 GiB measured). 1 GiB plus 5% of the device's free
  memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from swarmllm.models.quant_experts import is_fused_experts
from swarmllm.models.span import meta_block, meta_blocks

GiB = 2**30
MARGIN_FIXED = 1 * GiB
MARGIN_FRACTION = 0.05

# Bytes of storage per weight of a quantized Linear, besides the weight codes themselves: scales (and
# zero points) per group, in units of the compute dtype's item size. Kept in step with models/quant.py by
# tests/unit/test_sizing.py, which quantizes real layers and compares.
_CODE_BYTES = {"int8": 1.0, "int4": 0.5, "nf4": 0.5}
_SCALES_PER_WEIGHT = {"int4": 2 / 32, "nf4": 1 / 64}  # int8: one scale per output row, added per row


class DoesNotFit(ValueError):
    """The span asked for needs more memory than the device has free; the message gives the sizes."""


@dataclass(frozen=True)
class Budget:
    """Free memory of a device split into what the blocks may take and what is reserved."""

    free: int
    cache: int
    margin: int

    @property
    def for_blocks(self) -> int:
        return max(0, self.free - self.cache - self.margin)


def margin_bytes(free: int) -> int:
    return MARGIN_FIXED + int(MARGIN_FRACTION * free)


def block_bytes(config: PretrainedConfig, dtype: torch.dtype, quant: str, idx: int = 0) -> int:
    """Bytes block `idx` holds once loaded in `dtype` with its Linear weights stored as `quant`."""
    return _bytes_of(meta_block(config, idx), dtype, quant)


def largest_block_bytes(config: PretrainedConfig, dtype: torch.dtype, quant: str) -> int:
    """Bytes of the model's largest block: what `--num-blocks` sizes spans by, since a server's blocks are
    chosen only later (DeepSeek's first blocks are dense, the others hold experts)."""
    return max(_bytes_of(block, dtype, quant) for block in meta_blocks(config, range(config.num_hidden_layers)))


def _bytes_of(block: nn.Module, dtype: torch.dtype, quant: str) -> int:
    itemsize = torch.finfo(dtype).bits // 8
    total = 0
    counted: set[int] = set()
    for module in block.modules():
        if isinstance(module, nn.Linear) and quant != "none":
            out_f, in_f = module.weight.shape
            total += linear_bytes(out_f, in_f, itemsize, quant)
            counted.add(id(module.weight))
        elif is_fused_experts(module) and quant != "none":  # quantized per expert (models/quant_experts.py)
            for weight in module.parameters(recurse=False):
                experts, out_f, in_f = weight.shape
                total += experts * linear_bytes(out_f, in_f, itemsize, quant)
                counted.add(id(weight))
    for p in [*block.parameters(), *block.buffers()]:
        if id(p) not in counted:
            total += p.numel() * itemsize
    return total


def linear_bytes(out_features: int, in_features: int, itemsize: int, quant: str) -> int:
    """Storage of one quantized (out, in) weight matrix: codes plus scales (in the compute dtype, except
    int4's, which are the CPU kernel's bfloat16 scale and zero pairs for rows padded to a multiple of 16)."""
    if quant not in _CODE_BYTES:
        raise ValueError(f"unknown quantization {quant!r}")
    if quant == "int4":
        rows = -(-out_features // 16) * 16
        return int(rows * in_features * _CODE_BYTES[quant] + rows * in_features * _SCALES_PER_WEIGHT[quant] * 2)
    n = out_features * in_features
    scales = out_features if quant == "int8" else n * _SCALES_PER_WEIGHT[quant]
    return int(n * _CODE_BYTES[quant] + scales * itemsize)


def fit_blocks(budget: Budget, per_block: int, num_blocks: int) -> int:
    """How many blocks of `per_block` bytes fit in `budget` (at most the model's `num_blocks`); raises
    DoesNotFit if not even one does."""
    n = min(num_blocks, budget.for_blocks // max(1, per_block))
    if n < 1:
        raise DoesNotFit(
            f"not even one block fits: a block takes {_gib(per_block)}, and of {_gib(budget.free)} free, "
            f"{_gib(budget.cache)} is kept for the attention cache (--max-cache-bytes) and {_gib(budget.margin)} "
            "as a safety margin; lower --max-cache-bytes, quantize (--quant), or use a device with more memory"
        )
    return n


def check_span_fits(budget: Budget, per_block: int, blocks: int, where: str) -> None:
    """Refuse a span of `blocks` blocks that the budget cannot hold, with the sizes."""
    need = per_block * blocks
    if need > budget.for_blocks:
        raise DoesNotFit(
            f"{blocks} blocks need {_gib(need)} ({_gib(per_block)} each) but {where} has {_gib(budget.free)} free, of "
            f"which {_gib(budget.cache)} is kept for the attention cache and {_gib(budget.margin)} as a safety margin: "
            f"at most {budget.for_blocks // max(1, per_block)} blocks fit (or lower --max-cache-bytes, or --quant)"
        )


def auto_cache_bytes(free_after_load: int) -> int:
    """`--max-cache-bytes auto`: what is left free after loading, less the safety margin."""
    cache = free_after_load - margin_bytes(free_after_load)
    if cache <= 0:
        raise DoesNotFit(
            f"no memory left for the attention cache: {_gib(free_after_load)} free after loading the blocks, "
            f"less a {_gib(margin_bytes(free_after_load))} safety margin; serve fewer blocks"
        )
    return cache


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"
