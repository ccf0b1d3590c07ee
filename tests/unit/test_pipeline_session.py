"""Blocks the client runs itself keep their own cache: a rewind and a beam reorder act on it as the servers
act on theirs (transformers' DynamicCache.crop and reorder_cache)."""

from __future__ import annotations

import torch

from swarmllm.client.pipeline import LocalBlocks, _LocalSession
from swarmllm.models.span import span_from_model
from tests.unit.test_span_exact import _model


def test_a_local_session_rewinds_and_reorders_its_cache() -> None:
    model = _model("llama")
    span = span_from_model(model, 0, 4)
    hidden = torch.randn(2, 5, 32)
    positions = torch.arange(5).expand(2, -1)
    with torch.no_grad():
        want = span(hidden, positions)
        session = _LocalSession(LocalBlocks(span, None))
        session.step(hidden[:, :3], positions[:, :3], None)
        session.step(torch.randn(2, 2, 32), positions[:, 3:], None)  # taken back
        session.rewind(3)
        torch.testing.assert_close(session.step(hidden[:, 3:], positions[:, 3:], None), want[:, 3:], rtol=1e-5, atol=1e-5)
        session.rewind(4)
        session.reorder(torch.tensor([1, 1]))  # both rows continue row 1
        out = session.step(hidden[1:, 4:].expand(2, -1, -1), positions[:, 4:], None)
    torch.testing.assert_close(out, want[1:, 4:].expand(2, -1, -1), rtol=1e-5, atol=1e-5)
