"""A real server's Prometheus endpoint follows its work: requests, tokens, steps, sessions, cache and errors,
and its record's `tokens_served` agrees with the metrics."""

from __future__ import annotations

import logging
import time
import urllib.request

import pytest
import torch
from hivemind.proto import runtime_pb2
from prometheus_client.parser import text_string_to_metric_families

from swarmllm import AutoDistributedModelForCausalLM, wire
from swarmllm.client import loop
from swarmllm.launcher import LocalSwarm, ServerSpec
from swarmllm.observe.snapshot import collect
from swarmllm.protocol import RPC_FORWARD, RPC_INFO, ErrorCode, ServerRecord, SpanReply, SpanRequest

pytestmark = pytest.mark.swarm

Samples = dict[tuple[str, frozenset], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return get(after, name, **labels) - get(before, name, **labels)


def wait_until(url: str, check, timeout: float = 10.0) -> Samples:
    """Scrape until `check(samples)` holds: a session closes asynchronously after the client's side does."""
    deadline = time.monotonic() + timeout
    while not check(samples := scrape(url)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return samples


def retries(caplog) -> int:
    """Split calls the client's transport sent again since the last call, their stream having broken before any
    reply (client/transport.py); the server counted both tries, and did the first one's work if it got that far."""
    n = sum("trying once more" in r.getMessage() for r in caplog.records)
    caplog.clear()
    return n


def test_metrics_follow_the_servers_work(tiny_llama_dir, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="swarmllm.client.transport")
    began = time.monotonic()
    with LocalSwarm(str(tiny_llama_dir), [ServerSpec("0:4", extra=("--metrics-port", "0"))]) as swarm:
        url = next(line.split()[1] for line in swarm.servers["server0"].log if line.startswith("metrics: "))
        peer = swarm.server_lines["server0"].split(" peer ")[1].split()[0]
        model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_llama_dir), initial_peers=swarm.initial_peers)
        try:
            ids = torch.randint(1, 90, (1, 5), generator=torch.Generator().manual_seed(0))
            start = scrape(url)
            assert get(start, "swarmllm_server_info", model=tiny_llama_dir.name, blocks="0:4", peer_id=peer,
                       dtype="float32", quant="none") == 1
            assert get(start, "swarmllm_cache_bytes_capacity") == 2 * 2**30

            caplog.clear()
            with torch.no_grad():
                model(ids)  # one stateless forward of 5 tokens
            after_forward, tries = scrape(url), 1 + retries(caplog)
            assert grew(start, after_forward, "swarmllm_requests_total", rpc="forward") == tries
            forward_tokens = grew(start, after_forward, "swarmllm_tokens_total", kind="forward")
            assert forward_tokens in range(5, 5 * tries + 1, 5)
            assert grew(start, after_forward, "swarmllm_step_seconds_count", kind="forward") == forward_tokens // 5
            assert grew(start, after_forward, "swarmllm_step_seconds_sum", kind="forward") > 0

            model.generate(ids, max_new_tokens=4, do_sample=False)  # one session: a prefill of 5, then 3 steps of 1
            after_generate = wait_until(url, lambda s: get(s, "swarmllm_active_sessions") == 0)
            assert grew(after_forward, after_generate, "swarmllm_requests_total", rpc="inference") == 1
            assert grew(after_forward, after_generate, "swarmllm_tokens_total", kind="inference") == 8
            assert grew(after_forward, after_generate, "swarmllm_step_seconds_count", kind="inference") == 4
            assert grew(after_forward, after_generate, "swarmllm_batch_steps_total") == 4

            with model.inference_session(max_length=16):
                model.generate(ids, max_new_tokens=1, do_sample=False)
                during = scrape(url)
                assert get(during, "swarmllm_active_sessions") == 1
                assert get(during, "swarmllm_cache_bytes_used") > 0
                # The swarm snapshot (status, monitor) shows it at once: the ping returns the live record,
                # where the DHT's is up to announce_ttl/3 old.
                manager = model.sequence_manager
                [view] = collect(manager.transport.peer, manager.transport.p2p, [manager.model_name]).models
                [server] = view.servers
                assert server.active_sessions == 1 and server.rtt_ms is not None
            closed = wait_until(url, lambda s: get(s, "swarmllm_active_sessions") == 0)
            assert get(closed, "swarmllm_active_sessions") == 0
            assert get(closed, "swarmllm_cache_bytes_used") == 0

            # Blocks 0:8 of a 4-block model are served by nobody: a typed refusal, counted by its code.
            bad = wire.request(SpanRequest(start=0, end=8), torch.randn(1, 3, 32), torch.arange(3)[None])
            with pytest.raises(wire.RemoteError) as refused:
                wire.parse(loop.run(model.sequence_manager.call_split(peer, RPC_FORWARD, bad), timeout=30), SpanReply)
            assert refused.value.code == ErrorCode.NOT_SERVING
            after_error = scrape(url)
            assert grew(closed, after_error, "swarmllm_errors_total", code="not_serving") == 1
            assert grew(closed, after_error, "swarmllm_requests_total", rpc="forward") == 1 + retries(caplog)

            # The record counts the same tokens as the metrics.
            reply = loop.run(model.sequence_manager.call(peer, RPC_INFO, runtime_pb2.ExpertRequest()), timeout=30)
            record = wire.parse(reply, ServerRecord)[0]
            tokens = sum(get(after_error, "swarmllm_tokens_total", kind=k) for k in ("inference", "forward", "backward"))
            assert record.tokens_served == tokens == forward_tokens + 8 + 5
        finally:
            model.sequence_manager.shutdown()
    assert time.monotonic() - began < 60
