"""WAN emulation on one Linux machine, for benchmarks and tests of routing over slow links.

Each emulated host is a network namespace joined to a bridge by a veth pair. Its outgoing traffic is
shaped with tc: `netem` adds the one-way delay (half the wanted round trip: the reply is delayed by the
other host's egress) and limits the rate; without a delay, `tbf` limits the rate alone. Processes run in
a host with `ip netns exec`, so peers talk over real TCP through the shaped links.

It needs root, iproute2, and for delays the `sch_netem` kernel module. `unavailable()` says what is
missing; tests skip with that reason. Only the namespaces, links and bridge created here are removed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from swarmllm.launcher import Child, spawn


class WanUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Link:
    """The link of one host to the rest: round trip it adds to each of its exchanges, and egress rate."""

    rtt_ms: float = 0.0
    rate_mbit: float = 1000.0


@dataclass
class Host:
    name: str  # the network namespace
    ip: str
    link: Link

    @property
    def maddr(self) -> str:
        return f"/ip4/{self.ip}/tcp/0"


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise WanUnavailable(f"`{' '.join(cmd)}` failed: {result.stderr.strip()}")


def unavailable(need_delay: bool = True) -> str | None:
    """Why this machine cannot emulate a WAN (None if it can): tried for real, in a throwaway namespace."""
    if os.geteuid() != 0:
        return "WAN emulation needs root (network namespaces and tc)"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "WAN emulation needs iproute2 (ip and tc)"
    probe = f"swprobe{os.getpid()}"
    try:
        _ip("ip", "netns", "add", probe)
        _ip("ip", "link", "set", "lo", "up", ns=probe)
        qdisc = ["netem", "delay", "1ms"] if need_delay else ["tbf", "rate", "100mbit", "burst", "32kb", "latency", "50ms"]
        _ip("tc", "qdisc", "add", "dev", "lo", "root", *qdisc, ns=probe)
    except WanUnavailable as e:
        return f"{e} (delays need the sch_netem kernel module)" if need_delay else str(e)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class WanNetwork:
    """Hosts on one emulated network. Use as a context manager; everything created is removed on exit."""

    _count = itertools.count()

    def __init__(self, prefix: str = "sw", subnet: str = "10.77.0"):
        # Unique per network: interface names must not collide with a previous network's, whose teardown
        # the kernel may still be finishing. (Linux limits interface names to 15 characters.)
        self.prefix, self.subnet = f"{prefix}{os.getpid() % 10000}{next(self._count)}", subnet
        self.bridge = f"{self.prefix}br"
        self.hosts: list[Host] = []
        self.children: list[Child] = []

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
        rate = f"{link.rate_mbit}mbit"
        if link.rtt_ms > 0:
            shape = ["netem", "delay", f"{link.rtt_ms / 2}ms", "rate", rate, "limit", "100000"]
        else:
            shape = ["tbf", "rate", rate, "burst", "256kb", "latency", "100ms"]
        _ip("tc", "qdisc", "add", "dev", inside, "root", *shape, ns=host.name)
        return host

    def spawn(self, host: Host, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> Child:
        """Run `swarmllm <args>` inside `host`; stopped on exit."""
        child = spawn(name, args, env=env, prefix=("ip", "netns", "exec", host.name))
        self.children.append(child)
        return child

    def __exit__(self, *exc) -> None:
        for child in reversed(self.children):
            child.stop()
        for host in self.hosts:
            subprocess.run(["ip", "link", "del", f"{host.name}a"], capture_output=True)  # and its peer inside
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
