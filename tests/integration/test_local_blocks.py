"""Local-first mode: the client runs the first (and last) K blocks itself; servers never get those blocks'
inputs or outputs, and the output is still the model's."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.launcher import LocalSwarm, ServerSpec

pytestmark = pytest.mark.swarm


@pytest.fixture(scope="module")
def whole_model_swarm(tiny_llama_dir):
    with LocalSwarm(str(tiny_llama_dir), [ServerSpec("0:4")]) as swarm:
        yield swarm


@pytest.mark.parametrize("last", [False, True])
def test_local_blocks_stay_on_the_client_and_output_is_unchanged(whole_model_swarm, tiny_llama_dir, last) -> None:
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_llama_dir), initial_peers=whole_model_swarm.initial_peers, local_blocks=1, local_last_blocks=last)
    server = whole_model_swarm.servers["server0"]
    mark = len(server.log)
    try:
        ids = torch.randint(1, 90, (2, 5))
        with model.inference_session(max_length=16) as session:
            got = model.generate(ids, max_new_tokens=6, do_sample=False)
            remote = [p for p in session.parts if hasattr(p, "route")]
            hops = [(h.start, h.end) for p in remote for h in p.route]
        logits = model(ids).logits  # the stateless forward path too
    finally:
        model.sequence_manager.shutdown()
    local = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert torch.equal(got, local.generate(ids, max_new_tokens=6, do_sample=False))
    torch.testing.assert_close(logits, local(ids).logits, rtol=1e-4, atol=1e-5)
    end = 3 if last else 4
    assert hops == [(1, end)], "the swarm serves only the blocks between the client's own"
    opened = [re.search(r"blocks (\d+):(\d+)", x).groups() for x in server.log[mark:] if "opened by" in x]
    assert opened and all(o == ("1", str(end)) for o in opened), opened


def test_local_blocks_refuse_what_would_leave_nothing_remote_or_drop_lora(tiny_llama_dir) -> None:
    with pytest.raises(ValueError, match="nothing left for the swarm"):
        AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama_dir), local_blocks=2, local_last_blocks=True)
    with pytest.raises(ValueError, match="cannot be combined with LoRA"):
        AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama_dir), local_blocks=1, tuning_mode="lora")
