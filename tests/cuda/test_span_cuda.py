"""A span loaded onto the GPU lives there entirely and computes what the same blocks of local transformers
compute on the same GPU; quantized spans hold the memory their formats promise, as the allocator counts it."""

from __future__ import annotations

import gc

import pytest
import torch

from swarmllm.models.span import load_span

pytestmark = pytest.mark.cuda

START, END = 10, 20  # a span in the middle: its input is another span's output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_span_on_cuda_equals_the_local_blocks(dtype, random_smollm2_dir, local_model, prompt_ids, record_property) -> None:
    span = load_span(random_smollm2_dir, START, END, dtype, device="cuda")
    tensors = dict(span.named_parameters()) | dict(span.named_buffers())
    assert tensors and {t.device for t in tensors.values()} == {torch.device("cuda", 0)}, \
        [name for name, t in tensors.items() if t.device.type != "cuda"]
    assert span.dtype == dtype and span.device == torch.device("cuda", 0)

    local = local_model(dtype)
    positions = torch.arange(prompt_ids.shape[1], device="cuda")[None]  # (1, seq)
    with torch.inference_mode():
        # hidden_states[i] is the input of block i, (1, seq, hidden): START's input and END - 1's output.
        states = local(prompt_ids, output_hidden_states=True).hidden_states
        got = span(states[START], positions, None)
    want = states[END]
    record_property("max_abs_diff", (got.float() - want.float()).abs().max().item())
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # same kernels, same shapes: bit for bit
    else:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def _allocated_by(load) -> int:
    """Bytes that `load()`'s result holds on cuda:0, by the caching allocator's count of live tensors."""
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(0)
    span = load()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated(0) - before
    del span
    gc.collect()
    torch.cuda.empty_cache()
    return held


def test_quantized_spans_hold_their_share_of_gpu_memory(random_smollm2_dir, record_property) -> None:
    held = {quant: _allocated_by(lambda q=quant: load_span(random_smollm2_dir, 0, 30, torch.bfloat16, quant=q, device="cuda"))
            for quant in ("none", "int8", "int4")}
    ratios = {q: held[q] / held["none"] for q in ("int8", "int4")}
    record_property("mib_per_block", {q: round(b / 30 / 2**20, 3) for q, b in held.items()})
    record_property("ratio_to_bf16", {q: round(r, 4) for q, r in ratios.items()})
    # int8: one byte per weight and a bfloat16 scale per row -> ~0.50; int4: half a byte per weight and a
    # bfloat16 scale and zero per 32 -> ~0.31. Norms stay bfloat16 in both.
    assert 0.45 < ratios["int8"] < 0.56, (held, ratios)
    assert 0.27 < ratios["int4"] < 0.36, (held, ratios)
