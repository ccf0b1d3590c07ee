"""A server started with --num-blocks moves to where the swarm is slowest, without dropping a session."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.launcher import LocalSwarm, ServerSpec

pytestmark = pytest.mark.swarm


# Every server announces the same speed: measured speeds of a tiny model on a loaded machine vary by more
# than 2x, enough to make staying the right decision, so the test fixes them to test the decision it means.
SPEED = ("--step-time", "0.001", "--forward-tps", "1000")


def test_rebalance_waits_for_the_active_session_then_moves(tiny_llama_dir):
    local = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with LocalSwarm(str(tiny_llama_dir), [ServerSpec("2:4", SPEED)]) as swarm:
        mover = swarm.add_server("mover", ServerSpec(None, ("--num-blocks", "2", "--rebalance-period", "1", *SPEED)))
        assert "blocks 0:2" in swarm.server_lines["mover"]  # the gap
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_llama_dir), initial_peers=swarm.initial_peers, update_period=0.5
        )
        try:
            ids = torch.randint(1, 96, (1, 5), generator=torch.Generator().manual_seed(0))
            expected = local.generate(ids, max_new_tokens=12, do_sample=False)
            with model.inference_session(max_length=32) as session:
                first = model.generate(ids, max_new_tokens=4, do_sample=False)
                assert any(h.start == 0 for h in session.route)
                # Two more servers of 0:2 make 2:4 the bottleneck: moving there doubles the swarm's speed.
                swarm.add_server("c", ServerSpec("0:2", SPEED))
                swarm.add_server("d", ServerSpec("0:2", SPEED))
                assert _wait_for_log(mover, "moving from blocks 0:2 to 2:4", 60)
                # The session goes on, on the draining server, and the server does not move under it.
                out = model.generate(first, max_new_tokens=8, do_sample=False)
                assert not any("server moved" in line for line in mover.log)
            assert torch.equal(out, expected)
            mover.wait_for("server moved: blocks 2:4", 30)
            records = {r.peer_id: r for r in model.sequence_manager.servers(force=True)}
            peer = swarm.server_lines["mover"].split(" peer ")[1].split()[0]
            assert (records[peer].start, records[peer].end, records[peer].step_time) == (2, 4, 0.001)
            assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)
        finally:
            model.sequence_manager.shutdown()


def _wait_for_log(child, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in child.log):
            return True
        time.sleep(0.2)
    return False
