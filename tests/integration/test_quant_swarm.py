"""Servers started with --quant compute what the same quantization computes locally, and hold less memory.

One swarm holds all three modes, a third of the blocks each (int8 0:10, int4 10:20, nf4 20:30): each server
quantizes only its own blocks, as it would alone, and the chain checks each mode's outputs as the next
server's inputs. Three swarms of one mode each took 40.6 s alone; this one takes 20.8 s."""

from __future__ import annotations

import re

import pytest

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.launcher import LocalSwarm, ServerSpec
from swarmllm.models.evaluation import quantized_copy
from swarmllm.models.family import family_of, root_of
from swarmllm.models.quant import quantize_blocks
from swarmllm.models.span import text_config

pytestmark = [pytest.mark.swarm, pytest.mark.real_model]

MODES = {"int8": (0, 10), "int4": (10, 20), "nf4": (20, 30)}
# Weights held against float32's, at most (measured on SmolLM2's blocks: int8 0.27, int4 0.16, nf4 0.14).
MAX_SHARE = {"int8": 0.3, "int4": 0.2, "nf4": 0.2}


def _weight_mib(child) -> float:
    line = next(x for x in child.log if "MiB of weights" in x)
    return float(re.search(r"hold ([\d.]+) MiB of weights", line)[1])


def test_servers_of_three_quant_modes_equal_the_locally_quantized_model(smollm2_dir, smollm2_local, smollm2_tokenizer):
    specs = [ServerSpec(f"{start}:{end}", ("--quant", mode)) for mode, (start, end) in MODES.items()]
    with LocalSwarm(str(smollm2_dir), specs) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(str(smollm2_dir), initial_peers=swarm.initial_peers)
        try:
            ids = smollm2_tokenizer("The three primary colors are", return_tensors="pt").input_ids
            got = model.generate(ids, max_new_tokens=16, do_sample=False)[0].tolist()
        finally:
            model.sequence_manager.shutdown()
        mib = {spec.blocks: _weight_mib(child) for spec, child in zip(specs, swarm.servers.values(), strict=True)}
    local = quantized_copy(smollm2_local, "none")
    family = family_of(text_config(local.config))
    layers = root_of(local, family).get_submodule(family.layers)
    for mode, (start, end) in MODES.items():
        quantize_blocks(layers[start:end], mode)
    want = local.generate(ids, max_new_tokens=16, do_sample=False)[0].tolist()
    assert got == want
    for mode, (start, end) in MODES.items():
        float_mib = sum(p.numel() * 4 for p in smollm2_local.model.layers[start:end].parameters()) / 2**20
        assert mib[f"{start}:{end}"] < MAX_SHARE[mode] * float_mib, (mode, mib, float_mib)
