"""Start `swarmllm` processes by forking one warm interpreter instead of starting fresh ones.

Importing torch, transformers, hivemind and swarmllm costs each fresh interpreter ~7 s of CPU: on a 2-core
host a swarm of 4 processes took ~25 s to start, most of it importing. The zygote is one process that
imports them once, then forks a child per request. A child only parses its arguments and loads its weights.

The launcher and the zygote talk over a SOCK_SEQPACKET socket pair, one record per packet:
- launcher -> zygote: `{"args": [...], "env": {...}}`, with the child's stdout and stderr attached
  (SCM_RIGHTS);
- zygote -> launcher: `{"forked": PID}` in the order of the requests, and `{"exited": PID, "code": C}`
  when a child ends (C follows `subprocess`: the exit code, or minus the signal that killed it).

Each child runs in a session of its own, so stopping its group stops its libp2p daemon too. The zygote
exits when the launcher closes its end; children it forked keep running, as a closed pipe would let them.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence

# Imported once, in the zygote, before any fork. `swarmllm.cli.main` comes first: it sets the libgomp
# environment that must be in place before torch loads.
_PRELOAD = ("swarmllm.cli.main", "swarmllm.server.server", "swarmllm.client.model", "swarmllm.api.serve")
_MAX_PACKET = 1 << 20


class ZygoteError(RuntimeError):
    pass


class Zygote:
    """The launcher's side: one zygote process, forks on request, exit codes of the children it forked."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "swarmllm.zygote", str(theirs.fileno())], pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )
        theirs.close()
        self._socket = ours
        self._forking = threading.Lock()  # one request in flight: `forked` replies come in request order
        self._changed = threading.Condition()
        self._forked: list[int] = []
        self._exits: dict[int, int] = {}
        self._closed = False
        threading.Thread(target=self._read, daemon=True, name="zygote-replies").start()

    def alive(self) -> bool:
        return not self._closed and self._process.poll() is None

    def fork(self, args: Sequence[str], env: dict[str, str], stdout: int, stderr: int) -> int:
        """Fork `swarmllm <args>` with `env` added to its environment and the given file descriptors as its
        stdout and stderr (the caller keeps and closes its own); returns the child's pid."""
        with self._forking:
            request = json.dumps({"args": list(args), "env": env}).encode()
            socket.send_fds(self._socket, [request], [stdout, stderr])
            with self._changed:
                if not self._changed.wait_for(lambda: self._forked or self._closed, timeout=300):
                    raise ZygoteError("the zygote did not fork within 300 s")
                if not self._forked:
                    raise ZygoteError(f"the zygote exited (code {self._process.poll()})")
                return self._forked.pop(0)

    def exit_code(self, pid: int, timeout: float | None = 0) -> int | None:
        """The child's exit code, waiting up to `timeout` seconds (None: forever); None while it runs."""
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits or self._closed, timeout=timeout)
            return self._exits.get(pid)

    def _read(self) -> None:
        while True:
            try:
                packet = self._socket.recv(_MAX_PACKET)
            except OSError:
                packet = b""
            with self._changed:
                if not packet:
                    self._closed = True
                    self._changed.notify_all()
                    return
                reply = json.loads(packet)
                if "forked" in reply:
                    self._forked.append(reply["forked"])
                else:
                    self._exits[reply["exited"]] = reply["code"]
                self._changed.notify_all()


class Forked:
    """The part of `subprocess.Popen` that launchers and tests use, over a child of the zygote: `pid`,
    `stdout` (its stdout and stderr together, as text lines), `poll`, `wait`, `send_signal`."""

    def __init__(self, zygote: Zygote, args: Sequence[str], env: dict[str, str]):
        self._zygote = zygote
        read_end, write_end = os.pipe()
        try:
            self.pid = zygote.fork(args, env, write_end, write_end)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the child holds its own copy: EOF comes when its last holder exits
        self.stdout: Iterator[str] = os.fdopen(read_end, "r", encoding="utf-8", errors="replace")

    def poll(self) -> int | None:
        return self._zygote.exit_code(self.pid)

    def wait(self, timeout: float | None = None) -> int:
        code = self._zygote.exit_code(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"swarmllm (pid {self.pid})", timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


def _serve(sock: socket.socket) -> None:
    """The zygote's loop: fork on each request, report each child's exit, return when the launcher leaves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the launcher; it stops the children
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select through the wakeup fd
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_read], [], [])
        if wake_read in ready:
            os.read(wake_read, 4096)
            _report_exits(sock)
        if sock.fileno() in ready:
            message, fds, _, _ = socket.recv_fds(sock, _MAX_PACKET, 2)
            if not message:
                return
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                sock.close()
                for fd in (wake_read, wake_write):
                    os.close(fd)
                _child(request["args"], request["env"], fds)
            for fd in fds:
                os.close(fd)
            sock.send(json.dumps({"forked": pid}).encode())


def _report_exits(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())


def _child(args: list[str], env: dict[str, str], outputs: list[int]) -> None:
    """A forked child: never returns. Runs `swarmllm <args>` as `python -m swarmllm.cli.main` would, then
    leaves through os._exit so that nothing of the zygote's runs twice."""
    import atexit
    import traceback

    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setsid()
    for fd, output in zip((1, 2), outputs, strict=True):
        os.dup2(output, fd)
    for output in outputs:
        os.close(output)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # both are TextIOWrappers
    os.environ.update(env)
    _own_hivemind_locks()
    if "OMP_NUM_THREADS" in env:  # libgomp read the zygote's environment when torch loaded there
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = ["swarmllm", *args]
    code = 0
    try:
        from swarmllm.cli.main import main

        main(args)
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()  # os._exit skips what an interpreter runs at exit (logging's flush, ...)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    os._exit(code)


def _own_hivemind_locks() -> None:
    """Give this child its own copies of hivemind's process-shared locks.

    hivemind creates them at import (`SharedBytes._lock`, `MPFuture`'s initialization and update locks, the
    process-wide executor's lock) for the processes it forks itself, such as a DHT's. Imported in the zygote,
    each is one semaphore shared by every child the zygote ever forks: a child killed while it held one
    (SIGKILL, as the failover tests and operators do) left it held for good, and every later child hung in
    `DHT.__init__`. Children of the zygote share no futures, so nothing is lost by each having its own; the
    processes a child forks inherit the child's."""
    import multiprocessing as mp

    from hivemind.utils.asyncio import _AsyncContextWrapper
    from hivemind.utils.mpfuture import MPFuture

    MPFuture.reset_backend()  # hivemind's own reset: new locks, and no futures of the zygote's to break
    _AsyncContextWrapper.EXECUTOR_LOCK = mp.Lock()


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    for name in _PRELOAD:
        __import__(name)
    _serve(sock)


if __name__ == "__main__":
    main()
