"""Servers started with --quant compute what the same quantization computes locally, and hold less memory."""

from __future__ import annotations

import re

import pytest

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.launcher import LocalSwarm, ServerSpec
from swarmllm.models.evaluation import quantized_copy

pytestmark = [pytest.mark.swarm, pytest.mark.real_model]


def _weight_mib(child) -> float:
    line = next(x for x in child.log if "MiB of weights" in x)
    return float(re.search(r"hold ([\d.]+) MiB of weights", line)[1])


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
def test_quantized_servers_equal_the_locally_quantized_model(mode, smollm2_dir, smollm2_local, smollm2_tokenizer):
    specs = [ServerSpec("0:15", ("--quant", mode)), ServerSpec("15:30", ("--quant", mode))]
    with LocalSwarm(str(smollm2_dir), specs) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(str(smollm2_dir), initial_peers=swarm.initial_peers)
        try:
            ids = smollm2_tokenizer("The three primary colors are", return_tensors="pt").input_ids
            got = model.generate(ids, max_new_tokens=16, do_sample=False)[0].tolist()
        finally:
            model.sequence_manager.shutdown()
        mib = [_weight_mib(c) for c in swarm.servers.values()]
    want = quantized_copy(smollm2_local, mode).generate(ids, max_new_tokens=16, do_sample=False)[0].tolist()
    assert got == want
    float_mib = sum(p.numel() * 4 for p in smollm2_local.model.layers.parameters()) / 2**20
    assert sum(mib) < (0.3 if mode == "int8" else 0.2) * float_mib, (mib, float_mib)  # int4: 0.16, nf4: 0.14
