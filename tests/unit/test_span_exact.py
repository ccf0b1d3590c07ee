"""Chaining spans reproduces the full transformers model exactly, for every supported family.

Tiny random configs (2..4 layers, width 32): no downloads. Each case checks prefill, single-token decode
and a multi-token chunk after decode, with left padding in a batch of 2, against the full model's own
forward with its own cache.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    DeepseekV3Config,
    DynamicCache,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from swarmllm.models.ends import enter, leave
from swarmllm.models.family import FAMILIES, UnsupportedModelError, family_of, root_of
from swarmllm.models.span import SpanError, check_span, span_from_model, text_config

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)

LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=8,
                short_factor=[1.0, 1.1, 1.3, 1.6], long_factor=[1.5, 2.5, 4.0, 8.0])

CONFIGS = {
    "llama": lambda: LlamaConfig(num_hidden_layers=4, **COMMON),
    "mistral": lambda: MistralConfig(num_hidden_layers=4, sliding_window=5, **COMMON),
    "qwen2": lambda: Qwen2Config(num_hidden_layers=4, **COMMON),
    "qwen3": lambda: Qwen3Config(num_hidden_layers=4, **COMMON),
    # Gemma 2 alternates sliding and global layers too, and softcaps its attention scores (eager attention only).
    "gemma2": lambda: Gemma2Config(num_hidden_layers=4, sliding_window=4, **COMMON),
    # Gemma 3 alternates sliding and global layers, with a rotary table per layer type; a window of 4
    # makes the sliding mask matter within these short sequences.
    "gemma3": lambda: Gemma3TextConfig(
        num_hidden_layers=4, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2, **COMMON
    ),
    # Phi-3: fused qkv_proj and gate_up_proj (its pad token must lie in the tiny vocabulary).
    "phi3": lambda: Phi3Config(num_hidden_layers=4, pad_token_id=0, **COMMON),
    # Phi-3 128k's longrope: a short table for passes whose positions stay below 8, a long one past it.
    "phi3_longrope": lambda: Phi3Config(num_hidden_layers=4, pad_token_id=0, original_max_position_embeddings=8,
                                        rope_parameters=LONGROPE, **COMMON),
    # Mixtures of experts: 4 experts, 2 per token, so that routing picks different experts per token.
    "mixtral": lambda: MixtralConfig(num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2, **COMMON),
    # Qwen 2 MoE adds a gated shared expert beside the routed ones.
    "qwen2_moe": lambda: Qwen2MoeConfig(num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=64, **COMMON),
    # GPT-NeoX: fused query_key_value, rotary on a quarter of each head, parallel residual; no head_dim field.
    "gpt_neox": lambda: GPTNeoXConfig(num_hidden_layers=4, vocab_size=97, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25),
    "qwen3_moe": lambda: Qwen3MoeConfig(num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        **COMMON),
    # BLOOM: ALiBi biases instead of rotary, a layernorm after the embeddings, fused query_key_value.
    "bloom": lambda: BloomConfig(n_layer=4, vocab_size=97, hidden_size=32, n_head=4),
    # Falcon 7B's layout: multi-query attention (one key/value head), parallel attention and MLP.
    "falcon": lambda: FalconConfig(num_hidden_layers=4, vocab_size=97, hidden_size=32, num_attention_heads=4,
                                   multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                   max_position_embeddings=128),
    # Falcon 40B/180B's "new decoder architecture": grouped key/value heads, separate attention and MLP norms.
    "falcon_new": lambda: FalconConfig(num_hidden_layers=4, vocab_size=97, hidden_size=32, num_attention_heads=4,
                                       num_kv_heads=2, new_decoder_architecture=True, max_position_embeddings=128),
    # DeepSeek-V3: latent attention (low-rank queries, a compressed key/value latent and a shared rotary key,
    # value heads wider than the rotary part), a dense first block, then 8 routed experts in 2 groups of which
    # tokens may use 1, beside a shared expert.
    "deepseek_v3": lambda: DeepseekV3Config(
        num_hidden_layers=4, vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=128, pad_token_id=0),
    # OPT: learned positions, and (as in OPT-350m) projections between a narrower embedding and the blocks.
    "opt": lambda: OPTConfig(num_hidden_layers=4, vocab_size=97, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                             word_embed_proj_dim=16, max_position_embeddings=128, pad_token_id=0),
}


def _eager_only(name: str) -> bool:
    """Gemma 2 (softcapping) and BLOOM (ALiBi) have eager attention only."""
    return FAMILIES[CONFIGS[name]().model_type].attention == "eager"


def _model(name: str, attention: str = "sdpa") -> torch.nn.Module:
    """The family's tiny model, with `attention` where the family runs it."""
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config._attn_implementation = "eager" if _eager_only(name) else attention
    return AutoModelForCausalLM.from_config(config).eval()


