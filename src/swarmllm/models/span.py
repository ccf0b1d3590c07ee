"""One generic runner for a contiguous span of transformer blocks.

A `Span` holds blocks `[start, end)` of a decoder and runs them exactly as the full transformers model
would: same decoder-layer classes, same rotary tables, same mask builders. Chaining spans that cover all
blocks therefore reproduces the full model's hidden states bit for bit.

Loading reads only the span's own tensors from safetensors (`safe_open` is lazy), so a server holding 10
of 30 blocks holds about a third of the block weights and never materializes the whole model.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.cache_utils import DynamicCache

from swarmllm.models.conversion import conversions_for, convert
from swarmllm.models.device import trim_heap
from swarmllm.models.family import (
    MASK_BUILDERS,
    Family,
    default_attention,
    family_of,
    layer_type,
    longrope_limit,
    root_of,
    rotary_takes_layer_type,
)
from swarmllm.models.quant import QuantMode, quantize_blocks
from swarmllm.models.shards import LAYER_KEY as _LAYER_KEY
from swarmllm.models.shards import read_tensors

logger = logging.getLogger(__name__)


class SpanError(ValueError):
    """A span that is out of range or inverted."""


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder config (multimodal checkpoints nest it); attention is pinned to what transformers picks by
    default for the family (sdpa, or eager where it has no sdpa path: Gemma 2), so that servers and the local
    reference run the same kernel."""
    config = config.get_text_config(decoder=True)
    if getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = default_attention(config)
    return config


# How attention may be computed in a span: what the batched server path builds masks for (server/inference.py).
ATTENTIONS = ("sdpa", "eager")


def attention_of(config: PretrainedConfig) -> str:
    """The config's attention implementation; others than ATTENTIONS are refused by name."""
    attention = config._attn_implementation
    if attention not in ATTENTIONS:
        raise SpanError(f"attention implementation {attention!r} is not supported by spans (supported: "
                        f"{', '.join(ATTENTIONS)})")
    return attention


def load_config(model_dir: Path) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(model_dir)
    refuse_prequantized(config)
    return text_config(config)


def refuse_prequantized(config: PretrainedConfig) -> None:
    """A checkpoint stored quantized (DeepSeek-V3's FP8 with block scales, GPTQ, AWQ) keeps codes under the
    weights' own names: read as plain weights they would load without their scales and compute garbage, so
    they are refused by name. Servers quantize float checkpoints themselves (`--quant`)."""
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
        raise SpanError(f"checkpoints stored quantized ({method or 'quantization_config'}) are not supported: use a "
                        "float16/bfloat16/float32 checkpoint (servers quantize it with --quant)")


def check_span(start: int, end: int, num_blocks: int) -> None:
    if not (0 <= start < end <= num_blocks):
        raise SpanError(f"invalid span {start}:{end}: the model has blocks 0:{num_blocks}, and start < end is required")


@dataclass(frozen=True)
class _Skeleton:
    decoder_cls: type[nn.Module]
    rotary: nn.Module | None  # None where blocks take no rotary table (family.positions)
    conversions: list  # transformers' checkpoint-key renamings and fusions for this model (models/conversion.py)


def _skeleton(config: PretrainedConfig) -> _Skeleton:
    """Find the decoder-layer class and build the rotary module, without allocating any weights."""
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    family = family_of(config)
    root = root_of(meta, family)
    decoder_cls = type(root.get_submodule(family.layers)[0])
    # Rotary tables are computed, not loaded, so they are built for real (on the CPU) from the config.
    rotary = type(root.rotary_emb)(config) if family.positions == "rotary" else None
    return _Skeleton(decoder_cls=decoder_cls, rotary=rotary, conversions=conversions_for(meta))


def meta_block(config: PretrainedConfig, idx: int) -> nn.Module:
    """Block `idx` on the meta device: its module structure and shapes, without weights."""
    return meta_blocks(config, [idx])[0]


def meta_blocks(config: PretrainedConfig, indices: list[int] | range) -> list[nn.Module]:
    """Blocks `indices` on the meta device (blocks of one model may differ: DeepSeek's first ones are dense)."""
    decoder_cls = _skeleton(config).decoder_cls
    with torch.device("meta"):
        return [decoder_cls(config, idx) for idx in indices]


