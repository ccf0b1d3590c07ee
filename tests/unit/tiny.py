"""A tiny random Llama span for unit tests of server parts (no files, no processes)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from swarmllm.models.span import Span, span_from_model


def tiny_span(blocks: int) -> Span:
    """Blocks 0:`blocks` of a seeded random Llama: hidden 32, 4 heads of 8, 2 KV heads, SDPA attention."""
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=blocks, vocab_size=50, hidden_size=32, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    config._attn_implementation = "sdpa"
    return span_from_model(AutoModelForCausalLM.from_config(config).eval(), 0, blocks)
