"""What a client runs before and after the blocks, for any family: the embeddings, then the family's modules
before the first block (BLOOM's embedding layernorm, OPT's projection and learned positions), and after the
last block the final norm and whatever follows it (OPT's projection back).

The functions take any module that holds the family's client modules at transformers' own paths
(`models/family.py`): the transformers base model itself (local references, tests) or the client's
`DistributedBackbone`, which keeps them at the same paths so that checkpoint keys stay transformers'.
"""

from __future__ import annotations

import torch
from torch import nn

from swarmllm.models.family import Family


def submodule(root: nn.Module, path: str) -> nn.Module | None:
    """`root`'s module at the dotted `path`, or None where transformers holds None (OPT without projections or
    without a final norm)."""
    module: nn.Module | None = root
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def client_paths(family: Family) -> list[str]:
    """Paths, within the base model, of every module a client runs (blocks excluded)."""
    optional = [family.learned_positions] if family.learned_positions else []
    return [family.embeddings, *family.before, *optional, family.norm, *family.after]


def enter(root: nn.Module, family: Family, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """From input embeddings (batch, seq, embed) to the first block's hidden states (batch, seq, hidden)."""
    hidden = embeds
    for path in family.before:
        module = submodule(root, path)
        if module is not None:
            hidden = module(hidden)
    if family.learned_positions:
        # OPT's learned positions take the position ids themselves (and add their own offset of 2).
        hidden = hidden + submodule(root, family.learned_positions)(None, 0, position_ids=position_ids).to(hidden.dtype)
    return hidden


def leave(root: nn.Module, family: Family, hidden: torch.Tensor) -> torch.Tensor:
    """From the last block's hidden states to what the LM head takes."""
    for path in (family.norm, *family.after):
        module = submodule(root, path)
        if module is not None:
            hidden = module(hidden)
    return hidden
