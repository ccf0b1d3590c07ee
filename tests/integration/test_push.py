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
        # Each server logs its session's close once it sees the stream end; on a loaded machine that line can
        # take a while to reach this process, so this waits for it (it returns as soon as all three are in).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(pushed_counts(c, marks[n]) for n, c in swarm.servers.items()):
            time.sleep(0.2)
        counts = {name: pushed_counts(child, marks[name]) for name, child in swarm.servers.items()}
        logs = {name: "".join(child.log[marks[name]:][-15:]) for name, child in swarm.servers.items()}
        tails = "".join(f"--- {name}\n{tail}" for name, tail in logs.items())
        assert all(len(c) == 1 for c in counts.values()), f"{counts}\n{tails}"
        for name in ("server1", "server2"):
            ((steps, pushed),) = counts[name]
            assert steps == 12, (name, logs[name])
            assert pushed > 0, (name, steps, pushed)
        assert counts["server0"][0][1] == 0  # nobody pushes to the first server
