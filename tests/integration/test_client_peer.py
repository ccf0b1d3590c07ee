"""A client joins the swarm as its command line says: `--announce-maddrs` and `--host-maddrs` of a client
subcommand reach its DHT node and p2p daemon."""

from __future__ import annotations

import pytest

from swarmllm.cli.main import build_parser
from swarmllm.cli.options import config_from_args
from swarmllm.client.config import ClientConfig
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.dht.node import join

pytestmark = pytest.mark.swarm

# An address of TEST-NET-3 (RFC 5737): nobody listens there, and the daemon announces it all the same.
ANNOUNCED = "/ip4/203.0.113.7/tcp/31337"


def test_a_client_announces_the_addresses_of_its_command_line() -> None:
    bootstrap = join(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    manager = None
    try:
        initial = [str(m) for m in bootstrap.dht.get_visible_maddrs()]
        args = build_parser().parse_args(["generate", "some-model", "--prompt", "hi", "--initial-peers", *initial,
                                          "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--announce-maddrs", ANNOUNCED])
        config = config_from_args(ClientConfig, args)
        assert config.announce_maddrs == [ANNOUNCED]
        manager = SequenceManager.join(config, "some-model", num_blocks=1)
        node = manager.directory.dht
        assert [str(m).split("/p2p/")[0] for m in node.get_visible_maddrs()] == [ANNOUNCED]
    finally:
        if manager is not None:
            manager.shutdown()
        bootstrap.dht.shutdown()

