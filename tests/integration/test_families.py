"""Every supported family generates through a real 2-server swarm exactly as the local model does."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.launcher import LocalSwarm, ServerSpec
from tests.unit.test_span_exact import CONFIGS

pytestmark = pytest.mark.swarm


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_generate_through_swarm_equals_local(family: str, tmp_path) -> None:
    torch.manual_seed(0)
    config = CONFIGS[family]()
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 96, 1
    local = AutoModelForCausalLM.from_config(config).eval()
    local.save_pretrained(tmp_path / family)
    local = AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
    ids = torch.randint(2, 90, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    kwargs = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with LocalSwarm(str(tmp_path / family), [ServerSpec("0:3"), ServerSpec("3:4")]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(str(tmp_path / family), initial_peers=swarm.initial_peers)
        try:
            got = model.generate(ids, **kwargs)
        finally:
            model.sequence_manager.shutdown()
    assert torch.equal(got, local.generate(ids, **kwargs))
