"""verify=FRACTION against a deliberately corrupting server: the client catches it, routes around it,
reports it in the DHT, and its output equals the honest output; other clients avoid it by the report."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.launcher import LocalSwarm, ServerSpec

pytestmark = pytest.mark.swarm


def _peer(line: str) -> str:
    return line.split(" peer ")[1].split()[0]


@pytest.fixture(scope="module")
def swarm_with_liar(tiny_llama_dir):
    """Three servers of the whole model; server0 adds noise to every output and claims to be the fastest."""
    specs = [ServerSpec("0:4", ("--test-corrupt-outputs", "0.5")), ServerSpec("0:4"), ServerSpec("0:4")]
    with LocalSwarm(str(tiny_llama_dir), specs) as swarm:
        yield swarm, _peer(swarm.server_lines["server0"])


def _client(tiny_llama_dir, swarm, near: str | None = None, **config):
    """A client that has measured its round trips to every server; `near` then looks closest of all, as an
    attacker next door would (loopback round trips vary by milliseconds, which would decide routes by chance)."""
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_llama_dir), initial_peers=swarm.initial_peers, ping_period=600, **config)
    manager = model.sequence_manager
    deadline = time.monotonic() + 20
    while len(manager.rtts) < len(swarm.servers) and time.monotonic() < deadline:
        manager.servers(force=not manager.rtts)
        time.sleep(0.1)
    if near is not None:
        manager.rtts[near] = 0.0
    return model


def _until_caught(swarm, make_client, use, liar: str, attempts: int = 3):
    """A client made by `make_client` on which `use` (asserting exact outputs) ends with the liar caught:
    banned and reported by that client. A connection to the liar that drops (seen on loaded machines) makes a
    client avoid it for a while before anything is checked, with exact outputs from the honest servers; a fresh
    client then meets the liar again. Only the returned client is still running."""
    for _ in range(attempts):
        client = make_client()
        manager = client.sequence_manager
        try:
            use(client)
            assert liar in manager.banned(), "the liar was neither caught nor avoided after a failure"
            if _reported_by(manager, liar):
                return client
        except Exception as e:
            manager.shutdown()
            tails = "".join(f"--- {name}\n" + "".join(child.log[-20:]) for name, child in swarm.servers.items())
            raise AssertionError(f"{e!r}; the servers' last lines:\n{tails}") from e
        except BaseException:
            manager.shutdown()
            raise
        manager.shutdown()
    raise AssertionError(f"no client caught the liar in {attempts} attempts")


def _reported_by(manager, liar: str, wait: float = 20.0) -> bool:
    """Whether `manager`'s client has reported the liar. A report is stored in the DHT without blocking, so it
    may appear a moment after the ban: wait for it (a client that avoided the liar after a failure never
    reports it, and costs this wait)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if (manager.peer_id, liar) in {(r.reporter, r.offender) for r in manager.directory.reports(manager.model_name)}:
            return True
        time.sleep(0.2)
    return False


def test_verification_catches_and_reports_a_corrupting_server(tiny_llama_dir, swarm_with_liar) -> None:
    swarm, liar = swarm_with_liar
    ids = torch.randint(1, 90, (2, 7))
    local = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    honest = local.generate(ids, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        honest_logits = local(ids).logits

    # Without verification the liar, advertised as fastest, is chosen and the output is wrong.
    trusting = _client(tiny_llama_dir, swarm, near=liar, trust_reports=0)
    try:
        assert trusting.sequence_manager.make_route(0, 4)[0].peer_id == liar
        assert not torch.equal(trusting.generate(ids, max_new_tokens=10, do_sample=False), honest)
    finally:
        trusting.sequence_manager.shutdown()

    # Stateless forward calls (as in fine-tuning) are checked the same way.
    def forward_checked(client):
        with torch.no_grad():
            torch.testing.assert_close(client(ids).logits, honest_logits, rtol=1e-4, atol=1e-4)

    forward_checking = _until_caught(swarm, lambda: _client(tiny_llama_dir, swarm, near=liar, verify=1.0, trust_reports=0),
                                     forward_checked, liar)
    forward_checking.sequence_manager.shutdown()

    # Sessions: this client ignores the report above, so it meets the liar and must catch it itself.
    def session_checked(client):
        assert torch.equal(client.generate(ids, max_new_tokens=10, do_sample=False), honest)

    checking = _until_caught(swarm, lambda: _client(tiny_llama_dir, swarm, near=liar, verify=0.3, trust_reports=0),
                             session_checked, liar)
    try:
        manager = checking.sequence_manager
        reports = manager.directory.reports(manager.model_name)
        assert {(r.reporter, r.offender) for r in reports} == {
            (manager.peer_id, liar), (forward_checking.sequence_manager.peer_id, liar)}
        assert all(r.error > r.tolerance for r in reports)
        # The next session routes around it from the start (it is banned here).
        assert manager.make_route(0, 4)[0].peer_id != liar
        assert torch.equal(checking.generate(ids, max_new_tokens=10, do_sample=False), honest)
    finally:
        checking.sequence_manager.shutdown()

    # A fresh client that verifies nothing avoids the reported server (other servers hold its blocks).
    newcomer = _client(tiny_llama_dir, swarm, near=liar)
    try:
        newcomer.sequence_manager.servers(force=True)
        assert newcomer.sequence_manager.reported == {liar}
        assert torch.equal(newcomer.generate(ids, max_new_tokens=10, do_sample=False), honest)
    finally:
        newcomer.sequence_manager.shutdown()


# A mismatch with no third server, and a dead checker, are tested over the loopback transport
# (tests/unit/test_loopback_sessions.py): they need no processes.
