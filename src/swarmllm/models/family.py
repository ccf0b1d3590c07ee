"""The small table of per-family differences that the generic span runner needs.

Every supported decoder family runs through the same code path (`swarmllm.models.span`). What differs is
only *which attention pattern each layer uses* and *whether the rotary embedding depends on that
pattern*. Keeping those facts here, as data, is what lets us avoid one wrapper class per model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

FULL = "full_attention"
SLIDING = "sliding_attention"

# Mask builders by layer type. Each one sizes the mask from the cache of the layer index it is given.
MASK_BUILDERS: dict[str, Callable[..., torch.Tensor | None]] = {
    FULL: create_causal_mask,
    SLIDING: create_sliding_window_causal_mask,
}


@dataclass(frozen=True)
class Family:
    """Per-family facts, keyed by `config.model_type`."""

    model_type: str
    # Mistral marks sliding-window attention with `config.sliding_window` instead of `layer_types`.
    sliding_from_window: bool = False
    # What transformers runs the family's attention with by default: Gemma 2 softcaps its attention scores,
    # which its code does in eager attention only (it refuses sdpa).
    attention: str = "sdpa"
    # Where transformers keeps things, within the base model (`model.base_model`): the stack of blocks, the
    # embeddings and the final norm (the last two run on the client), and the keyword a block takes its
    # cache by (GPT-NeoX's blocks still call it `layer_past`).
    layers: str = "layers"
    embeddings: str = "embed_tokens"
    norm: str = "norm"
    cache_arg: str = "cache"


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama"),
        Family("mistral", sliding_from_window=True),
        Family("qwen2"),
        Family("qwen3"),
        Family("gemma2", attention="eager"),
        Family("gemma3_text"),
        Family("gemma3"),
        # Phi-3 keeps its projections fused (qkv_proj, gate_up_proj) in the checkpoint and the model alike.
        Family("phi3", sliding_from_window=True),
        # Mixture-of-experts blocks: their checkpoints store one tensor per expert, which load_span fuses
        # as transformers does (models/conversion.py).
        Family("mixtral", sliding_from_window=True),
        Family("qwen2_moe"),
        Family("qwen3_moe", sliding_from_window=True),
        # Pythia and GPT-NeoX-20B: fused query_key_value projections, partial rotary, parallel residuals.
        Family("gpt_neox", embeddings="embed_in", norm="final_layer_norm", cache_arg="layer_past"),
    )
}


class UnsupportedModelError(ValueError):
    """Raised for a model family that the generic runner has not been checked against."""


# Rotary tables that transformers recomputes in every forward pass from the longest position in it: "dynamic"
# NTK scaling and Phi-3's "longrope". A server's one rotary module would then depend on which sessions share
# a pass and on earlier passes, and a session's cached keys would mix two tables.
_SEQUENCE_DEPENDENT_ROPE = ("dynamic", "longrope")


def family_of(config: PretrainedConfig) -> Family:
    """The family's row; raises UnsupportedModelError, naming what is supported, for an unknown model type or
    a rotary scaling that spans cannot run exactly."""
    try:
        family = FAMILIES[config.model_type]
    except KeyError:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            f"model type {config.model_type!r} is not supported yet (supported: {supported})"
        ) from None
    for rope_type in _rope_types(config):
        if any(kind in rope_type for kind in _SEQUENCE_DEPENDENT_ROPE):
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported yet: its rotary tables change with the longest position "
                "in each pass, which sessions batched on one server would share (static rope types are supported)"
            )
    return family


def _rope_types(config: PretrainedConfig) -> list[str]:
    """The rope types a config uses: one, or one per layer type (Gemma 3 nests them)."""
    params = getattr(config, "rope_parameters", None) or {}
    nested = [p for p in params.values() if isinstance(p, dict)]
    return [str(p.get("rope_type", "default")) for p in (nested or [params])]


def default_attention(config: PretrainedConfig) -> str:
    """The attention implementation transformers picks for the family (sdpa for one not listed: it is refused
    by `family_of` where that matters)."""
    family = FAMILIES.get(config.model_type)
    return family.attention if family is not None else "sdpa"


def layer_type(config: PretrainedConfig, layer_idx: int) -> str:
    """Attention pattern of one layer: 'full_attention' or 'sliding_attention'."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return types[layer_idx]
    if family_of(config).sliding_from_window and getattr(config, "sliding_window", None) is not None:
        return SLIDING
    return FULL


def rotary_takes_layer_type(rotary: torch.nn.Module) -> bool:
    """Gemma 3 keeps one rotary table per layer type (different bases for local and global layers)."""
    return "layer_type" in inspect.signature(rotary.forward).parameters
