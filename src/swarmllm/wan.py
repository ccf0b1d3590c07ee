"""WAN emulation on one Linux machine, for benchmarks and tests of routing over slow links.

Each emulated host is a network namespace joined to a bridge by a veth pair. `tbf` limits the rate of its
outgoing traffic. A delay is added by a userspace relay (`swarmllm.relay`) in the host's namespace, not by
`sch_netem`, which many kernels (this project's CI among them) do not have: the host's peer process listens
on the namespace's loopback, the relay listens on the host's address and holds every segment for half the
link's round trip each way, and the peer announces the relay's address (`Host.peer_args`). Every
connection to the host then crosses the delay. Processes run in a host with `ip netns exec`, so peers talk
over real TCP through the shaped links.

A connection gets the delay of the host it was dialed to, in both directions, whoever uses it. That equals
netem's per-host egress delays when every host has the same condition (the benchmark). Where hosts differ, a
connection that a delayed host dials to an undelayed one skips the delay: an undelayed peer should not be
dialed, as a client in client mode is not (the routing test).

It needs root and iproute2. `unavailable()` says what is missing; tests skip with that reason. Only the
namespaces, links, bridge and relays created here are removed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from swarmllm.launcher import Child, spawn
from swarmllm.relay import measure_rtt


class WanUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Link:
    """The link of one host to the rest: round trip it adds to each of its exchanges, and egress rate."""

    rtt_ms: float = 0.0
    rate_mbit: float = 1000.0


# Ports within a delayed host's namespace: its peer process listens on loopback, its relay on the host's address.
PEER_PORT, RELAY_PORT = 40000, 4001


@dataclass
class Host:
    name: str  # the network namespace
    ip: str
    link: Link

    @property
    def delayed(self) -> bool:
        return self.link.rtt_ms > 0

    @property
    def maddr(self) -> str:
        """Where its peer process listens."""
        return f"/ip4/127.0.0.1/tcp/{PEER_PORT}" if self.delayed else f"/ip4/{self.ip}/tcp/0"

    @property
    def peer_args(self) -> list[str]:
        """The options of a `swarmllm dht` or `serve` run in this host: listen, and announce the relay if any."""
        args = ["--host-maddrs", self.maddr]
        return [*args, "--announce-maddrs", f"/ip4/{self.ip}/tcp/{RELAY_PORT}"] if self.delayed else args


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise WanUnavailable(f"`{' '.join(cmd)}` failed: {result.stderr.strip()}")


def unavailable() -> str | None:
    """Why this machine cannot emulate a WAN (None if it can): tried for real, in a throwaway namespace."""
    if os.geteuid() != 0:
        return "WAN emulation needs root (network namespaces and tc)"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "WAN emulation needs iproute2 (ip and tc)"
    probe = f"swprobe{os.getpid()}"
    try:
        _ip("ip", "netns", "add", probe)
        _ip("ip", "link", "set", "lo", "up", ns=probe)
        _ip("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "100mbit", "burst", "32kb", "latency", "50ms", ns=probe)
    except WanUnavailable as e:
        return str(e)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ready(child: Child, line: str) -> Child:
    """`child` once it has printed `line` (within 30 s); stopped if it does not."""
    try:
        child.wait_for(line, 30)
    except BaseException:
        child.stop()
        raise
    return child


class WanNetwork:
    """Hosts on one emulated network. Use as a context manager; everything created is removed on exit."""

    _count = itertools.count()

    def __init__(self, prefix: str = "sw", subnet: str = "10.77.0", overhead_ms: float | None = None):
        """`overhead_ms`: what a path through a relay adds besides its holds (default: measured in the first
        delayed host, `_calibrate`)."""
        # Unique per network: interface names must not collide with a previous network's, whose teardown
        # the kernel may still be finishing. (Linux limits interface names to 15 characters.)
        self.prefix, self.subnet = f"{prefix}{os.getpid() % 10000}{next(self._count)}", subnet
        self.bridge = f"{self.prefix}br"
        self.hosts: list[Host] = []
        self.children: list[Child] = []
        self.relays: dict[str, Child] = {}  # host name -> its relay
        self.overhead_ms = overhead_ms

    def __enter__(self) -> WanNetwork:
        _ip("ip", "link", "add", self.bridge, "type", "bridge")
        _ip("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("ip", "link", "set", self.bridge, "up")
        return self

    def add_host(self, link: Link) -> Host:
        i = len(self.hosts)
        host = Host(f"{self.prefix}h{i}", f"{self.subnet}.{i + 2}", link)
        outside, inside = f"{self.prefix}h{i}a", f"{self.prefix}h{i}b"
        _ip("ip", "netns", "add", host.name)
        self.hosts.append(host)
        _ip("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("ip", "link", "set", inside, "netns", host.name)
        _ip("ip", "link", "set", outside, "master", self.bridge, "up")
        _ip("ip", "addr", "add", f"{host.ip}/24", "dev", inside, ns=host.name)
        _ip("ip", "link", "set", inside, "up", ns=host.name)
        _ip("ip", "link", "set", "lo", "up", ns=host.name)
        _ip("tc", "qdisc", "add", "dev", inside, "root", "tbf", "rate", f"{link.rate_mbit}mbit", "burst", "256kb",
            "latency", "100ms", ns=host.name)
        if host.delayed:
            self._start_relay(host)
        return host

    def _start_relay(self, host: Host) -> None:
        if self.overhead_ms is None:
            self.overhead_ms = self._calibrate(host)
        self.relays[host.name] = self._relay(host, RELAY_PORT, host.link.rtt_ms, self.overhead_ms)

    def _relay(self, host: Host, port: int, rtt_ms: float, overhead_ms: float) -> Child:
        args = [f"{host.ip}:{port}", f"127.0.0.1:{PEER_PORT}", "--delay-ms", str(rtt_ms), "--overhead-ms", f"{overhead_ms:.3f}"]
        return _ready(spawn(f"relay-{host.name}-{port}", args, prefix=("ip", "netns", "exec", host.name),
                            module="swarmllm.relay"), "relay ready:")

    def _calibrate(self, host: Host, probe_ms: float = 0.5) -> float:
        """What the path through a relay adds besides its holds, measured on `host`'s own path (the bridge,
        the veth pair, the relay's copies and thread wakeups): a relay told to add `probe_ms`, with nothing
        taken off, before the real one starts. About 0.1 to 0.25 ms here."""
        probe = self._relay(host, RELAY_PORT, probe_ms, 0.0)
        echo = self._echo(host)
        try:
            return max(0.0, measure_rtt((host.ip, RELAY_PORT), rounds=100) - probe_ms)
        finally:
            echo.stop()
            probe.stop()

    def _echo(self, host: Host) -> Child:
        """An echo service where `host`'s peer listens (before the peer starts): the far end of `rtt_ms`."""
        where = f"127.0.0.1:{PEER_PORT}" if host.delayed else f"{host.ip}:{RELAY_PORT}"
        return _ready(spawn(f"echo-{host.name}", [where, "--echo"], prefix=("ip", "netns", "exec", host.name),
                            module="swarmllm.relay"), "echo ready:")

    def stop_relay(self, host: Host) -> None:
        """Kill `host`'s relay (a link that goes down): connections through it break."""
        self.relays[host.name].stop()

    def dead_relays(self) -> list[str]:
        """The hosts whose relay has exited: their links are down."""
        return [name for name, relay in self.relays.items() if relay.proc.poll() is not None]

    def rtt_ms(self, host: Host, rounds: int = 30) -> float:
        """The round trip measured from the root namespace to `host` (through its relay, if delayed), before
        its peer starts: an echo service takes the peer's place for the measurement."""
        echo = self._echo(host)
        try:
            return measure_rtt((host.ip, RELAY_PORT), rounds=rounds)
        finally:
            echo.stop()

    def spawn(self, host: Host, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> Child:
        """Run `swarmllm <args>` inside `host`; stopped on exit."""
        child = spawn(name, args, env=env, prefix=("ip", "netns", "exec", host.name))
        self.children.append(child)
        return child

    def __exit__(self, *exc) -> None:
        for child in [*reversed(self.children), *self.relays.values()]:
            child.stop()
        for host in self.hosts:
            subprocess.run(["ip", "link", "del", f"{host.name}a"], capture_output=True)  # and its peer inside
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
