"""Checkpoint tensors -> the tensors a transformers model holds, with transformers' own conversion rules.

transformers 5 keeps some weights in another layout than the checkpoints that ship them. Mixtral's and
Qwen-MoE's checkpoints store one tensor per expert and projection (`block_sparse_moe.experts.3.w1.weight`,
`mlp.experts.3.gate_proj.weight`); the model holds all experts of a block in two fused 3-D tensors
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), and `from_pretrained` renames and stacks them on the
way in, following the family's `conversion_mapping`. A span builds its blocks from checkpoint tensors
itself (it reads only its own blocks), so it applies the same rules to those tensors: the mapping is
transformers', read from the model, never restated here.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)


def conversions_for(meta_model: nn.Module) -> list:
    """The model's renamings and converters, as `from_pretrained` would apply them (the model may be on
    the meta device)."""
    return get_model_conversion_mapping(meta_model)


def convert(tensors: dict[str, torch.Tensor], transforms: list) -> dict[str, torch.Tensor]:
    """`tensors` by checkpoint key -> by the model's own key, renamed and fused as `transforms` say.

    Tensors that several keys fuse into (one expert tensor from every expert's) must all be in `tensors`:
    call this with every checkpoint tensor of a block at once."""
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    fused: dict[str, WeightConverter] = {}
    out: dict[str, torch.Tensor] = {}
    # Natural order, as from_pretrained reads them: experts stack as 0, 1, ..., 10, not 0, 1, 10, ...
    for key in sorted(tensors, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            out[target] = tensors[key]
            continue
        # One fresh converter per fused tensor: a converter collects its inputs in itself.
        converter = fused.setdefault(target, copy.deepcopy(by_pattern[pattern]))
        converter.add_tensor(target, key, pattern, lambda t=tensors[key]: t)
    for target, converter in fused.items():
        for name, value in converter.convert(target).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out
