"""Generation that survives failing servers: killed, stalled, replaced by a newcomer, or in a chaos of
crashes and restarts. Every output must equal the uninterrupted greedy output, token for token."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.launcher import LocalSwarm, ServerSpec

pytestmark = pytest.mark.swarm

PROMPT = "A swarm of computers can run a large language model by"


class AfterTokens:
    """A generate() streamer that runs `action` once, after `n` new tokens."""

    def __init__(self, n: int, action):
        self.n, self.action, self.calls = n, action, 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == self.n + 1:  # the first call carries the prompt
            self.action()

    def end(self) -> None:
        pass


def peer_of(swarm: LocalSwarm, name: str) -> str:
    return swarm.server_lines[name].split(" peer ")[1].split()[0]


def server_in_route(model, swarm: LocalSwarm, blocks: str) -> str:
    """The name of the server holding `blocks` that the model's active session uses."""
    route_peers = {hop.peer_id for hop in model._active_session.route}
    names = [f"server{i}" for i, spec in enumerate(swarm.specs) if spec.blocks == blocks]
    return next(n for n in names if peer_of(swarm, n) in route_peers)


@pytest.fixture
def smollm2_pair_swarm(smollm2_dir):
    """Blocks 15:30 on two servers, so one can fail."""
    with LocalSwarm(str(smollm2_dir), [ServerSpec("0:15"), ServerSpec("15:30"), ServerSpec("15:30")]) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def expected_64(smollm2_local, smollm2_tokenizer):
    ids = smollm2_tokenizer([PROMPT], return_tensors="pt").input_ids
    return ids, smollm2_local.generate(ids, max_new_tokens=64, do_sample=False)


def generate_with(swarm, smollm2_dir, ids, streamer, **options):
    model = AutoDistributedModelForCausalLM.from_pretrained(str(smollm2_dir), initial_peers=swarm.initial_peers, **options)
    try:
        return model.generate(ids, max_new_tokens=64, do_sample=False, streamer=streamer(model)), model
    finally:
        model.sequence_manager.shutdown()


@pytest.mark.real_model
def test_sigkill_mid_generation_fails_over_with_identical_output(smollm2_pair_swarm, smollm2_dir, expected_64):
    swarm, (ids, expected) = smollm2_pair_swarm, expected_64
    killed = []

    def kill(model):
        victim = server_in_route(model, swarm, "15:30")
        os.killpg(swarm.servers[victim].proc.pid, signal.SIGKILL)
        killed.append(victim)

    out, model = generate_with(swarm, smollm2_dir, ids, lambda m: AfterTokens(20, lambda: kill(m)))
    assert killed and swarm.servers[killed[0]].proc.wait(5) is not None
    assert torch.equal(out, expected)


@pytest.mark.real_model
def test_stalled_server_times_out_and_is_replaced(smollm2_pair_swarm, smollm2_dir, expected_64):
    swarm, (ids, expected) = smollm2_pair_swarm, expected_64
    stopped = []

    def stall(model):
        victim = server_in_route(model, swarm, "15:30")
        os.kill(swarm.servers[victim].proc.pid, signal.SIGSTOP)  # its libp2p daemon stays up: only silence
        stopped.append(victim)

    try:
        t0 = time.monotonic()
        out, _ = generate_with(swarm, smollm2_dir, ids, lambda m: AfterTokens(10, lambda: stall(m)), request_timeout=3)
        assert stopped and time.monotonic() - t0 >= 3
        assert torch.equal(out, expected)
    finally:
        for name in stopped:
            os.kill(swarm.servers[name].proc.pid, signal.SIGCONT)


@pytest.mark.real_model
def test_a_server_joining_mid_generation_takes_over_the_dead_ones_blocks(smollm2_dir, expected_64):
    ids, expected = expected_64
    with LocalSwarm(str(smollm2_dir), [ServerSpec("0:15"), ServerSpec("15:30")]) as swarm:

        def kill_and_replace():
            os.killpg(swarm.servers["server1"].proc.pid, signal.SIGKILL)
            swarm.add_server("newcomer", ServerSpec("15:30"), wait=False)

        out, _ = generate_with(swarm, smollm2_dir, ids, lambda m: AfterTokens(16, kill_and_replace),
                               missing_blocks_timeout=180)
        assert swarm.servers["newcomer"].proc.poll() is None
        assert torch.equal(out, expected)


def test_chaos_of_crashes_and_restarts_never_changes_outputs(tiny_llama_dir):
    """Two servers per half of a tiny model; a chaos thread keeps SIGKILLing a random server and starting a
    replacement. Every generation completes, and equals local greedy decoding.

    The thread kills a server only while its partner on the same half is serving: that is the redundancy
    the swarm promises to survive. Killing blindly, on a loaded machine, sometimes kills both copies and
    then each replacement before it is ready (a start takes longer than the time between kills), and the
    half stays empty past any timeout."""
    local = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    specs = {"a0": "0:2", "a1": "0:2", "b0": "2:4", "b1": "2:4"}
    with LocalSwarm(str(tiny_llama_dir), []) as swarm:
        for name, blocks in specs.items():
            swarm.add_server(name, ServerSpec(blocks), wait=False)
        for name in specs:
            swarm.server_lines[name] = swarm.servers[name].wait_for("server ready:", 120)
        stop, kills = threading.Event(), []
        rng = random.Random(0)

        def serving(name: str) -> bool:
            return any(line.startswith("server ready:") for line in swarm.servers[name].log)

        def chaos():
            while not stop.wait(rng.uniform(1.0, 3.0)):
                name = rng.choice(sorted(specs))
                partner = next(n for n in specs if n != name and specs[n] == specs[name])
                if not (serving(name) and serving(partner)):
                    continue
                os.killpg(swarm.servers[name].proc.pid, signal.SIGKILL)
                kills.append(name)
                swarm.add_server(name, ServerSpec(specs[name]), wait=False)

        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_llama_dir), initial_peers=swarm.initial_peers, request_timeout=5, missing_blocks_timeout=120,
            update_period=1, ban_time=3,
        )
        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        try:
            gen = torch.Generator().manual_seed(1)
            done = 0
            while done < 5 or len(kills) < 5:  # kills wait for restarts, so 5 kills take a few restarts' time
                ids = torch.randint(1, 96, (1, 5), generator=gen)
                out = model.generate(ids, max_new_tokens=24, do_sample=False)
                assert torch.equal(out, local.generate(ids, max_new_tokens=24, do_sample=False))
                done += 1
        finally:
            stop.set()
            thread.join(30)
            model.sequence_manager.shutdown()
        assert len(kills) >= 5, kills
