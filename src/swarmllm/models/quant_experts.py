"""Quantized mixture-of-experts weights: the fused expert tensors of Mixtral and Qwen-MoE blocks.

transformers 5 keeps all experts of a block in two 3-D parameters, `gate_up_proj` (experts, 2 * inter,
hidden) and `down_proj` (experts, hidden, inter), which are not `nn.Linear`s, so quantizing the Linears
alone leaves most of an MoE block (the experts hold ~95% of Mixtral's block bytes) in full precision.
`QuantizedExperts` replaces such a module with one quantized linear per expert and projection, made by the
same function as every other Linear of the block (`models/quant.py`, or bitsandbytes' on CUDA), and runs
the eager routing loop of transformers' experts: each expert hit by some token runs on those tokens only,
and its output is added in with the token's routing weight. Only the expert layout that loop is written
for is accepted; any other is refused by name rather than left in full precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class UnsupportedExpertsError(ValueError):
    """A block's experts use a layout that QuantizedExperts does not run."""


# What transformers' experts decorator records about a layout, and the value this module is written for.
_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
           "has_post_expert_norm": False}


def is_fused_experts(module: nn.Module) -> bool:
    """Whether `module` holds experts as 3-D weights (transformers' fused layout)."""
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear whose weight is `weight` (out, in), without allocating another one."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


class QuantizedExperts(nn.Module):
    """The experts of one MoE block, each projection a quantized linear. Called like the module it replaces:
    `(hidden (tokens, hidden), top_k_index (tokens, k), top_k_weights (tokens, k)) -> (tokens, hidden)`."""

    def __init__(self, experts: nn.Module, quantize: Callable[[nn.Linear], nn.Module]):
        super().__init__()
        name = type(experts).__name__
        layout = {k: getattr(experts, k, None) for k in _LAYOUT}
        if layout != _LAYOUT or set(dict(experts.named_parameters(recurse=False))) != {"gate_up_proj", "down_proj"}:
            raise UnsupportedExpertsError(f"cannot quantize {name}: its expert layout {layout} is not the one "
                                          f"supported ({_LAYOUT}, weights gate_up_proj and down_proj)")
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn
        self.gate_up = nn.ModuleList(quantize(_linear(w)) for w in experts.gate_up_proj.detach())
        self.down = nn.ModuleList(quantize(_linear(w)) for w in experts.down_proj.detach())

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        # One slot past the experts: expert-parallel routing marks experts held elsewhere with that index.
        hits = torch.zeros(self.num_experts + 1, dtype=torch.bool, device=hidden.device)
        hits[top_k_index.flatten()] = True
        for expert in hits[: self.num_experts].nonzero().flatten().tolist():
            token, slot = torch.where(top_k_index == expert)
            gate, up = self.gate_up[expert](hidden[token]).chunk(2, dim=-1)
            y = self.down[expert](self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out
