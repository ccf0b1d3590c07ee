"""`load_span` builds blocks one at a time (read, cast, move, quantize) on a tiny random Llama: the result is
what loading in full and quantizing afterwards gives, and no tensor it keeps lives in the checkpoint's file
mapping (which would keep the file's pages in the process's RSS; tests/integration/test_memory.py measures
the RSS itself on SmolLM2)."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from swarmllm.models import quant
from swarmllm.models.span import load_span, span_from_model
from tests.unit.test_span_exact import CONFIGS, _model


@pytest.mark.parametrize("mode", ["none", "int8", "int4", "nf4"])
def test_quantizing_while_loading_equals_quantizing_after(mode, tiny_llama_dir):
    span = load_span(tiny_llama_dir, 1, 3, quant=mode)
    reference = load_span(tiny_llama_dir, 1, 3)
    quant.quantize_blocks(reference.layers, mode)
    got, want = span.layers.state_dict(), reference.layers.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    hidden, pos = torch.randn(2, 5, 32), torch.arange(5).expand(2, -1)  # (batch, seq, hidden)
    with torch.no_grad():
        torch.testing.assert_close(span(hidden, pos), reference(hidden, pos), rtol=0, atol=0)


def test_blocks_are_cast_before_they_are_quantized(tiny_llama_dir):
    span = load_span(tiny_llama_dir, 0, 2, torch.bfloat16, quant="int8", device=torch.device("cpu"))
    assert span.dtype == torch.bfloat16 and span.device == torch.device("cpu")
    q_proj = span.layers[0].self_attn.q_proj
    assert isinstance(q_proj, quant.Int8Linear) and q_proj.scales.dtype == torch.bfloat16
    with torch.no_grad():
        out = span(torch.randn(1, 3, 32, dtype=torch.bfloat16), torch.arange(3)[None])
    assert out.dtype == torch.bfloat16


def _mappings_of(path_part: str) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings whose file path contains `path_part` (Linux)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and path_part in fields[5]:
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("mode", ["none", "int8"])
def test_no_tensor_of_the_span_lives_in_the_checkpoint_mapping(mode, tiny_llama_dir, tmp_path):
    """safetensors hands out tensors inside its mapping of the file; with the same dtype and no quantization
    they would stay there (and keep the whole mapping, and its touched pages, alive) unless copied out."""
    # A checkpoint of its own: other tests' transformers models keep the shared one mapped.
    checkpoint = shutil.copytree(tiny_llama_dir, tmp_path / "checkpoint")
    span = load_span(checkpoint, 0, 4, quant=mode)
    tensors = [*span.parameters(), *span.buffers()]
    mapped = _mappings_of(str(checkpoint))
    inside = [t for t in tensors for lo, hi in mapped if lo <= t.data_ptr() < hi]
    assert not inside
    assert not mapped  # nothing keeps the file mapped once loading is done


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_span_loaded_from_a_checkpoint_equals_the_same_blocks_of_the_model(name, tmp_path):
    """Each family's checkpoint keys (Phi-3's fused projections, Qwen 3's q/k norms, ...) reach the right
    tensors of the generic runner's blocks."""
    model = _model(name)
    model.save_pretrained(tmp_path)
    loaded, reference = load_span(tmp_path, 1, 3), span_from_model(model, 1, 3)
    assert list(loaded.layers.state_dict()) == list(reference.layers.state_dict())
    hidden, pos = torch.randn(2, 5, 32), torch.arange(5).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(hidden, pos), reference(hidden, pos), rtol=0, atol=0)


def test_the_vision_towers_layers_never_load_as_decoder_blocks(tmp_path):
    """A multimodal Gemma 3 checkpoint holds `vision_tower.encoder.layers.N` besides the decoder's
    `language_model.model.layers.N`, with names such as `self_attn.q_proj.weight` in both: a block must be
    built from the decoder's tensors alone (a mixed block fails to load here, where the two stacks' key and
    value projections differ in shape, and would compute wrong values where all shapes agree)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = CONFIGS["gemma3"]()
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=96, boi_token_index=94, eoi_token_index=95)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    text_model = model.model.language_model
    text_model.config._attn_implementation = "sdpa"
    loaded, reference = load_span(tmp_path, 1, 3), span_from_model(text_model, 1, 3)
    for got, want in zip(loaded.layers, reference.layers):
        for name, tensor in want.state_dict().items():
            assert torch.equal(got.state_dict()[name], tensor), name
    hidden, pos = torch.randn(2, 5, 32), torch.arange(5).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(hidden, pos), reference(hidden, pos), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_familys_blocks_load_quantized(name, tmp_path):
    """int8 reaches every linear of every family's blocks (Falcon's own Linear subclass, fused expert
    tensors) and the blocks still compute what the float ones do, within int8's rounding."""
    from torch import nn

    from swarmllm.models.quant_experts import QuantizedExperts

    model = _model(name)
    model.save_pretrained(tmp_path)
    loaded, reference = load_span(tmp_path, 1, 3, quant="int8"), span_from_model(model, 1, 3)
    plain = [n for n, m in loaded.layers.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, quant.QuantizedLinear)]
    assert not plain
    experts = [m for m in reference.layers.modules() if quant.is_fused_experts(m)]
    assert len([m for m in loaded.layers.modules() if isinstance(m, QuantizedExperts)]) == len(experts)
    hidden, pos = torch.randn(2, 5, 32), torch.arange(5).expand(2, -1)
    with torch.no_grad():
        got, want = loaded(hidden, pos), reference(hidden, pos)
    assert (got - want).norm() / want.norm() < 0.02


def test_a_checkpoint_stored_quantized_is_refused_by_name(tmp_path):
    """DeepSeek-V3 ships FP8 weights with block scales under the weights' own names: loaded as plain weights
    they would compute garbage without a word."""
    import json

    from swarmllm.models.span import SpanError

    _model("deepseek_v3").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpanError, match=r"checkpoints stored quantized \(fp8\) are not supported"):
        load_span(tmp_path, 0, 2)
