"""The client's backbone refuses what it cannot give, instead of silently returning less."""

from __future__ import annotations

import pytest
import torch

from swarmllm.client.model import DistributedBackbone
from swarmllm.models.family import family_of, root_of
from swarmllm.models.shards import block_of
from swarmllm.models.span import span_from_model
from tests.unit.test_span_exact import _model


def test_router_logits_are_refused_by_name_and_are_none_otherwise() -> None:
    """An MoE head reads `router_logits` from the backbone's output; the routers run on the servers, so a
    request for them (the auxiliary load-balancing loss) is refused, and otherwise they are None."""
    model = _model("mixtral")
    backbone = DistributedBackbone(model.config, model.base_model, layers=lambda h, pos, mask: h)
    ids = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="output_router_logits is not supported through the swarm"):
        backbone(ids, output_router_logits=True)
    out = backbone(ids)
    assert out.router_logits is None and out.last_hidden_state.shape == (1, 4, 32)


@pytest.mark.parametrize("name", ["llama", "opt", "bloom"])
def test_the_backbone_keeps_client_modules_at_transformers_paths_and_runs_them_as_the_model_does(name: str) -> None:
    """Checkpoint keys stay transformers' (`model.decoder.embed_tokens.weight` for OPT), and with its blocks
    run locally the backbone gives the base model's own output: BLOOM's embedding layernorm, OPT's
    projections and learned positions included."""
    model = _model(name)
    blocks = span_from_model(model, 0, model.config.num_hidden_layers)
    root = root_of(model, family_of(model.config))
    backbone = DistributedBackbone(model.config, root, layers=lambda h, pos, mask: blocks(h, pos, mask))
    own = {k for k in root.state_dict() if block_of(k) is None}
    assert set(backbone.state_dict()) == own
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(backbone(ids).last_hidden_state, root(ids).last_hidden_state,
                                   rtol=0, atol=0)
