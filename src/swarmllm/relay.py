"""A TCP relay that holds every segment for a fixed time: link delay where the kernel has no `sch_netem`.

The WAN harness (`swarmllm.wan`) runs one per emulated host that needs a delay, inside the host's network
namespace: it listens on the host's address, forwards each connection to the peer process listening on the
namespace's loopback, and delays the bytes both ways. The peer announces the relay's address
(`--announce-maddrs`), so every connection to it (DHT, inference streams, pushes) crosses the delay.

    python -m swarmllm.relay LISTEN_HOST:PORT TARGET_HOST:PORT --delay-ms D [--overhead-ms O]
    python -m swarmllm.relay LISTEN_HOST:PORT --echo      (an echo service, to measure a link's round trip)

Holding is done by threads with `time.sleep`, not by an event loop: epoll's timeouts are whole
milliseconds, which would be a 100% error on a 1 ms round trip. `--overhead-ms` is what the path through
the relay adds to a round trip besides its holds (copies, thread wakeups, the bridge), which the harness
measures through a probe relay (`WanNetwork._calibrate`); it is taken off the holds, so that the round trip
through the relay is the wanted one.

Failure: a connection whose target refuses or goes away is closed on the other side too; the relay itself
keeps serving other connections. If the relay dies, connections through it break (as a link that goes
down), and the WAN benchmark reports that condition as failed.
"""

from __future__ import annotations

import argparse
import collections
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable

CHUNK = 1 << 16


def _pump(src: socket.socket, dst: socket.socket, hold: float) -> None:
    """Copy src -> dst, each chunk sent `hold` seconds after it arrived; EOF is passed on (after its hold)."""
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = threading.Condition()

    def send() -> None:
        try:
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    at, data = queue.popleft()
                due = at + hold - time.monotonic()
                if due > 0:
                    time.sleep(due)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except OSError:
            _close(src, dst)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        while True:
            data = src.recv(CHUNK)
            with ready:
                queue.append((time.monotonic(), data))
                ready.notify()
            if not data:
                break
    except OSError:
        with ready:
            queue.append((time.monotonic(), b""))
            ready.notify()
    sender.join()


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.close()
        except OSError:
            pass


def _serve_one(client: socket.socket, target: tuple[str, int], hold: float) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        _close(client)
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pump, args=(upstream, client, hold), daemon=True)
    back.start()
    _pump(client, upstream, hold)
    back.join()
    _close(client, upstream)


def serve(listen: tuple[str, int], handle: Callable[[socket.socket], None], ready: str) -> None:
    """Accept connections on `listen` forever, each handled by `handle` on a thread of its own; first print
    `ready` and the address listened on (what the harness waits for)."""
    server = socket.create_server(listen)
    host, port = server.getsockname()[:2]
    print(f"{ready}: {host}:{port}", flush=True)
    while True:
        client, _ = server.accept()
        threading.Thread(target=handle, args=(client,), daemon=True).start()


def hold_for(rtt_ms: float, overhead_ms: float = 0.0) -> float:
    """Seconds to hold each way for a round trip of `rtt_ms` through one relay that itself adds `overhead_ms`."""
    return max(0.0, (rtt_ms - overhead_ms) / 2 / 1000)


def measure_rtt(address: tuple[str, int], rounds: int = 50, size: int = 64) -> float:
    """Median round trip in ms of `size`-byte pings to an echo service at `address` (through a relay)."""
    times = []
    with socket.create_connection(address, timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = b"x" * size
        for _ in range(rounds + 3):
            t0 = time.perf_counter()
            s.sendall(payload)
            got = 0
            while got < size:
                chunk = s.recv(size - got)
                if not chunk:
                    raise ConnectionError("the echo service closed the connection")
                got += len(chunk)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[3:]) * 1000


def _echo(conn: socket.socket) -> None:
    """The far end of `measure_rtt`: send back what comes in."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while data := conn.recv(CHUNK):
            conn.sendall(data)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("listen", type=_address, help="HOST:PORT to listen on")
    p.add_argument("target", type=_address, nargs="?", help="HOST:PORT to relay each connection to")
    p.add_argument("--delay-ms", type=float, help="round trip to add, in milliseconds")
    p.add_argument("--overhead-ms", type=float, default=0.0, help="round trip the relay itself adds (measured)")
    p.add_argument("--echo", action="store_true", help="be an echo service instead of a relay")
    args = p.parse_args(argv)
    if args.echo:
        serve(args.listen, _echo, "echo ready")
    if args.target is None or args.delay_ms is None:
        p.error("a relay needs TARGET and --delay-ms")
    hold = hold_for(args.delay_ms, args.overhead_ms)
    serve(args.listen, lambda client: _serve_one(client, args.target, hold), "relay ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
