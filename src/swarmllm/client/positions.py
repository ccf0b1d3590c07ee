"""Position ids for callers that give none, as transformers and Petals default them."""

from __future__ import annotations

import torch


def default_positions(hidden: torch.Tensor, past: int = 0, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, seq) position ids of `hidden` (batch, seq, ...) following `past` tokens: consecutive without a
    mask; with a (batch, past + seq) padding mask, counting real tokens only (padding sits at position 0), the
    rule of transformers' generate."""
    batch, seq = hidden.shape[:2]
    if attention_mask is None:
        return torch.arange(past, past + seq, device=hidden.device).expand(batch, -1)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, positions.shape[1] - seq :].to(hidden.device)
