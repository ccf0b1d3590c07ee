"""Servers and clients of different dtypes serve each other: hidden states are converted at each boundary.

A bfloat16 server and a float16 server hold the real SmolLM2's blocks; float32 and bfloat16 clients use them.
The reference runs the same blocks in the same dtypes locally (`load_span`), converting hidden states where
the swarm does, on one thread like the servers: the logits must be identical, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.launcher import LocalSwarm, ServerSpec
from swarmllm.models.span import load_span

pytestmark = [pytest.mark.swarm, pytest.mark.real_model, pytest.mark.usefixtures("one_torch_thread")]

SPANS = (("0:15", torch.bfloat16), ("15:30", torch.float16))


@pytest.fixture(scope="module")
def mixed_swarm(smollm2_dir):
    specs = [ServerSpec(blocks, ("--dtype", str(dtype).removeprefix("torch."))) for blocks, dtype in SPANS]
    with LocalSwarm(str(smollm2_dir), specs) as swarm:
        yield swarm


def _reference(model_dir, client_dtype: torch.dtype, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `ids` with the client's layers in `client_dtype` and each span in its server's dtype."""
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=client_dtype).eval()
    positions = torch.arange(ids.shape[1])[None]
    with torch.inference_mode():
        hidden = local.model.embed_tokens(ids)  # (1, seq, hidden) in the client's dtype
        for blocks, dtype in SPANS:
            start, end = (int(x) for x in blocks.split(":"))
            span = load_span(model_dir, start, end, dtype)
            # What a server does: compute in its own dtype, reply in the dtype it was sent.
            hidden = span(hidden.to(dtype), positions, None).to(client_dtype)
        return local.lm_head(local.model.norm(hidden))


@pytest.mark.parametrize("client_dtype", [torch.float32, torch.bfloat16])
def test_mixed_dtype_servers_serve_any_client_exactly(mixed_swarm, smollm2_dir, smollm2_tokenizer, client_dtype) -> None:
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(smollm2_dir), initial_peers=mixed_swarm.initial_peers, dtype=client_dtype
    )
    try:
        announced = sorted((r.start, r.dtype, r.device) for r in model.sequence_manager.servers(force=True))
        assert announced == [(0, "bfloat16", "cpu"), (15, "float16", "cpu")]
        ids = smollm2_tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
        with torch.inference_mode():
            got = model(ids).logits
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    finally:
        model.sequence_manager.shutdown()
    assert got.dtype == client_dtype
    want = _reference(smollm2_dir, client_dtype, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert greedy.shape == (1, ids.shape[1] + 6)
