"""A private swarm admits only holders of its key: an outsider process can neither read or announce spans
nor get any server RPC to do work, even with a member's proof sniffed off the wire."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.launcher import LocalSwarm, ServerSpec
from swarmllm.trust.swarm_key import SwarmKey
from tests.integration.test_metrics import scrape

pytestmark = pytest.mark.swarm

ROOT = Path(__file__).resolve().parents[2]


def test_outsider_can_neither_announce_nor_call(tiny_llama_dir, tmp_path) -> None:
    key, audit = tmp_path / "swarm.key", tmp_path / "audit.jsonl"
    spec = ServerSpec("0:4", ("--audit-log", str(audit), "--metrics-port", "0"))
    with LocalSwarm(str(tiny_llama_dir), [spec], swarm_key=str(key)) as swarm:
        server_id = swarm.server_lines["server0"].split(" peer ")[1].split()[0]
        metrics_url = swarm.metrics_urls()["server0"]
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_llama_dir), initial_peers=swarm.initial_peers, swarm_key=str(key))
        try:
            manager = model.sequence_manager
            member_proof = SwarmKey.load(key).proof(manager.peer_id)
            outsider = subprocess.run(
                [sys.executable, "-m", "tests.integration.outsider", manager.model_name, server_id, member_proof,
                 *swarm.initial_peers], capture_output=True, text=True, timeout=120, cwd=ROOT,
            )
            assert outsider.returncode == 0, outsider.stderr[-3000:]
            report = json.loads(outsider.stdout.strip().splitlines()[-1])

            # Sealed records: the outsider sees no server; its own announcement never reaches members.
            assert report["seen_servers"] == []
            time.sleep(1.0)
            assert [r.peer_id for r in manager.directory.servers(manager.model_name)] == [server_id]
            # Every RPC refused, whatever proof it tried: none, forged, or a member's (bound to that member).
            for attempt, calls in report["calls"].items():
                assert calls == dict.fromkeys(("info", "forward", "inference", "lora_put", "push"), "not_member"), attempt
            # ...and each refusal counted in the server's metrics, so operators see outsiders knocking.
            refused = sum(len(calls) for calls in report["calls"].values())
            assert scrape(metrics_url)[("swarmllm_errors_total", frozenset({("code", "not_member")}))] == refused

            # Members are served as usual, with exact results.
            ids = torch.randint(1, 90, (1, 6))
            local = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
            assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False),
                               local.generate(ids, max_new_tokens=5, do_sample=False))
        finally:
            model.sequence_manager.shutdown()
    # Refused before any work: the server's audit log (one line per call it handled) never names the outsider.
    peers = {json.loads(line)["peer"] for line in audit.read_text().splitlines()}
    assert report["peer_id"] not in peers and peers == {manager.peer_id}


def test_client_without_the_key_sees_no_servers(tiny_llama_dir, tmp_path) -> None:
    with LocalSwarm(str(tiny_llama_dir), [ServerSpec("0:4")], swarm_key=str(tmp_path / "swarm.key")) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_llama_dir), initial_peers=swarm.initial_peers, missing_blocks_timeout=2)
        try:
            with pytest.raises(Exception, match="no server in the swarm holds blocks 0:4"):
                model.generate(torch.randint(1, 90, (1, 4)), max_new_tokens=2, do_sample=False)
        finally:
            model.sequence_manager.shutdown()
