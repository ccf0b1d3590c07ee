"""The client's backbone refuses what it cannot give, instead of silently returning less."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swarmllm.models.distributed import DistributedBackbone
from tests.unit.test_span_exact import CONFIGS


def test_router_logits_are_refused_by_name_and_are_none_otherwise() -> None:
    """An MoE head reads `router_logits` from the backbone's output; the routers run on the servers, so a
    request for them (the auxiliary load-balancing loss) is refused, and otherwise they are None."""
    config = CONFIGS["mixtral"]()
    backbone = DistributedBackbone(config, nn.Embedding(97, 32), nn.Identity(), layers=lambda h, pos, mask: h)
    ids = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="output_router_logits is not supported through the swarm"):
        backbone(ids, output_router_logits=True)
    out = backbone(ids)
    assert out.router_logits is None and out.last_hidden_state.shape == (1, 4, 32)