def first_hidden(model, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """What the first block takes: the embeddings after the family's client modules (models/ends.py)."""
    family = family_of(text_config(model.config))
    return enter(root_of(model, family), family, embeds, position_ids)


def final_norm(model):
    """The family's client modules after the blocks (the final norm, and OPT's projection)."""
    family = family_of(text_config(model.config))
    return lambda hidden: leave(root_of(model, family), family, hidden)


def skip_unrun(name: str, attention: str) -> None:
    if _eager_only(name) and attention != "eager":
        pytest.skip(f"{name} runs eager attention only")


def _run_full(model, embeds, position_ids, mask, cache):
    out = model.base_model(
        inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask, cache=cache, use_cache=True
    )
    return out.last_hidden_state


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chained_spans_equal_full_model(name: str, attention: str) -> None:
    skip_unrun(name, attention)
    _check_chained(_model(name, attention), name)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
])
def test_static_rope_scalings_run_exactly(rope: dict) -> None:
    """Llama 3.x's rope scaling (and linear, YaRN): tables fixed by the config, built once per server."""
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=4, rope_parameters={"rope_theta": 10000.0, **rope}, **COMMON)
    config._attn_implementation = "sdpa"
    _check_chained(AutoModelForCausalLM.from_config(config).eval(), rope["rope_type"])


def _check_chained(model, name: str) -> None:
    n = model.config.num_hidden_layers
    spans = [span_from_model(model, 0, 1), span_from_model(model, 1, 3), span_from_model(model, 3, n)]
    norm = final_norm(model)
    caches = [s.new_cache() for s in spans]
    full_cache = DynamicCache(config=model.config)

    # Batch of 2 with left padding on the second row. Steps: prefill 6, decode 1, chunk of 3, decode 1.
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    steps = [6, 1, 3, 1]
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, sum(steps)))
    past = 0
    for seq in steps:
        if past:
            mask = torch.cat([mask, torch.ones(2, seq, dtype=mask.dtype)], dim=1)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, past : past + seq]
        embeds = model.get_input_embeddings()(ids[:, past : past + seq])
        want = _run_full(model, embeds, position_ids, mask, full_cache)
        hidden = first_hidden(model, embeds, position_ids)
        for span, cache in zip(spans, caches):
            hidden = span(hidden, position_ids, mask, cache)
        got = norm(hidden)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name}: step of {seq} after {past}")
        past += seq


def test_span_without_cache_equals_full_forward() -> None:
    model = _model("llama")
    ids = torch.randint(0, 97, (2, 7))
    embeds = model.get_input_embeddings()(ids)
    position_ids = torch.arange(7).expand(2, -1)
    want = model.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    hidden = span_from_model(model, 0, 2)(embeds, position_ids)
    hidden = span_from_model(model, 2, 4)(hidden, position_ids)
    torch.testing.assert_close(model.base_model.norm(hidden), want, rtol=0, atol=0)


def test_span_trap_first_layer_idx_matters() -> None:
    """The reason Span passes its own first layer index to the mask builder: with layer 0's (empty) cache,
    a multi-token chunk after decode would be computed with the wrong mask. Show that the shortcut is wrong."""
    from transformers.masking_utils import create_causal_mask

    model = _model("llama")
    span = span_from_model(model, 2, 4)
    cache = span.new_cache()
    embeds = torch.randn(1, 5, 32)
    span(embeds, torch.arange(5)[None], None, cache)
    chunk = torch.randn(1, 3, 32)
    pos = torch.arange(5, 8)[None]
    good = create_causal_mask(model.config, chunk, None, cache, pos, layer_idx=2)
    bad = create_causal_mask(model.config, chunk, None, cache, pos, layer_idx=0)
    assert (good is None) != (bad is None) or not torch.equal(good, bad)


@pytest.mark.parametrize("start,end", [(-1, 2), (3, 3), (3, 1), (0, 5)])
def test_invalid_spans_are_refused(start: int, end: int) -> None:
    with pytest.raises(SpanError, match="invalid span"):
        check_span(start, end, 4)


def test_a_family_not_checked_against_the_runner_is_refused_by_name() -> None:
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match=r"'gpt2' is not supported yet \(supported: bloom, deepseek_v3, falcon, .*mixtral, .*opt, .*qwen3_moe\)"):
        family_of(GPT2Config())


def test_falcon_with_alibi_is_refused_by_name() -> None:
    """falcon-rw adds its ALiBi bias into the mask with its own scaling; only rotary Falcon models are run."""
    with pytest.raises(UnsupportedModelError, match=r"Falcon with ALiBi \(falcon-rw\) is not supported yet"):
        family_of(FalconConfig(alibi=True))


@pytest.mark.parametrize("name, rope", [
    ("llama", {"rope_type": "dynamic", "factor": 2.0}),
    ("phi3", {"rope_type": "dynamic", "factor": 2.0}),
])
def test_rotary_tables_that_change_with_the_sequence_are_refused_by_name(name: str, rope: dict) -> None:
    """Their tables follow the longest position of every pass so far: sessions batched on a server would share
    them."""
    config = CONFIGS[name]()
    config.rope_parameters = {**config.rope_parameters, **rope}
    with pytest.raises(UnsupportedModelError, match=f"rope type '{rope['rope_type']}' is not supported yet"):
        family_of(config)
    static = CONFIGS[name]()
    static.rope_parameters = {**static.rope_parameters, "rope_type": "linear", "factor": 2.0}
    assert family_of(static) is family_of(CONFIGS[name]())


def test_an_attention_implementation_spans_do_not_mask_for_is_refused_by_name() -> None:
    model = _model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(SpanError, match=r"'flex_attention' is not supported by spans \(supported: sdpa, eager\)"):
        span_from_model(model, 0, 2)
