"""The pure parts of verification: distances, the three-way vote, which servers are comparable, reports."""

from __future__ import annotations

import torch

from swarmllm.client.verification import agree, comparable, odd_one_out, relative_error
from swarmllm.dht.reports import reported
from swarmllm.protocol import Report, ServerRecord


def test_relative_error() -> None:
    x = torch.randn(2, 3, 8)
    assert relative_error(x, x) == 0
    assert abs(relative_error(x * 1.01, x) - 0.01) < 1e-6
    assert relative_error(x[:, :2], x) == float("inf")
    assert relative_error(x.masked_fill(x > 0, float("nan")), x) == float("inf")


def test_the_third_server_decides() -> None:
    honest = torch.randn(1, 2, 16)
    wrong = honest + torch.randn_like(honest)
    rounding = honest * (1 + 1e-7)
    assert odd_one_out(wrong, honest, rounding, 1e-3) == "primary"
    assert odd_one_out(honest, wrong, rounding, 1e-3) == "second"
    assert odd_one_out(honest, wrong, honest + 2 * torch.randn_like(honest), 1e-3) is None
    assert agree(honest, rounding, 1e-3) and not agree(honest, wrong, 1e-3)


def test_only_like_servers_are_compared() -> None:
    a = ServerRecord(peer_id="a", start=0, end=4, dtype="float32", cache_tokens_left=1)
    assert comparable(a, a.model_copy(update={"peer_id": "b"}))
    assert not comparable(a, a.model_copy(update={"quant": "int8"}))
    assert not comparable(a, a.model_copy(update={"dtype": "bfloat16"}))
    assert not comparable(a, a.model_copy(update={"override": "tuned"}))


def test_reports_count_distinct_reporters() -> None:
    def report(reporter: str, offender: str) -> Report:
        return Report(reporter=reporter, offender=offender, start=0, end=1, error=1.0, tolerance=0.01, at=0.0)

    reports = [report("r1", "x"), report("r1", "x"), report("r2", "x"), report("r1", "y")]
    assert reported(reports, 1) == {"x", "y"}
    assert reported(reports, 2) == {"x"}
    assert reported(reports, 0) == frozenset()
