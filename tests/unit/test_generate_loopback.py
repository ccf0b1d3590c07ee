"""`generate` of the distributed model over the in-process loopback swarm (real handlers, no processes)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.sequence_manager import SequenceManager
from tests.unit.loopback_swarm import LoopbackSwarm


@pytest.fixture(scope="module")
def distributed():
    swarm = LoopbackSwarm([(0, 2), (2, 4)])
    with tempfile.TemporaryDirectory() as parent:
        folder = Path(parent) / swarm.name  # the client names the model after its folder, as the swarm does
        swarm.model.save_pretrained(folder)
        with mock.patch.object(SequenceManager, "join", lambda config, name, n: swarm.join(config)):
            model = AutoDistributedModelForCausalLM.from_pretrained(folder)
        try:
            yield model, swarm.model
        finally:
            model.sequence_manager.shutdown()
            swarm.close()


def test_prompt_lookup_drafts_past_max_new_tokens_fit_the_session(distributed) -> None:
    """A repetitive prompt makes transformers' prompt lookup draft more tokens than are left to generate (it
    cuts them afterwards): the session must hold them, and the output is plain greedy's."""
    model, local = distributed
    ids = torch.tensor([[5, 6, 7, 8, 9] * 4])
    with torch.no_grad():
        want = local.generate(ids, max_new_tokens=3, do_sample=False)
        got = model.generate(ids, max_new_tokens=3, do_sample=False, prompt_lookup_num_tokens=10)
    assert torch.equal(got, want)
