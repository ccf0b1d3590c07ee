"""Start a local swarm of real processes (a bootstrap peer and servers) and stop it cleanly.

Used by `make run` and by the test fixtures. Each child runs in its own process group, so stopping it
also stops the libp2p daemon it spawned; only the groups of processes started here are ever signalled.
Readiness is a line each process prints when it can serve, never a fixed sleep. Children are forked from a
warm zygote (swarmllm.zygote), which spares each of them ~7 s of imports.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from swarmllm.zygote import Forked, Zygote

logger = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    proc: subprocess.Popen | Forked
    lines: queue.Queue = field(default_factory=queue.Queue)
    log: list[str] = field(default_factory=list)

    def wait_for(self, prefix: str, timeout: float) -> str:
        """Block until the child prints a line starting with `prefix`; fail early if it dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith(prefix):
                return line
        tail = "".join(self.log[-30:])
        raise LaunchError(f"{self.name} did not print {prefix!r} within {timeout:.0f}s (exit {self.proc.poll()}):\n{tail}")

    def terminate(self) -> None:
        """Ask the main process to shut down, without waiting. SIGTERM to the main process only: it shuts its
        own DHT and daemon down in order (a group-wide SIGTERM would kill the DHT under it before it withdraws
        its record). Asking twice is harmless."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
        # Whatever the main process did, its group (the libp2p daemon included) must not outlive it.
        _signal_group(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def _warm_zygote() -> Zygote:
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive():
            _zygote = Zygote()
        return _zygote


def spawn(name: str, args: Sequence[str], env: dict[str, str] | None = None, echo: bool = False,
          prefix: Sequence[str] = (), module: str = "swarmllm.cli.main") -> Child:
    """Start `swarmllm <args>`: forked from the warm zygote; or, after a `prefix` (e.g. `ip netns exec HOST`,
    which execs in place), as a fresh interpreter running `module` (the CLI, or e.g. the WAN relay)."""
    proc: subprocess.Popen | Forked
    if module != "swarmllm.cli.main" and not prefix:
        raise ValueError("only the CLI is forked from the zygote: another module needs a prefix")
    if prefix:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    else:
        proc = Forked(_warm_zygote(), args, env or {})
    child = Child(name, proc)

    def pump() -> None:
        assert proc.stdout is not None  # started with stdout=PIPE
        for line in proc.stdout:
            child.log.append(line)
            child.lines.put(line)
            if echo:
                sys.stderr.write(f"[{name}] {line}")

    threading.Thread(target=pump, daemon=True, name=f"pump-{name}").start()
    return child


def run(args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run `swarmllm <args>` to completion, forked from the warm zygote, like `subprocess.run(...,
    capture_output=True, text=True)`. Past `timeout` its group is killed and TimeoutExpired raised; its group
    is killed on the way out in any case, so no daemon of its outlives it."""
    zygote = _warm_zygote()
    pipes = [os.pipe(), os.pipe()]
    try:
        pid = zygote.fork(args, env or {}, pipes[0][1], pipes[1][1])
    except BaseException:
        for read_end, _ in pipes:
            os.close(read_end)
        raise
    finally:
        for _, write_end in pipes:
            os.close(write_end)
    texts = ["", ""]

    def drain(i: int) -> None:
        with os.fdopen(pipes[i][0], "r", encoding="utf-8", errors="replace") as f:
            texts[i] = f.read()

    readers = [threading.Thread(target=drain, args=(i,), daemon=True) for i in (0, 1)]
    for reader in readers:
        reader.start()
    code = zygote.exit_code(pid, timeout)
    _signal_group(pid, signal.SIGKILL)
    for reader in readers:
        reader.join(10)
    if code is None:
        raise subprocess.TimeoutExpired(["swarmllm", *args], timeout, texts[0], texts[1])
    return subprocess.CompletedProcess(["swarmllm", *args], code, texts[0], texts[1])


@dataclass
class ServerSpec:
    """`blocks` START:END, or None to let the server choose (then `extra` has --num-blocks N)."""

    blocks: str | None
    extra: tuple[str, ...] = ()


class LocalSwarm:
    """A bootstrap peer plus servers on loopback. Use as a context manager; everything stops on exit."""

    def __init__(self, model: str, servers: Sequence[ServerSpec], threads: int = 1, ready_timeout: float = 240.0,
                 echo: bool = False, swarm_key: str | None = None, initial_peers: Sequence[str] = ()):
        """`swarm_key`: a key file path for a private swarm (the bootstrap peer creates it if missing, and
        every server joins with it); None for a public swarm. `initial_peers`: join a running swarm's peers
        instead of starting a bootstrap peer (servers of several models can share one)."""
        self.model, self.specs, self.threads = model, list(servers), threads
        self.swarm_key = swarm_key
        self.ready_timeout, self.echo = ready_timeout, echo
        self.children: list[Child] = []
        self.initial_peers: list[str] = list(initial_peers)
        self.servers: dict[str, Child] = {}
        self.server_lines: dict[str, str] = {}

    def start(self) -> LocalSwarm:
        try:
            if not self.initial_peers:
                private = ["--private", "--swarm-key", self.swarm_key] if self.swarm_key else []
                boot = self._spawn("dht", ["dht", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *private])
                line = boot.wait_for("initial peers:", self.ready_timeout)
                self.initial_peers = line.split(":", 1)[1].split()
            for i, spec in enumerate(self.specs):
                self.add_server(f"server{i}", spec, wait=False)
            for name, child in self.servers.items():
                self.server_lines[name] = child.wait_for("server ready:", self.ready_timeout).strip()
        except BaseException:
            self.stop()
            raise
        return self

    def add_server(self, name: str, spec: ServerSpec, wait: bool = True) -> Child:
        blocks = ["--blocks", spec.blocks] if spec.blocks is not None else []
        args = ["serve", self.model, "--initial-peers", *self.initial_peers, *blocks,
                "--num-threads", str(self.threads), "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                *(["--swarm-key", self.swarm_key] if self.swarm_key else []), *spec.extra]
        child = self._spawn(name, args)
        self.servers[name] = child
        if wait:
            self.server_lines[name] = child.wait_for("server ready:", self.ready_timeout).strip()
        return child

    def running_servers(self) -> dict[str, str]:
        """Peer id -> blocks (START:END) of the servers started here that still run."""
        out = {}
        for name, line in self.server_lines.items():
            child = self.servers.get(name)
            if child is not None and child.proc.poll() is None:
                out[line.split(" peer ")[1].split()[0]] = line.split(" blocks ")[1].split()[0]
        return out

    def metrics_urls(self) -> dict[str, str]:
        """Server name -> its Prometheus URL, for running servers started with --metrics-port (printed before
        ready)."""
        return {name: line.split()[1] for name, child in self.servers.items() if child.proc.poll() is None
                for line in child.log if line.startswith("metrics: ")}

    def _spawn(self, name: str, args: list[str]) -> Child:
        env = {"OMP_NUM_THREADS": str(self.threads)}
        child = spawn(name, args, env=env, echo=self.echo)
        self.children.append(child)
        return child

    def stop(self) -> None:
        # Servers first, so they can withdraw their records while the bootstrap peer is still up. They are all
        # asked to stop at once: one by one, a swarm of many servers took minutes to stop.
        for child in self.servers.values():
            child.terminate()
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def __enter__(self) -> LocalSwarm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
