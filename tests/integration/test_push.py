"""Server-to-server push between real server processes, over libp2p: each server sends its output straight to
the next one, and outputs stay exact. Push off, and when push pays, are tested over the loopback transport
(tests/unit/test_loopback_sessions.py)."""

from __future__ import annotations

import re
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.launcher import LocalSwarm, ServerSpec

pytestmark = pytest.mark.swarm


def pushed_counts(child, since: int) -> list[tuple[int, int]]:
    found = [re.search(r"closed after (\d+) steps, (\d+) of them pushed", line) for line in child.log[since:]]
    return [(int(m[1]), int(m[2])) for m in found if m]


def test_push_delivers_steps_to_the_next_server_first_and_keeps_outputs_exact(tiny_llama_dir):
    local = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with LocalSwarm(str(tiny_llama_dir), [ServerSpec("0:1"), ServerSpec("1:3"), ServerSpec("3:4")]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_llama_dir), initial_peers=swarm.initial_peers, push=True, push_min_rtt=0
        )
        try:
            ids = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(3))
            marks = {name: len(child.log) for name, child in swarm.servers.items()}
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
            assert torch.equal(out, local.generate(ids, max_new_tokens=12, do_sample=False))
        finally:
            model.sequence_manager.shutdown()
        deadline = time.monotonic() + 10  # each server logs its session's close once it sees the stream end
        while time.monotonic() < deadline and not all(pushed_counts(c, marks[n]) for n, c in swarm.servers.items()):
            time.sleep(0.2)
        for name in ("server1", "server2"):
            ((steps, pushed),) = pushed_counts(swarm.servers[name], marks[name])
            assert steps == 12
            assert pushed > 0, (name, steps, pushed)
        ((_, first_pushed),) = pushed_counts(swarm.servers["server0"], marks["server0"])
        assert first_pushed == 0  # nobody pushes to the first server