class Span(nn.Module):
    """Blocks `[start, end)` of a decoder, runnable with or without an attention cache.

    Guarantee: for any inputs, `Span(a, b)` followed by `Span(b, c)` gives the same hidden states as the
    full model's blocks `a..c` given the same position ids, 2D padding mask and cache contents.
    """

    def __init__(self, config: PretrainedConfig, start: int, end: int, layers: list[nn.Module], rotary: nn.Module | None):
        super().__init__()
        check_span(start, end, config.num_hidden_layers)
        attention_of(config)
        self.config, self.start, self.end = config, start, end
        self.family: Family = family_of(config)
        self.layers = nn.ModuleList(layers)
        self.rotary = rotary
        self.types = [layer_type(config, i) for i in range(start, end)]
        self._rotary_per_type = rotary is not None and rotary_takes_layer_type(rotary)
        self._longrope = longrope_limit(config)
        self._alibi = _alibi_builder(type(layers[0])) if self.family.positions == "alibi" else None
        # Falcon's blocks take `alibi` (None for its rotary models) as a required argument.
        self._takes_alibi = "alibi" in inspect.signature(type(layers[0]).forward).parameters

    def new_cache(self) -> DynamicCache:
        """An empty cache for one session. Layers outside the span stay empty and cost nothing."""
        return DynamicCache(config=self.config)

    def forward(
        self,
        hidden: torch.Tensor,  # (batch, seq, hidden)
        position_ids: torch.Tensor,  # (batch, seq)
        attention_mask: torch.Tensor | None = None,  # (batch, past + seq) 1 = real token, 0 = padding
        cache: DynamicCache | None = None,
        prompts: torch.Tensor | None = None,  # (blocks, batch or 1, prefix, hidden) deep prompt tuning
        masks: dict[str, torch.Tensor | None] | None = None,  # prebuilt 4D masks per layer type (batched steps)
        keys: torch.Tensor | None = None,  # (batch, kv_len) with prebuilt masks: 1 = a real key (ALiBi's positions)
        tables: torch.Tensor | None = None,  # (batch,) longest position of each row's whole step (longrope)
    ) -> torch.Tensor:
        prebuilt = masks is not None
        masks, rotary = dict(masks or {}), {}
        for offset, lt in enumerate(self.types):
            if lt in rotary:
                continue
            args = (lt,) if self._rotary_per_type else ()
            rotary[lt] = self._rotary_tables(hidden, position_ids, args, tables) if self.rotary is not None else None
            if prebuilt:
                continue
            # The mask must be sized from the cache of this span's own first layer of this type: layer 0's
            # cache lives on another server and is empty here (a chunk after decode would silently break).
            masks[lt] = MASK_BUILDERS[lt](
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                layer_idx=self.start + offset,
            )
        extra = {self.family.cache_arg: cache}
        if self._takes_alibi:
            extra["alibi"] = self._alibi_bias(hidden, attention_mask if keys is None else keys, cache)
        for i, (layer, lt) in enumerate(zip(self.layers, self.types)):
            if prompts is not None:
                # Deep prompts are added to the prefix positions before every block (out of place, so
                # autograd sees both the hidden states and the prompts).
                n = prompts.shape[2]
                hidden = torch.cat([hidden[:, :n] + prompts[i].to(hidden.dtype), hidden[:, n:]], dim=1)
            out = layer(
                hidden,
                attention_mask=masks[lt],
                position_embeddings=rotary[lt],
                position_ids=position_ids,
                use_cache=cache is not None,
                **extra,
            )
            hidden = out[0] if isinstance(out, tuple) else out  # BLOOM and Falcon return (hidden, attentions)
        return hidden

    def _rotary_tables(self, hidden: torch.Tensor, position_ids: torch.Tensor, args: tuple,
                       tables: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for the pass. Longrope picks its long or short table by the longest position of the pass
        it is called on; a server's pass may hold several sessions' steps, or a chunk of one step, so each row
        gets the table its own whole step (what the client ran as one pass) picks: rows of each kind are run
        with one more position that forces the choice (the step's longest, or `limit` for long ones), which is
        then dropped."""
        if self._longrope is None or tables is None:
            return self.rotary(hidden, position_ids, *args)
        limit = self._longrope
        long = tables + 1 > limit
        cos = sin = None
        for kind in (False, True):
            rows = long == kind
            if not bool(rows.any()):
                continue
            pin = torch.full((int(rows.sum()), 1), limit if kind else 0, dtype=position_ids.dtype, device=position_ids.device)
            c, s = self.rotary(hidden[rows], torch.cat([position_ids[rows], pin], dim=1), *args)
            if cos is None:
                cos = c.new_empty((hidden.shape[0], *c[:, :-1].shape[1:]))
                sin = torch.empty_like(cos)
            cos[rows], sin[rows] = c[:, :-1], s[:, :-1]
        return cos, sin

    def _alibi_bias(self, hidden: torch.Tensor, keys: torch.Tensor | None, cache) -> torch.Tensor | None:
        """ALiBi's (batch * heads, 1, kv_len) bias, from the 2D mask over all keys (past and new), as the full
        model builds it; no mask means every key is real."""
        if self._alibi is None:
            return None
        if keys is None:
            past = cache.get_seq_length(self.start) if cache is not None else 0
            keys = torch.ones(hidden.shape[0], past + hidden.shape[1], dtype=torch.long, device=hidden.device)
        return self._alibi(keys, self.config.num_attention_heads, dtype=hidden.dtype)

    @functools.cached_property
    def cache_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, width) of the keys and of the values one block stores in its cache per token, measured: the
        first block runs on the meta device (no memory, no arithmetic) with a cache that records what it is
        given. Families differ (Falcon's 40B/180B blocks store keys for every query head in some transformers
        releases and grouped ones in others; DeepSeek's store a compressed latent), so no formula is trusted."""
        with torch.device("meta"):
            block = type(self.layers[0])(self.config, self.start)
            rotary = copy.deepcopy(self.rotary).to("meta") if self.rotary is not None else None
        probe = Span(self.config, self.start, self.start + 1, [block], rotary)
        hidden = torch.zeros(1, 2, self.config.hidden_size, device="meta")
        position_ids = torch.arange(2, device="meta")[None]
        masks = {lt: torch.zeros(1, 1, 2, 2, device="meta") for lt in set(probe.types)}
        recorder = _CacheRecorder()
        try:
            probe(hidden, position_ids, cache=recorder, masks=masks, keys=torch.ones(1, 2, dtype=torch.long, device="meta"))
        except _Recorded:
            return recorder.shapes
        raise SpanError(f"blocks of {self.config.model_type} stored nothing in their cache")

    @property
    def cache_elements(self) -> int:
        """Elements of keys and values one block stores in its cache per token."""
        (kh, kw), (vh, vw) = self.cache_shapes
        return kh * kw + vh * vw

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the first floating-point weight (quantized linears keep integer codes
        in buffers, their norms and biases stay in this dtype)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        """Where the blocks live: every tensor a server makes or receives for them is moved here."""
        return next(self.layers.parameters()).device

    def weight_bytes(self) -> int:
        """Bytes of the blocks' weights as held: parameters and buffers (quantized codes and scales)."""
        tensors = [*self.layers.parameters(), *self.layers.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)


class _Recorded(Exception):
    """The block has stored its keys and values: the rest of it need not run."""


class _CacheRecorder:
    """Stands in for a cache during `Span.cache_shapes`: keeps the shape of what a block stores per token, then
    stops the block (its MLP or experts need not run, even on the meta device)."""

    shapes = ((0, 0), (0, 0))

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # (batch, heads, tokens, width) each; keys and values may differ in heads and width (latents).
        self.shapes = ((key.shape[1], key.shape[3]), (value.shape[1], value.shape[3]))
        raise _Recorded


def _alibi_builder(decoder_cls: type[nn.Module]) -> Callable[..., torch.Tensor]:
    """The family's own ALiBi builder, `build_alibi_tensor(mask, num_heads, dtype)` in its modeling module."""
    return inspect.getmodule(decoder_cls).build_alibi_tensor


def load_span(
    model_dir: Path,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    *,
    quant: QuantMode = "none",
    device: torch.device | str = "cpu",
) -> Span:
    """Load blocks `[start, end)` from a local folder onto `device`, in `dtype`, with their linear weights
    quantized as `quant` says (see models/quant.py), reading only their tensors.

    Blocks are built one at a time (read, cast, move, quantize), so the peak memory is the finished blocks
    plus one block in full precision, and what the span holds afterwards follows the quantized size: no
    tensor keeps the checkpoint's file mapping alive, and freed heap pages go back to the OS.
    """
    config = load_config(model_dir)
    family_of(config)  # fail early, with the list of supported families
    check_span(start, end, config.num_hidden_layers)
    skeleton = _skeleton(config)
    layers = [_load_block(model_dir, config, skeleton, i, dtype, device, quant) for i in range(start, end)]
    rotary = skeleton.rotary.to(device) if skeleton.rotary is not None else None
    return Span(config, start, end, layers, rotary).eval()


def _load_block(
    model_dir: Path, config: PretrainedConfig, skeleton: _Skeleton, idx: int,
    dtype: torch.dtype, device: torch.device | str, quant: QuantMode,
) -> nn.Module:
    """Block `idx`, built from its own tensors only, then cast, moved and quantized."""

    def want(key: str) -> str | None:
        m = _LAYER_KEY.match(key)
        return key if m and int(m["idx"]) == idx else None

    with torch.device("meta"):
        layer = skeleton.decoder_cls(config, idx)
    stored = convert(read_tensors(model_dir, want), skeleton.conversions)  # e.g. per-expert keys -> fused
    found = _decoder_tensors(stored, set(layer.state_dict()), idx, model_dir)
    del stored
    # safetensors returns tensors that live in its mapping of the whole file, and mapped pages a process
    # has touched count in its RSS for as long as any tensor keeps the mapping alive (one norm weight is
    # enough). So every tensor is copied out (`copy=True`, even when the dtype already matches) and the
    # mapping goes with `found`. Measured on SmolLM2: without the copy 10 int8 blocks held ~120 MiB of
    # float32 file pages besides their codes; see docs/quantization.md.
    own = {k: v.to(dtype if v.is_floating_point() else v.dtype, copy=True) for k, v in found.items()}
    del found
    layer.load_state_dict(own, strict=False, assign=True)
    del own
    layer = layer.to(device=device, dtype=dtype).eval().requires_grad_(False)
    quantize_blocks([layer], quant)  # drops the block's float linear weights
    # glibc keeps most freed heap pages (here: the float weights just dropped, and quantization's
    # temporaries) and reuses them only in part. Measured on SmolLM2, 10 int8 blocks: RSS +200 MiB over
    # 1 block without trimming, +31 MiB with it; the peak was 623 MiB trimming once at the end, 481 MiB
    # trimming after every block.
    trim_heap()
    return layer


def _decoder_tensors(tensors: dict[str, torch.Tensor], names: set[str], idx: int, model_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of decoder block `idx`, by their names within the block, from every checkpoint key of the
    form `<prefix>layers.<idx>.<name>`. A multimodal checkpoint (Gemma 3 4B and up) has a second stack, the
    vision tower's `encoder.layers.<idx>`, with names such as `self_attn.q_proj.weight` in common: the
    decoder's stack is the prefix whose names cover every tensor a decoder block holds."""
    by_prefix: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _LAYER_KEY.match(key)
        by_prefix.setdefault(m["prefix"], {})[m["rest"]] = tensor
    fits = [prefix for prefix, group in by_prefix.items() if names <= set(group)]
    if len(fits) == 1:
        return by_prefix[fits[0]]
    if fits:
        raise ValueError(f"block {idx} of {model_dir}: several stacks of layers fit a decoder block ({', '.join(fits)})")
    closest = min(by_prefix.values(), key=lambda group: len(names - set(group)), default={})
    raise ValueError(f"block {idx} is missing weights in {model_dir}: {sorted(names - set(closest))[:5]}")


def span_from_model(model: nn.Module, start: int, end: int) -> Span:
    """A span that shares the blocks of an already loaded transformers model (tests, local blocks)."""
    config = text_config(model.config)
    family = family_of(config)
    root = root_of(model, family)
    stack = root.get_submodule(family.layers)
    rotary = root.rotary_emb if family.positions == "rotary" else None
    return Span(config, start, end, list(stack[start:end]), rotary)
