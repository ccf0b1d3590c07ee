"""Prometheus metrics of the API host, served by the app itself at `GET /metrics`.

The servers' metrics (server/metrics.py) say what each span computes; these say what users get:

- `swarmllm_api_requests_total{endpoint,status}` counter: requests answered, by route and HTTP status
  (streams count with their 200, also when they end with an error event);
- `swarmllm_api_requests_in_progress` gauge: completions admitted and not finished (queued ones included);
- `swarmllm_api_prompt_tokens_total`, `swarmllm_api_completion_tokens_total` counters;
- `swarmllm_api_first_token_seconds` histogram: from admission to the first piece of text (queueing, the
  prompt's prefill through every server, and the first step);
- `swarmllm_api_request_seconds{endpoint}` histogram: whole completions, streamed or not;
- `swarmllm_api_cancelled_total` counter: completions stopped because the client went away;
- with API keys (api/auth.py), per key name: `swarmllm_api_key_requests_total{key}` (requests let in) and
  `swarmllm_api_key_tokens_total{key,kind}` (`prompt` and `completion` tokens of finished completions; each
  of `n` choices prefills the prompt, so counts it).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ApiMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("swarmllm_api_requests", "Requests answered, by route and status",
                                ["endpoint", "status"], registry=r)
        self.in_progress = Gauge("swarmllm_api_requests_in_progress", "Completions admitted, not finished", registry=r)
        self.prompt_tokens = Counter("swarmllm_api_prompt_tokens", "Prompt tokens of finished completions", registry=r)
        self.completion_tokens = Counter("swarmllm_api_completion_tokens", "Tokens generated", registry=r)
        self.first_token = Histogram("swarmllm_api_first_token_seconds", "Seconds from admission to the first text",
                                     buckets=BUCKETS, registry=r)
        self.duration = Histogram("swarmllm_api_request_seconds", "Seconds per completion", ["endpoint"],
                                  buckets=BUCKETS, registry=r)
        self.cancelled = Counter("swarmllm_api_cancelled", "Completions stopped because the client went away",
                                 registry=r)

        self.key_requests = Counter("swarmllm_api_key_requests", "Requests let in, by API key name", ["key"],
                                    registry=r)
        self.key_tokens = Counter("swarmllm_api_key_tokens", "Tokens of finished completions, by API key name",
                                  ["key", "kind"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
