"""A real swarm on one GPU: a bootstrap peer and server processes on loopback with every block on cuda, and
clients on cuda, against local transformers running the same weights on the same GPU in the same dtype.

float32 must agree exactly. In bfloat16 the servers' masked attention over a padded cache may round
differently from local transformers' kernels, so the tokens must be equal or differ only where local's top
two logits are within rounding (see `Agreement` in conftest.py); the measured agreement is recorded in the
junit report either way.
"""

from __future__ import annotations

import pytest
import torch

from swarmllm.models import quant_cuda
from swarmllm.models.evaluation import quantized_copy

pytestmark = [pytest.mark.cuda, pytest.mark.swarm]

NEW_TOKENS = 16
BF16_ROUTE = ["bf16-a", "bf16-b", "bf16-c"]


def _greedy(model, prompt: torch.Tensor, n: int = NEW_TOKENS) -> list[int]:
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, prompt.shape[1] :].tolist()


def test_servers_announce_their_blocks_on_cuda(cuda_swarm, swarm_client) -> None:
    model = swarm_client(list(cuda_swarm.peers), torch.bfloat16)
    announced = sorted((r.start, r.end, r.dtype, r.quant, r.device) for r in model.sequence_manager.servers(force=True))
    assert announced == [
        (0, 10, "bfloat16", "none", "cuda"),
        (0, 30, "bfloat16", "int8", "cuda"),
        (0, 30, "bfloat16", "nf4", "cuda"),
        (0, 30, "float32", "none", "cuda"),
        (10, 20, "bfloat16", "none", "cuda"),
        (20, 30, "bfloat16", "none", "cuda"),
    ]


def test_float32_swarm_equals_local_exactly(swarm_client, local_model, prompt_ids, agreement, record_property) -> None:
    model = swarm_client(["fp32"], torch.float32)
    local = local_model(torch.float32)
    assert model.device.type == "cuda" and model.dtype == torch.float32
    with torch.inference_mode():
        torch.testing.assert_close(model(prompt_ids).logits, local(prompt_ids).logits, rtol=0, atol=1e-4)
    got, want = _greedy(model, prompt_ids), _greedy(local, prompt_ids)
    measured = agreement(local, prompt_ids, got, want)
    record_property("agreement", measured)
    assert got == want, measured


def test_bfloat16_swarm_of_three_agrees_with_local(swarm_client, local_model, prompt_ids, agreement,
                                                   record_property) -> None:
    model = swarm_client(BF16_ROUTE, torch.bfloat16)
    local = local_model(torch.bfloat16)
    got, want = _greedy(model, prompt_ids), _greedy(local, prompt_ids)
    measured = agreement(local, prompt_ids, got, want)
    record_property("agreement", measured)
    assert len(got) == NEW_TOKENS
    assert measured.explained_by_rounding, (measured, got, want)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_servers_answer_and_hold_less(quant, cuda_swarm, swarm_client, local_model, prompt_ids, agreement,
                                                record_property) -> None:
    model = swarm_client([quant], torch.bfloat16)
    # The same quantization, run locally: the copy's blocks are on cuda, so quantize_blocks gives them
    # bitsandbytes' layers, as load_span does on the server.
    reference = quantized_copy(local_model(torch.bfloat16), quant)
    assert isinstance(reference.model.layers[0].mlp.down_proj, quant_cuda.quantized_types())
    got, want = _greedy(model, prompt_ids), _greedy(reference, prompt_ids)
    measured = agreement(reference, prompt_ids, got, want)
    record_property("agreement", measured)
    assert measured.explained_by_rounding, (measured, got, want)

    # What the servers logged their weights hold, per block: bfloat16 (three servers of 10) vs quantized (30).
    bf16 = sum(cuda_swarm.weights[name][2] for name in BF16_ROUTE) / 30
    start, end, mib = cuda_swarm.weights[quant]
    ratio = mib / (end - start) / bf16
    record_property("mib_per_block", {"bfloat16": round(bf16, 3), quant: round(mib / (end - start), 3)})
    record_property("ratio_to_bf16", round(ratio, 4))
    # The log counts parameters and buffers, and bitsandbytes keeps its scales as plain attributes, so it
    # shows the codes: int8 ~0.50 (one byte per weight; its float32 row scales add 0.003), nf4 ~0.25 (half a
    # byte; its float32 absmax per 64 weights adds 0.03). The bounds hold with the scales counted or not.
    low, high = (0.45, 0.56) if quant == "int8" else (0.22, 0.32)
    assert low < ratio < high, (ratio, cuda_swarm.weights)
