"""The swarm as an adapter hub: a real `swarmllm adapters publish` process seeds, other peers fetch by name.

Fetched files must be byte-identical; limits, unknown names and tampered providers fail before anything
is stored.
"""

from __future__ import annotations

import json
import re
import signal

import pytest

from swarmllm.adapters.package import (
    AdapterError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    AdapterVerificationError,
)
from swarmllm.adapters.store import AdapterStore
from swarmllm.adapters.swarm_hub import SwarmHub, SyncSwarmHub
from swarmllm.client import loop as io_loop
from swarmllm.dht.node import join
from swarmllm.launcher import spawn
from tests.unit.test_adapter_store import files_of, make_lora

pytestmark = pytest.mark.swarm

LOOPBACK = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run one `swarmllm` command to completion; its process group is killed whatever happens."""
    child = spawn(args[0], args, env=env)
    try:
        rc = child.proc.wait(timeout)
    finally:
        child.stop()
    return rc, "".join(child.log)


@pytest.fixture(scope="module")
def initial_peers():
    child = spawn("dht", ["dht", *LOOPBACK])
    try:
        yield child.wait_for("initial peers:", 120).split(":", 1)[1].split()
    finally:
        child.stop()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # ~2.7 MiB: the adapter_get stream carries it in three chunks.
    return make_lora(tmp_path_factory.mktemp("adapters") / "tiny-lora", numel=700_000)


@pytest.fixture(scope="module")
def publisher(initial_peers, source, tmp_path_factory):
    """`swarmllm adapters publish` as a real process, with a cache of its own; yields (child, line)."""
    env = {"SWARMLLM_CACHE": str(tmp_path_factory.mktemp("publisher-cache"))}
    child = spawn("publisher", ["adapters", "publish", str(source), "--name", "tiny-lora", "--model", "tiny",
                                "--initial-peers", *initial_peers, *LOOPBACK], env=env)
    try:
        yield child, child.wait_for("published:", 120).strip()
    finally:
        child.stop()


def _peer(initial_peers, store_dir, **kwargs) -> SyncSwarmHub:
    dht = join(initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"]).dht
    return SyncSwarmHub(dht, AdapterStore(store_dir), own_dht=True, request_timeout=10, **kwargs)


@pytest.fixture(scope="module")
def peer(initial_peers, tmp_path_factory):
    """An in-process peer that serves, with an empty store."""
    hub = _peer(initial_peers, tmp_path_factory.mktemp("peer-store"))
    yield hub
    hub.shutdown()


def _published(line: str) -> tuple[str, int, str]:
    m = re.match(r"published: tiny-lora sha256=([0-9a-f]{64}) size=(\d+) kind=lora model=tiny peer (\S+)", line)
    assert m, line
    return m[1], int(m[2]), m[3]


def test_fetch_by_name_is_byte_identical_and_the_fetcher_provides_it(publisher, peer, source) -> None:
    sha, size, publisher_id = _published(publisher[1])
    path = peer.fetch("tiny-lora", model="tiny")
    assert files_of(path) == files_of(source)
    assert peer.store.sha_of("tiny-lora") == sha == path.name
    assert len(peer.store.packed(sha)) == size
    assert set(peer.providers(sha)) == {publisher_id, peer.hub.peer_id}


def test_list_shows_the_adapter(publisher, initial_peers) -> None:
    sha, size, _ = _published(publisher[1])
    rc, out = run_cli(["adapters", "list", "--initial-peers", *initial_peers, *LOOPBACK, "--json"])
    assert rc == 0, out
    lines = out.splitlines()  # stdout and stderr come together: the JSON is the block from "[" to "]"
    listing = json.loads("\n".join(lines[lines.index("[") : len(lines) - lines[::-1].index("]")]))
    (entry,) = [e for e in listing if e["name"] == "tiny-lora"]
    assert (entry["sha256"], entry["size"], entry["kind"], entry["model"]) == (sha, size, "lora", "tiny")
    assert entry["providers"] >= 1

    rc, out = run_cli(["adapters", "list", "--initial-peers", *initial_peers, *LOOPBACK])
    assert rc == 0, out
    assert re.search(rf"^tiny-lora\s+lora\s+tiny\s+[\d.]+ (?:B|KiB|MiB)\s+{sha[:12]}\s+\d+$", out, re.M), out


def test_too_large_is_refused_before_download(publisher, peer, tmp_path) -> None:
    _, size, _ = _published(publisher[1])
    small = SwarmHub(peer.hub.dht, AdapterStore(tmp_path / "store"), max_bytes=100)

    async def no_download(record):
        raise AssertionError("downloaded despite the size limit")

    small._download_any = no_download
    with pytest.raises(AdapterTooLargeError, match=f"is {size} bytes, more than the limit of 100 bytes"):
        io_loop.run(small.fetch("tiny-lora"))
    assert small.store.shas() == []


def test_unknown_name_and_wrong_model_are_refused(publisher, peer) -> None:
    with pytest.raises(AdapterNotFoundError, match="no peer in the swarm has an adapter named 'no-such-adapter'"):
        peer.fetch("no-such-adapter")
    with pytest.raises(AdapterError, match="published for model 'tiny', not 'other'"):
        peer.fetch("tiny-lora", model="other")


def test_tampered_provider_fails_verification_and_nothing_is_stored(initial_peers, tmp_path) -> None:
    with _peer(initial_peers, tmp_path / "evil-store") as evil, _peer(initial_peers, tmp_path / "victim") as victim:
        record = evil.publish(make_lora(tmp_path / "evil-lora", seed=5), "evil-lora", "tiny")
        weights = evil.store.path(record.sha256) / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # same size, different content: only the hash can tell
        weights.write_bytes(bytes(data))

        with pytest.raises(AdapterVerificationError, match="served bytes that do not match"):
            victim.fetch("evil-lora")
        assert victim.store.path(record.sha256) is None and victim.store.sha_of("evil-lora") is None
        leftovers = list(victim.store.root.iterdir()) if victim.store.root.exists() else []
        assert [p for p in leftovers if p.name not in (".lock", "names.json")] == []
        assert victim.providers(record.sha256) == [evil.hub.peer_id]


def test_cli_fetch_copies_the_adapter_out(publisher, initial_peers, source, tmp_path) -> None:
    sha, _, _ = _published(publisher[1])
    out_dir = tmp_path / "out"
    rc, out = run_cli(["adapters", "fetch", "tiny-lora", "--initial-peers", *initial_peers, *LOOPBACK,
                       "--out", str(out_dir)], env={"SWARMLLM_CACHE": str(tmp_path / "cache")})
    assert rc == 0, out
    assert f"fetched: tiny-lora sha256={sha} -> {out_dir}" in out
    assert files_of(out_dir) == files_of(source)


def test_publisher_exits_cleanly_on_sigterm(publisher) -> None:
    child, _ = publisher
    child.proc.send_signal(signal.SIGTERM)
    assert child.proc.wait(30) == 0, "".join(child.log[-20:])
