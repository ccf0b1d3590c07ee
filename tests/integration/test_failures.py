"""Bad input and failing peers on a real swarm of tiny-model processes: each gets a clear error, nothing leaks."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.inference_session import PromptTooLongError
from swarmllm.client.routing import MissingBlocksError
from swarmllm.launcher import LocalSwarm, ServerSpec, spawn

pytestmark = pytest.mark.swarm


def _group_gone(pgid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize(
    "args, message",
    [
        (["--blocks", "2:9"], "invalid span 2:9"),
        (["--blocks", "3:1"], "invalid span"),
        (["--blocks", "0:2", "--num-blocks", "2"], "exactly one of"),
    ],
)
def test_bad_span_is_refused_and_leaves_no_process(tiny_llama_dir, args, message) -> None:
    child = spawn("bad-span", ["serve", str(tiny_llama_dir), *args])
    assert child.proc.wait(60) != 0
    assert message in "".join(child.log)
    assert _group_gone(child.proc.pid)


def test_unknown_model_is_refused(tmp_path) -> None:
    child = spawn("unknown", ["serve", str(tmp_path / "no-such-model"), "--blocks", "0:1"])
    assert child.proc.wait(60) != 0
    assert "unknown model" in "".join(child.log)
    assert _group_gone(child.proc.pid)


@pytest.fixture(scope="module")
def tiny_swarm(tiny_llama_dir):
    specs = [
        # 200 tokens of cache (2 blocks x 2 kv heads x 8 dims x 4 bytes x keys and values = 256 B per token),
        # in pages of 16 tokens.
        ServerSpec("0:2", ("--max-cache-bytes", str(200 * 256), "--cache-page-tokens", "16", "--cache-queue-timeout", "1",
                           "--session-timeout", "3", "--announce-ttl", "3")),
        ServerSpec("2:4"),
        ServerSpec("2:4"),
    ]
    with LocalSwarm(str(tiny_llama_dir), specs) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def tiny_client(tiny_swarm, tiny_llama_dir):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_llama_dir), initial_peers=tiny_swarm.initial_peers, request_timeout=10, missing_blocks_timeout=5
    )
    yield model
    model.sequence_manager.shutdown()


@pytest.fixture(scope="module")
def tiny_local(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _peer_of(swarm: LocalSwarm, name: str) -> str:
    return swarm.server_lines[name].split(" peer ")[1].split()[0]


def test_prompt_longer_than_max_length(tiny_client) -> None:
    ids = torch.randint(1, 90, (1, 6))
    with tiny_client.inference_session(max_length=4):
        with pytest.raises(PromptTooLongError, match="max_length=4"):
            tiny_client.generate(ids, max_new_tokens=2)


# A server's cache budget, its queue and idle sessions (refused, queued, outgrowing, timed out and rebuilt)
# are tested over the loopback transport (tests/unit/test_loopback_sessions.py): they need no processes.


def test_gradients_flow_back_through_the_servers(tiny_client, tiny_local) -> None:
    """loss.backward() on the client sends gradients through every server's backward RPC."""
    ids = torch.randint(1, 90, (2, 6))
    grads = []
    for model in (tiny_client, tiny_local):
        embeds = tiny_local.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits.square().mean().backward()
        grads.append(embeds.grad)
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_server_gone_before_session_opens_is_routed_around(tiny_client, tiny_local, tiny_swarm) -> None:
    manager = tiny_client.sequence_manager
    victim_peer = _peer_of(tiny_swarm, "server1")
    # SIGKILL: the server cannot withdraw its record, so the DHT still lists it when the session opens.
    os.killpg(tiny_swarm.servers["server1"].proc.pid, signal.SIGKILL)
    assert victim_peer in {r.peer_id for r in manager.servers(force=True)}
    ids = torch.randint(1, 90, (2, 5))
    # Stateless forward (spread at random over both 2:4 servers): a call to the dead one fails, it is
    # banned, and the redundant server answers.
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(tiny_client(ids).logits, tiny_local(ids).logits, rtol=0, atol=1e-5)
    manager._bans.clear()
    # Make the dead server look like the fastest, so that the session's route goes to it first. Marking it
    # pinged now also makes the result of any ping of it still in flight stale, so that cannot undo this.
    manager.rtts[victim_peer], manager._pinged[victim_peer] = 0.0, time.monotonic()
    assert victim_peer in {h.peer_id for h in manager.make_route()}
    out = tiny_client.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, tiny_local.generate(ids, max_new_tokens=6, do_sample=False))
    assert victim_peer in manager.banned()


def test_shutdown_withdraws_the_record_at_once(tiny_client, tiny_swarm) -> None:
    manager = tiny_client.sequence_manager
    child = tiny_swarm.add_server("extra", ServerSpec("1:3"))
    peer = _peer_of(tiny_swarm, "extra")
    assert peer in {r.peer_id for r in manager.servers(force=True)}
    child.proc.send_signal(signal.SIGTERM)
    assert child.proc.wait(30) == 0
    # The record's TTL is 30 s; it is gone long before that because the server announced itself offline.
    assert peer not in {r.peer_id for r in manager.directory.servers(manager.model_name)}


def test_missing_blocks_fail_after_timeout_naming_them(tiny_llama_dir, tiny_swarm, tmp_path) -> None:
    # The same weights under another name form another model in the DHT, served only for block 0.
    other = tmp_path / "tiny-other"
    shutil.copytree(tiny_llama_dir, other)
    tiny_swarm.model = str(other)
    tiny_swarm.add_server("partial", ServerSpec("0:1"))
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(other), initial_peers=tiny_swarm.initial_peers, missing_blocks_timeout=2
    )
    try:
        t0 = time.monotonic()
        with pytest.raises(MissingBlocksError, match=r"blocks 1:4 after waiting 2s"):
            model.generate(torch.randint(1, 90, (1, 3)), max_new_tokens=2)
        assert time.monotonic() - t0 >= 2
    finally:
        model.sequence_manager.shutdown()


def test_servers_announce_measured_speed_and_clients_measure_round_trips(tiny_client, tiny_swarm) -> None:
    manager = tiny_client.sequence_manager
    alive = [_peer_of(tiny_swarm, n) for n in ("server0", "server2")]  # server1 was killed above
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        records = {r.peer_id: r for r in manager.servers(force=True)}
        first = records.get(_peer_of(tiny_swarm, "server0"))
        # A server banned by an earlier test counts as unreachable until its next ping answers: wait for it.
        if first is not None and first.next_rtts and all(manager.rtts.get(p, 9) < 1 for p in alive):
            break
        time.sleep(0.5)
    assert all(r.step_time > 0 and r.forward_tps > 0 for r in records.values())
    # server0 holds 0:2 and measured its links to the servers of block 2 (a dead one counts as the timeout).
    assert set(first.next_rtts) <= {_peer_of(tiny_swarm, n) for n in ("server1", "server2")}
    assert first.next_rtts.get(_peer_of(tiny_swarm, "server2"), 9) < 1
    assert all(0 < v <= 2 for v in first.next_rtts.values())
    assert all(0 < manager.rtts[p] < 1 for p in alive)
