"""Prometheus metrics of one server: what it serves, how fast, and what it refuses.

Each `ServerMetrics` owns its registry (never prometheus_client's global one), so several servers in one
process, as in tests, never clash. Counting is cheap enough for the hot path (labelled children are resolved
once, so an increment is one locked add, about a microsecond); the gauges that mirror server state are read by
callbacks only when scraped. With `--metrics-port` they are served at `http://HOST:PORT/metrics`; without it
nothing listens, and the counts still feed the server's record (`tokens_served`).

Metrics and labels:

- `swarmllm_requests_total{rpc}` counter: requests received, by RPC: `info`, `forward`, `backward`,
  `inference` (one per session stream; its steps are counted by `swarmllm_step_seconds`), `push`, `lora_put`.
- `swarmllm_tokens_total{kind}` counter: tokens (batch rows x positions) run through this server's span, by
  `kind`: `inference`, `forward`, `backward`. A request or step counts once it has computed, whatever the
  number of blocks it ran through; the same tokens earn the requester contribution points.
- `swarmllm_step_seconds{kind}` histogram: seconds from handing a forward or backward request, or an inference
  step, to the compute thread until its result, waiting behind other work included; computed ones only.
- `swarmllm_errors_total{code}` counter: error replies sent, by `ErrorCode` value (`internal`: an unexpected
  exception; `not_member`: a private swarm's gate refused an outsider). Not counted: refused pushed steps
  (the pusher gets no reply; the client's own copy follows).
- `swarmllm_active_sessions` gauge: inference sessions open now.
- `swarmllm_cache_bytes_used`, `swarmllm_cache_bytes_capacity` gauges: attention-cache bytes granted to
  sessions now, and the server's budget (`--max-cache-bytes`).
- `swarmllm_cache_waiters` gauge: sessions waiting in the queue for cache memory now.
- `swarmllm_batch_steps_total`, `swarmllm_batch_passes_total` counters: inference steps computed and the
  forward passes that computed them; their ratio is the mean batch (a chunked prefill counts once per chunk).
- `swarmllm_server_info{model,blocks,peer_id,dtype,quant}` gauge, always 1: what this server serves
  (`blocks` is START:END; it changes when the server moves).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from swarmllm.protocol import ErrorCode

if TYPE_CHECKING:
    from swarmllm.server.cache import CacheMemory
    from swarmllm.server.scheduler import Scheduler

logger = logging.getLogger(__name__)

Rpc = Literal["info", "forward", "backward", "inference", "push", "lora_put"]
Kind = Literal["inference", "forward", "backward"]

# From a decode step of a small span on a GPU (about a millisecond) to a long prefill or a backward of a big
# span on a CPU (tens of seconds).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Counters of one server's work, in a registry of its own; optionally served over HTTP.

    Counting methods are called on the server's event loop; scrapes read from the HTTP thread, which
    prometheus_client makes safe. `tokens_served` is the total of `swarmllm_tokens_total` as an int.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tokens_served = 0
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        r = self.registry
        requests = Counter("swarmllm_requests", "Requests received, by RPC", ["rpc"], registry=r)
        tokens = Counter("swarmllm_tokens", "Tokens run through this server's span", ["kind"], registry=r)
        steps = Histogram("swarmllm_step_seconds", "Seconds per request or inference step on the compute thread, "
                          "queueing included", ["kind"], buckets=STEP_BUCKETS, registry=r)
        self._errors = Counter("swarmllm_errors", "Error replies sent, by error code", ["code"], registry=r)
        # Children resolved once, and every label present from the start (at 0), so that rates exist at once.
        self._requests = {rpc: requests.labels(rpc) for rpc in get_args(Rpc)}
        self._tokens = {kind: tokens.labels(kind) for kind in get_args(Kind)}
        self._steps = {kind: steps.labels(kind) for kind in get_args(Kind)}
        for code in ErrorCode:
            self._errors.labels(code.value)
        self.active_sessions = Gauge("swarmllm_active_sessions", "Inference sessions open now", registry=r)
        self.cache_used = Gauge("swarmllm_cache_bytes_used", "Attention-cache bytes granted to sessions", registry=r)
        self.cache_capacity = Gauge("swarmllm_cache_bytes_capacity", "Attention-cache budget in bytes", registry=r)
        self.cache_waiters = Gauge("swarmllm_cache_waiters", "Sessions waiting for cache memory", registry=r)
        self.info = Gauge("swarmllm_server_info", "What this server serves (always 1)",
                          ["model", "blocks", "peer_id", "dtype", "quant"], registry=r)
        self._batching = _Batching()
        r.register(self._batching)

    def watch(self, memory: CacheMemory, active_sessions: Callable[[], int], scheduler: Scheduler) -> None:
        """Read the gauges from the server's live state at each scrape (not on the hot path)."""
        self.cache_used.set_function(lambda: memory.used)
        self.cache_capacity.set_function(lambda: memory.budget)
        self.cache_waiters.set_function(lambda: memory.queued)
        self.active_sessions.set_function(active_sessions)
        self._batching.scheduler = scheduler

    def set_info(self, model: str, start: int, end: int, peer_id: str, dtype: str, quant: str) -> None:
        self.info.clear()  # one series only, also after a move to other blocks
        self.info.labels(model, f"{start}:{end}", peer_id, dtype, quant).set(1)

    def request(self, rpc: Rpc) -> None:
        self._requests[rpc].inc()

    def served(self, kind: Kind, tokens: int, seconds: float) -> None:
        """A request or step of `tokens` tokens computed in `seconds`."""
        self._tokens[kind].inc(tokens)
        self._steps[kind].observe(seconds)
        self.tokens_served += tokens

    def error(self, code: ErrorCode) -> None:
        self._errors.labels(code.value).inc()

    def start_http(self, host: str, port: int) -> int:
        """Serve `/metrics` on `host:port` (0: any free port) from a daemon thread; returns the bound port."""
        if self._http is not None:
            raise RuntimeError("the metrics endpoint is already serving")
        self._http = start_http_server(port, addr=host, registry=self.registry)
        bound = self._http[0].server_port
        logger.info("serving metrics at http://%s:%d/metrics", host, bound)
        return bound

    def stop(self) -> None:
        """Stop serving `/metrics`, if serving; counting goes on."""
        if self._http is not None:
            server, thread = self._http
            self._http = None
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


class _Batching(Collector):
    """The scheduler's own step and pass counts, read at scrape time (the compute thread is never touched)."""

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None

    def collect(self) -> Iterator[Metric]:
        scheduler = self.scheduler
        if scheduler is None:
            return
        yield CounterMetricFamily("swarmllm_batch_steps", "Inference steps computed", value=scheduler.steps_run)
        yield CounterMetricFamily("swarmllm_batch_passes", "Forward passes that computed the inference steps",
                                  value=scheduler.passes_run)
        if scheduler.policy is not None:
            picks = CounterMetricFamily("swarmllm_contested_picks",
                                        "Tasks run while a peer with points and one without both waited, by "
                                        "who got the pass (newcomer: by the guaranteed share)", labels=["to"])
            picks.add_metric(["contributor"], scheduler.policy.contributor_picks)
            picks.add_metric(["newcomer"], scheduler.policy.newcomer_picks)
            yield picks
