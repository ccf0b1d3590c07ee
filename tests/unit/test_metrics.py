"""ServerMetrics without a server: counts move, gauges read live state, and /metrics parses."""

from __future__ import annotations

import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarmllm.points.priority import PriorityPolicy
from swarmllm.protocol import ErrorCode
from swarmllm.server.cache import CacheMemory
from swarmllm.server.config import ServerConfig
from swarmllm.server.metrics import ServerMetrics


def value(metrics: ServerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_counters_histogram_and_gauges_move() -> None:
    metrics = ServerMetrics()
    memory, sessions, scheduler = CacheMemory(1000, 1.0), [0], SimpleNamespace(steps_run=0, passes_run=0, policy=None)
    metrics.watch(memory, lambda: sessions[0], scheduler)
    metrics.set_info("tiny", 0, 4, "QmPeer", "float32", "none")
    # Every label exists from the start, at 0, so a rate is defined before the first event.
    assert value(metrics, "swarmllm_requests_total", rpc="push") == 0
    assert value(metrics, "swarmllm_errors_total", code="too_long") == 0

    metrics.request("forward")
    metrics.request("forward")
    metrics.served("forward", 12, 0.003)
    metrics.served("inference", 5, 0.2)
    metrics.served("inference", 1, 0.002)
    metrics.error(ErrorCode.TOO_LONG)
    memory.used, sessions[0] = 256, 2
    scheduler.steps_run, scheduler.passes_run = 6, 4

    assert value(metrics, "swarmllm_requests_total", rpc="forward") == 2
    assert value(metrics, "swarmllm_tokens_total", kind="inference") == 6
    assert value(metrics, "swarmllm_tokens_total", kind="forward") == 12
    assert metrics.tokens_served == 18
    assert value(metrics, "swarmllm_step_seconds_count", kind="inference") == 2
    assert value(metrics, "swarmllm_step_seconds_sum", kind="inference") == pytest.approx(0.202)
    assert value(metrics, "swarmllm_step_seconds_bucket", kind="inference", le="0.005") == 1
    assert value(metrics, "swarmllm_errors_total", code="too_long") == 1
    assert value(metrics, "swarmllm_cache_bytes_used") == 256
    assert value(metrics, "swarmllm_cache_bytes_capacity") == 1000
    assert value(metrics, "swarmllm_active_sessions") == 2
    assert value(metrics, "swarmllm_batch_steps_total") == 6
    assert value(metrics, "swarmllm_batch_passes_total") == 4
    info = dict(model="tiny", blocks="0:4", peer_id="QmPeer", dtype="float32", quant="none")
    assert value(metrics, "swarmllm_server_info", **info) == 1

    metrics.set_info("tiny", 2, 4, "QmPeer", "float32", "none")  # a move: one series, the new span
    assert value(metrics, "swarmllm_server_info", **info) is None
    assert value(metrics, "swarmllm_server_info", **{**info, "blocks": "2:4"}) == 1


def test_contested_picks_count_the_priority_policys_choices() -> None:
    """With points on, the scheduler's policy says who led each contested pass; without, there is no series."""
    metrics = ServerMetrics()
    metrics.watch(CacheMemory(1000, 1.0), lambda: 0, SimpleNamespace(steps_run=0, passes_run=0, policy=None))
    assert value(metrics, "swarmllm_contested_picks_total", to="contributor") is None

    policy = PriorityPolicy(lambda peer: 5.0 if peer == "rich" else 0.0)
    metrics.watch(CacheMemory(1000, 1.0), lambda: 0, SimpleNamespace(steps_run=0, passes_run=0, policy=policy))
    for _ in range(10):
        policy.pick(["poor", "rich"])
    policy.pick(["rich", "rich"])  # nobody without points waits: not contested
    assert value(metrics, "swarmllm_contested_picks_total", to="contributor") == 8
    assert value(metrics, "swarmllm_contested_picks_total", to="newcomer") == 2


def test_http_endpoint_serves_parseable_text_and_stops() -> None:
    metrics = ServerMetrics()
    metrics.served("backward", 7, 0.5)
    port = metrics.start_http("127.0.0.1", 0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert {"swarmllm_requests", "swarmllm_tokens", "swarmllm_step_seconds", "swarmllm_errors",
                "swarmllm_active_sessions", "swarmllm_cache_bytes_used"} <= set(families)
        tokens = {s.labels["kind"]: s.value for s in families["swarmllm_tokens"].samples if s.name.endswith("_total")}
        assert tokens == {"inference": 0, "forward": 0, "backward": 7}
    finally:
        metrics.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    metrics.stop()  # a second stop (or one without a start) does nothing


def test_two_servers_in_one_process_do_not_clash() -> None:
    a, b = ServerMetrics(), ServerMetrics()
    a.request("info")
    assert value(a, "swarmllm_requests_total", rpc="info") == 1
    assert value(b, "swarmllm_requests_total", rpc="info") == 0
    ports = a.start_http("127.0.0.1", 0), b.start_http("127.0.0.1", 0)
    try:
        assert ports[0] != ports[1]
    finally:
        a.stop()
        b.stop()


def test_metrics_port_is_off_by_default_and_bounded() -> None:
    assert ServerConfig(model="m", blocks="0:1").metrics_port is None
    assert ServerConfig(model="m", blocks="0:1", metrics_port=0).metrics_port == 0
    with pytest.raises(ValueError, match="65535"):
        ServerConfig(model="m", blocks="0:1", metrics_port=65536)
