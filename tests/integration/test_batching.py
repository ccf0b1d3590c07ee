"""Concurrent sessions of the real SmolLM2 share the servers' forward passes and still get their solo output."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest

from swarmllm.launcher import spawn

pytestmark = [pytest.mark.swarm, pytest.mark.real_model]

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea and the wind at night:",
    "1, 2, 3,",
    "A bank account is a financial account maintained by a bank for a customer. Its balance",
]


def _server_totals(child) -> tuple[int, int]:
    found = [re.search(r"server total: (\d+) steps in (\d+) passes", line) for line in child.log]
    steps, passes = [m for m in found if m][-1].groups()
    return int(steps), int(passes)


def test_concurrent_sessions_of_different_lengths_equal_their_solo_outputs(
    smollm2_swarm, smollm2_client, smollm2_local, smollm2_tokenizer
) -> None:
    inputs = [smollm2_tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    want = [smollm2_local.generate(ids, max_new_tokens=24, do_sample=False)[0].tolist() for ids in inputs]
    before = {name: _server_totals(c) if any("server total" in x for x in c.log) else (0, 0)
              for name, c in smollm2_swarm.servers.items()}
    marks = {name: len(c.log) for name, c in smollm2_swarm.servers.items()}
    got: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(inputs))

    def client(i: int) -> None:
        barrier.wait()
        got[i] = smollm2_client.generate(inputs[i], max_new_tokens=24, do_sample=False)[0].tolist()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, prompt in enumerate(PROMPTS):
        assert got.get(i) == want[i], f"prompt {prompt!r}"
    # The steps really were batched: each server ran fewer passes than steps. (Totals are read from the
    # servers' session-close lines, which arrive a moment after the clients finish.)
    deadline = time.monotonic() + 30
    for name, child in smollm2_swarm.servers.items():
        while sum("server total" in x for x in child.log[marks[name]:]) < len(inputs) and time.monotonic() < deadline:
            time.sleep(0.2)
        steps, passes = (a - b for a, b in zip(_server_totals(child), before[name]))
        assert steps >= 4 * 16 and passes < steps, (name, steps, passes)


def test_a_client_killed_mid_batch_does_not_disturb_the_others(
    smollm2_swarm, smollm2_dir, smollm2_client, smollm2_local, smollm2_tokenizer
) -> None:
    """A second client process (`swarmllm generate`) is SIGKILLed while its steps share passes with ours."""
    marks = {name: len(c.log) for name, c in smollm2_swarm.servers.items()}
    other = spawn("doomed-client", ["generate", str(smollm2_dir), "--initial-peers", *smollm2_swarm.initial_peers,
                                    "--max-new-tokens", "400", "--prompt", "Count from one to a thousand:"])
    try:
        deadline = time.monotonic() + 120
        while not all(_opened_since(c, marks[n]) for n, c in smollm2_swarm.servers.items()):
            assert other.proc.poll() is None and time.monotonic() < deadline, "".join(other.log[-20:])
            time.sleep(0.2)
        ids = smollm2_tokenizer(PROMPTS[3], return_tensors="pt").input_ids
        result: dict = {}
        mine = threading.Thread(target=lambda: result.update(
            out=smollm2_client.generate(ids, max_new_tokens=40, do_sample=False)[0].tolist()))
        mine.start()
        time.sleep(2.0)
        os.killpg(other.proc.pid, signal.SIGKILL)  # the client and its libp2p daemon, mid-stream
        other.proc.wait(10)
        mine.join(300)
    finally:
        if other.proc.poll() is None:
            os.killpg(other.proc.pid, signal.SIGKILL)
    assert result["out"] == smollm2_local.generate(ids, max_new_tokens=40, do_sample=False)[0].tolist()
    # Every server noticed the dead stream and freed that session (its close line), and still serves.
    for name, child in smollm2_swarm.servers.items():
        deadline = time.monotonic() + 30
        while sum("closed after" in x for x in child.log[marks[name]:]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sum("closed after" in x for x in child.log[marks[name]:]) >= 2, name


def _opened_since(child, mark: int) -> bool:
    return any("opened by" in line for line in child.log[mark:])
