"""Contribution points on a real swarm: serving earns points as countersigned receipts in the DHT, a
contributor's work is served before a free rider's under contention, and forged or replayed receipts are
refused."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from swarmllm import AutoDistributedModelForCausalLM, wire
from swarmllm.client import loop
from swarmllm.dht.node import join
from swarmllm.dht.points import get_receipts, publish_receipts
from swarmllm.launcher import LocalSwarm, ServerSpec, run
from swarmllm.points import Ledger, countersign, issue
from swarmllm.protocol import RPC_SETTLE, Settle, Settled
from swarmllm.trust.identity import Identity

pytestmark = pytest.mark.swarm

FAST = ("--announce-ttl", "3")  # publish receipts and refresh balances every second


def _peer(line: str) -> str:
    return line.split(" peer ")[1].split()[0]


def _client(model_dir, swarm, **config):
    config.setdefault("settle_period", 0.5)
    return AutoDistributedModelForCausalLM.from_pretrained(str(model_dir), initial_peers=swarm.initial_peers, **config)


def _forwards(model, n: int, latencies: list[float]) -> None:
    hidden, positions = torch.randn(16, 512, 32), torch.arange(512).repeat(16, 1)
    for _ in range(n):
        t0 = time.perf_counter()
        model.model.layers(hidden, positions)
        latencies.append(time.perf_counter() - t0)


def _points(swarm) -> dict[str, float]:
    out = run(["points", "--json", "--initial-peers", *swarm.initial_peers], timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return {row["account"]: row["balance"] for row in json.loads(out.stdout)}


@pytest.fixture(scope="module")
def points_swarm(tiny_llama_dir, tmp_path_factory):
    """server0 runs as the contributor's identity; server1 is where the contention happens."""
    identity = tmp_path_factory.mktemp("contributor") / "identity.key"
    specs = [ServerSpec("0:4", ("--identity", str(identity), *FAST)), ServerSpec("0:4", (*FAST, "--metrics-port", "0"))]
    with LocalSwarm(str(tiny_llama_dir), specs) as swarm:
        yield swarm, identity


def test_a_contributor_is_served_before_a_free_rider(tiny_llama_dir, points_swarm) -> None:
    swarm, identity = points_swarm
    earner, busy = _peer(swarm.server_lines["server0"]), _peer(swarm.server_lines["server1"])
    assert Identity(identity).peer_id == earner

    # server0 earns points by serving someone; the receipts reach the DHT once that client settles.
    user = _client(tiny_llama_dir, swarm, allowed_servers=[earner])
    user_id = user.sequence_manager.points.account.peer_id
    _forwards(user, 10, [])
    user.sequence_manager.shutdown()  # settles what is due
    per_call = 4 * 16 * 512  # blocks x tokens
    # What the client sent: 10 calls, plus any it retried (on a loaded machine a call can time out after
    # the server did the work; the server did it twice and is paid twice, honestly).
    work = user.sequence_manager.points.requested.requested(earner)
    assert work >= 10 * per_call and work % per_call == 0, work
    deadline = time.monotonic() + 30  # (periodic settlements may show a part of it first)
    while (balances := _points(swarm)).get(earner, 0) < work and time.monotonic() < deadline:
        time.sleep(1)
    assert balances[earner] == work and balances[user_id] == -work

    # Contention on server1: the contributor (spending server0's account) against a free rider. What proves
    # priority is server1's own choice of which waiting task runs next, counted for every pass where both
    # waited, not the clients' latencies (which a loaded machine blurs).
    url = swarm.metrics_urls()["server1"]
    contributor = _client(tiny_llama_dir, swarm, allowed_servers=[busy], account=str(identity))
    rider = _client(tiny_llama_dir, swarm, allowed_servers=[busy])
    served = {"contributor": [], "rider": []}
    try:
        _forwards(contributor, 1, [])  # binds the account at server1
        before = _picks(url)
        # Until server1 has read the contributor's balance (it refreshes every second), no pass is contested.
        for _ in range(20):  # until 10 contested passes; a loaded machine needed more than 10 rounds once
            threads = [threading.Thread(target=_forwards, args=(model, 6, served[name]))
                       for name, model in (("contributor", contributor), ("rider", rider)) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            picks = {to: n - before[to] for to, n in _picks(url).items()}
            if sum(picks.values()) >= 10:
                break
    finally:
        contributor.sequence_manager.shutdown()
        rider.sequence_manager.shutdown()
    assert len(served["rider"]) == len(served["contributor"])  # the free rider is served too
    contested = sum(picks.values())
    assert contested >= 10, picks
    # The contributor leads every contested pass but the newcomers' guaranteed share (0.2 by default): the
    # rider gets one pick in 5, exactly (plus at most one from the credit the policy held before).
    assert picks["newcomer"] in (contested // 5, contested // 5 + 1), picks
    assert picks["contributor"] == contested - picks["newcomer"] > picks["newcomer"] >= 2, picks


def _picks(url: str) -> dict[str, float]:
    """server1's `swarmllm_contested_picks_total`, by who got the pass."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {s.labels["to"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "swarmllm_contested_picks_total"}


def test_forged_and_replayed_receipts_are_refused(tiny_llama_dir, points_swarm) -> None:
    swarm, _ = points_swarm
    busy = _peer(swarm.server_lines["server1"])
    model = _client(tiny_llama_dir, swarm, allowed_servers=[busy], settle_period=3600)
    manager = model.sequence_manager
    try:
        _forwards(model, 2, [])
        receipt = loop.run(manager.points.settle(busy))
        assert receipt.total_work == 2 * 4 * 16 * 512

        def settle(r):
            return loop.run(manager._call_unbound(busy, RPC_SETTLE, wire.request(Settle(receipt=r))))

        # Replayed: the same countersigned total again.
        with pytest.raises(wire.RemoteError, match="replayed"):
            wire.parse(settle(receipt), Settled, busy)
        # Forged: an inflated total keeps the old signatures.
        with pytest.raises(wire.RemoteError, match="receipt refused"):
            wire.parse(settle(receipt.model_copy(update={"total_work": receipt.total_work + 1})), Settled, busy)
        # Self-minted: countersigned by a key that is not the server's.
        stranger = Identity.ephemeral()
        minted = countersign(manager.points.account, issue(stranger, manager.points.account.peer_id, 10**6, receipt.epoch), 10**6)
        with pytest.raises(wire.RemoteError, match="receipt refused"):
            wire.parse(settle(minted), Settled, busy)
    finally:
        manager.shutdown()

    # A forged receipt published in the DHT (under the forger's own name, the only one it may store under)
    # earns nothing: readers check both signatures.
    forger = join(swarm.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        victim = Identity.ephemeral()
        fake = issue(forger.identity, victim.peer_id, 10**9, 1).model_copy(update={"client_key": "AAAA", "client_sig": "AAAA"})
        publish_receipts(forger.dht, [fake], ttl=60)
        receipts = get_receipts(forger.dht)
        assert any(r.server == forger.peer_id for r in receipts)  # it is there, and ignored
        assert Ledger.from_receipts(receipts).balance(forger.peer_id) == 0
        assert forger.peer_id not in _points(swarm)
    finally:
        forger.dht.shutdown()

