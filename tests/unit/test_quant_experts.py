"""Quantized mixture-of-experts blocks (Mixtral, Qwen 2 MoE, Qwen 3 MoE, DeepSeek-V3), loaded from checkpoints that store
one tensor per expert: outputs near float, the experts' bytes actually shrink, gradients reach the input,
and a layout the runner cannot quantize is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig

from swarmllm.models import quant
from swarmllm.models.quant_experts import QuantizedExperts, UnsupportedExpertsError
from swarmllm.models.span import load_span
from tests.unit.test_quant import MODES, REL_TOL, _rel
from tests.unit.test_span_exact import _model

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]


def _inputs(hidden: int, rows: int = 2, seq: int = 9):
    torch.manual_seed(3)
    return torch.randn(rows, seq, hidden), torch.arange(seq).expand(rows, -1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each MoE family's tiny model saved by transformers (per-expert keys)."""
    root = tmp_path_factory.mktemp("moe")
    for name in MOE:
        _model(name).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MOE)
def test_a_quantized_moe_span_is_close_to_float_and_keeps_no_float_experts(name, mode, checkpoints):
    reference, span = load_span(checkpoints / name, 0, 4), load_span(checkpoints / name, 0, 4, quant=mode)
    moe = [layer for layer in span.layers if hasattr(layer.mlp, "experts")]  # DeepSeek's first block is dense
    assert len(moe) >= 3 and all(isinstance(layer.mlp.experts, QuantizedExperts) for layer in moe)
    assert not [n for n, p in span.named_parameters() if p.dim() == 3]
    hidden, pos = _inputs(32)
    with torch.no_grad():
        assert _rel(span(hidden, pos), reference(hidden, pos)) < REL_TOL[mode]


def test_int8_mixtral_blocks_take_at_most_0_3x_of_their_float32_bytes(tmp_path):
    """The issue's target, at a width where per-row scales cost what they do in real models (a little)."""
    config = MixtralConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, num_hidden_layers=2, num_local_experts=4,
                           num_experts_per_tok=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    full, int8 = load_span(tmp_path, 0, 2).weight_bytes(), load_span(tmp_path, 0, 2, quant="int8").weight_bytes()
    assert int8 / full <= 0.3, f"int8 holds {int8 / full:.3f}x of float32's bytes"


@pytest.mark.parametrize("mode", MODES)
def test_backward_reaches_the_input_through_quantized_experts(mode, checkpoints):
    reference, span = load_span(checkpoints / "mixtral", 0, 4), load_span(checkpoints / "mixtral", 0, 4, quant=mode)
    hidden, pos = _inputs(32)
    grads = []
    for s in (reference, span):
        x = hidden.clone().requires_grad_(True)
        s(x, pos).square().sum().backward()
        grads.append(x.grad)
    assert _rel(grads[1], grads[0]) < 2 * REL_TOL[mode]


def test_experts_in_another_layout_are_refused_not_left_in_float() -> None:
    class TransposedExperts(nn.Module):  # gpt-oss stores its experts (experts, in, out), with biases
        def __init__(self):
            super().__init__()
            self.num_experts, self.act_fn = 2, nn.SiLU()
            self.has_gate, self.has_bias, self.is_transposed = True, True, True
            self.is_concatenated, self.has_post_expert_norm = True, False
            self.gate_up_proj = nn.Parameter(torch.zeros(2, 8, 12))
            self.down_proj = nn.Parameter(torch.zeros(2, 6, 8))

    block = nn.Module()
    block.experts = TransposedExperts()
    with pytest.raises(UnsupportedExpertsError, match="cannot quantize TransposedExperts"):
        quant.quantize_blocks([block], "int8")
