"""Verification reports in the DHT: published by the client that caught a server, read by every client.

Schema: `swarmllm.v1.<model>.reports`, subkey `<reporter>/<offender>`, value a `Report`. The subkey names its
reporter, so the record is accepted only if the reporter signed it (trust.records): a report cannot be
forged in another peer's name. A peer can still report falsely under its own name, which is why clients
count *distinct* reporters (ClientConfig.trust_reports) and avoid a reported server only while others hold
its blocks.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from hivemind import DHT
from hivemind.utils import get_dht_time

from swarmllm.dht.records import parse_subkeyed
from swarmllm.protocol import PROTOCOL_VERSION, Report

logger = logging.getLogger(__name__)


def reports_key(model: str) -> str:
    return f"swarmllm.v{PROTOCOL_VERSION}.{model}.reports"


def publish_report(dht: DHT, model: str, report: Report, ttl: float):
    """Store the report without blocking (returns the DHT's future)."""
    return dht.store(reports_key(model), subkey=f"{report.reporter}/{report.offender}", value=report.model_dump(mode="json"),
                     expiration_time=get_dht_time() + ttl, return_future=True)


def parse_reports(raw: dict | None) -> list[Report]:
    reports = parse_subkeyed(raw, Report, lambda r: f"{r.reporter}/{r.offender}")
    return [r for r in reports if r.reporter != r.offender]


def get_reports(dht: DHT, model: str) -> list[Report]:
    found = dht.get(reports_key(model), latest=True)
    return parse_reports(found.value if found is not None else None)


def reported(reports: list[Report], min_reporters: int) -> frozenset[str]:
    """Servers reported by at least `min_reporters` distinct peers (never, if min_reporters is 0)."""
    if min_reporters <= 0:
        return frozenset()
    by = defaultdict(set)
    for r in reports:
        by[r.offender].add(r.reporter)
    return frozenset(peer for peer, reporters in by.items() if len(reporters) >= min_reporters)
