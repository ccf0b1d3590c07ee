"""Server-to-server push: each server sends its output straight to the next one, and outputs stay exact."""

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


@pytest.mark.parametrize("push", [True, False])
def test_push_delivers_steps_to_the_next_server_first_and_keeps_outputs_exact(push, tiny_llama_dir):
    local = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with LocalSwarm(str(tiny_llama_dir), [ServerSpec("0:1"), ServerSpec("1:3"), ServerSpec("3:4")]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_llama_dir), initial_peers=swarm.initial_peers, push=push, push_min_rtt=0
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
            assert (pushed > 0) if push else (pushed == 0), (name, steps, pushed)
        ((_, first_pushed),) = pushed_counts(swarm.servers["server0"], marks["server0"])
        assert first_pushed == 0  # nobody pushes to the first server


def test_push_is_skipped_where_servers_are_too_close_for_it_to_pay(tiny_llama_dir):
    with LocalSwarm(str(tiny_llama_dir), [ServerSpec("0:2"), ServerSpec("2:4")]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama_dir), initial_peers=swarm.initial_peers)
        try:
            with model.inference_session(max_length=16) as session:
                model.generate(torch.randint(1, 96, (1, 4)), max_new_tokens=2)
                for peer in [h.peer_id for h in session.route]:
                    model.sequence_manager.rtts[peer] = 0.001  # loopback-like
                assert not session._push_pays()
                for peer in [h.peer_id for h in session.route]:
                    model.sequence_manager.rtts[peer] = 0.04  # another city
                assert session._push_pays()
        finally:
            model.sequence_manager.shutdown()
