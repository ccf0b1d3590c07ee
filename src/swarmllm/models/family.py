"""The small table of per-family differences that the generic span runner needs.

Every supported decoder family runs through the same code path (`swarmllm.models.span` on servers,
`swarmllm.models.ends` on clients). What differs is kept here as data: where transformers keeps the blocks
and the client's modules, which position information the blocks take (rotary tables, ALiBi biases, or none:
OPT adds learned positions on the client), which attention pattern each layer uses, and the few keywords
that differ. That is what lets us avoid one wrapper class per model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

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
    # Whether the family's attention gets the keys and values exactly as the cache hands them back: then a
    # server's batched pass can attend per session over each session's cache in place (server/ragged.py).
    # DeepSeek's latent attention expands what it caches into keys and values first.
    attention_reads_cache: bool = True
    # The module that holds the blocks and the client's modules, and that the causal LM's head calls: the base
    # model itself (`model.base_model`), or a module within it (OPT's `decoder`). The paths below are within it:
    # where transformers keeps the stack of blocks, the embeddings and the final norm (the last two run on the
    # client), and the keyword a block takes its cache by (GPT-NeoX's blocks still call it `layer_past`).
    root: str = ""
    layers: str = "layers"
    embeddings: str = "embed_tokens"
    norm: str = "norm"
    cache_arg: str = "cache"
    # What tells a block where its tokens are: a rotary table (the server builds it from position ids), an
    # ALiBi bias (the server builds it from the keys' 2D mask, with the modeling module's own builder), or
    # nothing, when the client adds learned position embeddings to the hidden states.
    positions: Literal["rotary", "alibi", "none"] = "rotary"
    # Client modules, within the base model, that run after the embeddings and before the first block, in
    # order (BLOOM's embedding layernorm, OPT's project_in), and after the final norm (OPT's project_out); the
    # learned position embeddings added there (OPT's, which take `position_ids`). A config may leave one out
    # (transformers then holds None: OPT without a projection).
    before: tuple[str, ...] = ()
    learned_positions: str | None = None
    after: tuple[str, ...] = ()


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
        # BLOOM: ALiBi instead of rotary, a layernorm after the embeddings, blocks in `.h` returning tuples.
        Family("bloom", attention="eager", layers="h", embeddings="word_embeddings", norm="ln_f",
               cache_arg="layer_past", positions="alibi", before=("word_embeddings_layernorm",)),
        # Falcon 7B (multi-query, parallel attention) and the 40B/180B "new decoder architecture" (grouped
        # query heads, two layernorms per block); rotary only (falcon-rw's ALiBi is refused in family_of).
        Family("falcon", layers="h", embeddings="word_embeddings", norm="ln_f", cache_arg="layer_past"),
        # OPT: learned positions (offset 2) and optional projections around the blocks, all on the client.
        # DeepSeek-V3: multi-head latent attention (its cache holds the compressed latent), dense first blocks,
        # then routed experts beside a shared one, with group-limited routing.
        Family("deepseek_v3", attention_reads_cache=False),
        Family("opt", root="decoder", norm="final_layer_norm", positions="none", before=("project_in",),
               learned_positions="embed_positions", after=("project_out",)),
    )
}


class UnsupportedModelError(ValueError):
    """Raised for a model family that the generic runner has not been checked against."""


# Rotary tables that transformers recomputes in every forward pass from the longest position in it and from
# earlier passes ("dynamic" NTK scaling keeps the longest length seen): a server's one rotary module would
# depend on which sessions shared it before. Phi-3's "longrope" only picks one of two tables by the pass's
# longest position, which spans reproduce per session step (see `longrope_limit`).
_SEQUENCE_DEPENDENT_ROPE = ("dynamic",)
LONGROPE = "longrope"


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
    if config.model_type == "falcon" and config.alibi:
        raise UnsupportedModelError("Falcon with ALiBi (falcon-rw) is not supported yet: only rotary Falcon models are")
    types = _rope_types(config)
    for rope_type in types:
        if any(kind in rope_type for kind in _SEQUENCE_DEPENDENT_ROPE):
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported yet: its rotary tables change with the longest position "
                "of every pass seen so far, which sessions batched on one server would share (static rope types "
                "and longrope are supported)"
            )
    if LONGROPE in types and len(types) > 1:
        raise UnsupportedModelError("longrope is supported for a model with one rotary table, not per layer type")
    return family


def longrope_limit(config: PretrainedConfig) -> int | None:
    """For longrope (Phi-3 128k): `original_max_position_embeddings`. A pass whose longest position id reaches
    it uses the long table for all its tokens, a shorter pass the short one; and transformers' Phi-3 generate
    recomputes the whole cache when a sequence grows past it (InferenceSession does the same). None for every
    other rope type."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type") != LONGROPE:
        return None
    return int(params["original_max_position_embeddings"])


def _rope_types(config: PretrainedConfig) -> list[str]:
    """The rope types a config uses: one, or one per layer type (Gemma 3 nests them)."""
    params = getattr(config, "rope_parameters", None) or {}
    nested = [p for p in params.values() if isinstance(p, dict)]
    return [str(p.get("rope_type", "default")) for p in (nested or [params])]


def root_of(model: torch.nn.Module, family: Family) -> torch.nn.Module:
    """The module of a transformers causal LM that holds the family's blocks and client modules."""
    return model.base_model.get_submodule(family.root) if family.root else model.base_model


def stack_path(model: torch.nn.Module, family: Family) -> str:
    """Where a transformers causal LM keeps its blocks, from the model itself (`model.layers`, BLOOM's
    `transformer.h`, OPT's `model.decoder.layers`): what peft files name them by."""
    return ".".join(p for p in (model.base_model_prefix, family.root, family.layers) if p)


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
