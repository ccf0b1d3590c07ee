"""Every subcommand's flags come from a config: defaults and help are written once, and what the parser
reads is what the config validates."""

from __future__ import annotations

import pytest

from swarmllm.cli.configs import DhtConfig, GenerateConfig, LocalConfig, PointsConfig, StatusConfig
from swarmllm.cli.main import build_parser
from swarmllm.cli.options import config_from_args


def _config(config_cls, *argv: str):
    return config_from_args(config_cls, build_parser().parse_args(list(argv)))


def test_flags_and_defaults_come_from_the_configs() -> None:
    assert _config(DhtConfig, "dht") == DhtConfig()
    assert _config(DhtConfig, "dht", "--private", "--swarm-key", "k").private
    status = _config(StatusConfig, "status", "--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/Qm", "--json")
    assert status.json_output and status.initial_peers == ["/ip4/1.2.3.4/tcp/1/p2p/Qm"] and status.model == []
    assert not _config(PointsConfig, "points", "--initial-peers", "a").json_output
    assert _config(LocalConfig, "local") == LocalConfig()  # the model argument is optional: smollm2
    assert _config(LocalConfig, "local", "gemma3", "--servers", "2", "--once") == LocalConfig(model="gemma3", servers=2,
                                                                                             once=True)
    assert _config(GenerateConfig, "generate", "smollm2", "--prompt", "hi").max_new_tokens == 128


@pytest.mark.parametrize("argv", [
    ["status"],  # --initial-peers is required
    ["generate", "smollm2"],  # so is --prompt
    ["local", "--servers", "two"],
])
def test_missing_or_malformed_flags_are_refused(argv) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def test_values_the_config_refuses_are_refused_by_name() -> None:
    with pytest.raises(SystemExit, match="servers"):
        _config(LocalConfig, "local", "--servers", "0")
