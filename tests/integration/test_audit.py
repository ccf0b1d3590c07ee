"""The audit log records who used which blocks when, for every call and session, and never a payload."""

from __future__ import annotations

import json
import time

import pytest
import torch

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.launcher import LocalSwarm, ServerSpec
from swarmllm.server.audit import AuditEntry

pytestmark = pytest.mark.swarm


def test_audit_log_records_calls_and_sessions_without_payloads(tiny_llama_dir, tmp_path) -> None:
    log = tmp_path / "audit.jsonl"
    with LocalSwarm(str(tiny_llama_dir), [ServerSpec("0:4", ("--audit-log", str(log)))]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_llama_dir), initial_peers=swarm.initial_peers, max_retries=0)
        try:
            me = model.sequence_manager.peer_id
            ids = torch.randint(1, 90, (2, 5))
            model.generate(ids, max_new_tokens=3, do_sample=False)  # one session: prefill + 2 decode steps
            hidden = torch.randn(1, 4, 32, requires_grad=True)
            model.model.layers(hidden, torch.arange(4)[None]).sum().backward()  # forward + backward
            with pytest.raises(Exception, match="hidden states must be"):
                model.model.layers(torch.randn(1, 4, 31), torch.arange(4)[None])  # refused: wrong width
        finally:
            model.sequence_manager.shutdown()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(log.read_text().splitlines()) < 4:
            time.sleep(0.1)
    entries = [AuditEntry(**json.loads(line)) for line in log.read_text().splitlines()]
    by_rpc = {(e.rpc, e.outcome): e for e in entries}
    assert all(e.peer == me for e in entries)
    session = by_rpc[("inference", "ok")]
    assert (session.start, session.end, session.steps, session.tokens) == (0, 4, 3, 2 * 5 + 2 * 2)
    assert (by_rpc[("forward", "ok")].tokens, by_rpc[("backward", "ok")].tokens) == (4, 4)
    assert by_rpc[("forward", "bad_request")].start == 0
    assert set(json.loads(log.read_text().splitlines()[0])) == set(AuditEntry.__dataclass_fields__)
