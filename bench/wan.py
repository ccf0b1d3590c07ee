"""SmolLM2 inference steps/s through a 3-server swarm over emulated WAN links, with push on and off.

Conditions follow Petals' published table: 1 Gbit/s with < 5 ms RTT, 100 Mbit/s with < 5 ms RTT, and
100 Mbit/s with 100 ms RTT. Every peer (bootstrap, 3 servers, client) is its own host in a network
namespace (swarmllm.wan); each host's egress rate is shaped with tbf, and a delay comes from a userspace
relay in each delayed host (swarmllm.relay: this kernel has no sch_netem), so any two hosts see the
condition's RTT.

First the relay itself is checked: the round trip measured through it, from another namespace, must be
within 10% of the target at 1 and 100 ms.

Each figure is compared with the physical limit measured in the same run: the local model's compute per
step (same threads, same machine) plus the fewest network crossings a step needs, one way each: with
push, client -> server 1 -> server 2 -> server 3 -> client (4); without, to and from every server (6).
Bandwidth adds nothing visible at these sizes (576 floats per token). Conditions that this machine cannot
emulate (no root) are reported as skipped with the reason; a condition whose client fails, or whose relay
dies, is reported as failed with the reason (the client is stopped, nothing hangs).

Usage: python bench/wan.py [--tokens 24] [--threads 1]   (needs root)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _process import prepare  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
PROMPT = "Explain in three sentences why a bank might run its own language model swarm."
# name -> (round trip added per exchange in ms, rate in Mbit/s). "< 5 ms" adds no delay: veth pairs on a
# bridge already give well under 1 ms.
CONDITIONS = {"1gbit_lt5ms": (0.0, 1000.0), "100mbit_lt5ms": (0.0, 100.0), "100mbit_100ms": (100.0, 100.0)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=24, help="new tokens per generation (timed: the decode steps)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    add_client_args(p)
    p.add_argument("--push", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    return p.parse_args()


def add_client_args(p: argparse.ArgumentParser) -> None:
    """The internal options of a benchmark's client side, which runs in its own host (`client_command`)."""
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--initial-peers", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--host-maddrs", nargs="*", default=None, help=argparse.SUPPRESS)
    p.add_argument("--announce-maddrs", nargs="*", default=None, help=argparse.SUPPRESS)


def peer_kwargs(args: argparse.Namespace) -> dict:
    """The client's listen and announced addresses in its host: behind its relay, like every delayed peer (a
    client reachable directly would let servers' connections to it skip every delay)."""
    return {k: v for k, v in (("host_maddrs", args.host_maddrs), ("announce_maddrs", args.announce_maddrs)) if v}


def client_command(host, script: str, peers: list[str], *args: str) -> list[str]:
    """Run `script --client` in `host`, as a peer of the swarm at `peers`."""
    return ["ip", "netns", "exec", host.name, sys.executable, script, "--client", *args, "--initial-peers", *peers,
            *host.peer_args]


def decode_steps_per_s(generate, ids, tokens: int) -> float:
    """Steps/s of the decode phase: time per new token after the first (the prefill is excluded)."""
    t0 = time.perf_counter()
    generate(ids, max_new_tokens=1, do_sample=False)
    t1 = time.perf_counter()
    generate(ids, max_new_tokens=tokens + 1, do_sample=False)
    t2 = time.perf_counter()
    return tokens / max(1e-9, (t2 - t1) - (t1 - t0))


def client_main(args: argparse.Namespace) -> None:
    """Runs inside a client's namespace, with push on or off (one p2p daemon per host: it listens behind the
    host's relay); prints one JSON line."""
    import torch
    from transformers import AutoTokenizer

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.models.source import resolve_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_model("smollm2")
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt").input_ids
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(model_dir), initial_peers=args.initial_peers, push=args.push, num_threads=args.threads,
        request_timeout=120, push_min_rtt=0, **peer_kwargs(args))
    model.generate(ids, max_new_tokens=2)  # warm-up: connections, pings
    rates = [decode_steps_per_s(model.generate, ids, args.tokens) for _ in range(2)]
    model.sequence_manager.shutdown()
    print(json.dumps({"steps_s": statistics.median(rates)}), flush=True)


def local_compute_s(threads: int, tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarmllm.models.source import resolve_model

    torch.set_num_threads(threads)
    model_dir = resolve_model("smollm2")
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT, return_tensors="pt").input_ids
    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    local.generate(ids, max_new_tokens=2)
    return 1.0 / decode_steps_per_s(local.generate, ids, tokens)


class ConditionFailed(RuntimeError):
    pass


def run_client(net, cmd: list[str], name: str, timeout: float = 1800) -> dict:
    """The client's JSON line; ConditionFailed if it fails, times out, or a relay dies meanwhile. Its output
    goes to files, not pipes: nobody reads a pipe while it runs, and a full one would stall it."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        client = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        try:
            while client.poll() is None:
                dead = net.dead_relays()
                if dead:
                    raise ConditionFailed(f"the delay relay of {', '.join(dead)} died")
                if time.monotonic() > deadline:
                    raise ConditionFailed(f"the client did not finish in {timeout:.0f}s")
                time.sleep(0.5)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        out.seek(0)
        err.seek(0)
        if client.returncode != 0:
            raise ConditionFailed(f"client failed in {name}:\n{err.read()[-3000:]}")
        return json.loads(out.read().strip().splitlines()[-1])


def check_relay() -> dict:
    """Round trips measured through a relay at 1 and 100 ms targets, from another namespace."""
    from swarmllm.wan import Link, WanNetwork

    out: dict = {}
    with WanNetwork() as net:
        plain = net.add_host(Link())
        out["no_relay_ms"] = round(net.rtt_ms(plain), 3)
        for target in (1.0, 100.0):
            measured = net.rtt_ms(net.add_host(Link(rtt_ms=target)))
            out[f"{target:g}ms"] = {"measured_ms": round(measured, 3), "error": round(measured / target - 1, 3)}
        out["relay_path_overhead_ms"] = round(net.overhead_ms or 0.0, 3)
    out["within_10pct"] = all(abs(out[k]["error"]) <= 0.10 for k in ("1ms", "100ms"))
    return out


@contextlib.contextmanager
def wan_swarm(link, threads: int) -> Iterator[tuple]:
    """A bootstrap host and 3 SmolLM2 servers (10 blocks each), every one its own host behind `link`; yields
    (the network, the initial peers)."""
    from swarmllm.cli.local import even_spans
    from swarmllm.models.source import resolve_model
    from swarmllm.wan import WanNetwork

    model_dir = resolve_model("smollm2")
    env = {"OMP_NUM_THREADS": str(threads)}
    with WanNetwork() as net:
        boot = net.add_host(link)
        peers = net.spawn(boot, "dht", ["dht", *boot.peer_args]).wait_for("initial peers:", 120)
        peers = peers.split(":", 1)[1].split()
        servers = []
        for i, blocks in enumerate(even_spans(30, 3)):
            host = net.add_host(link)
            servers.append(net.spawn(host, f"server{i}", [
                "serve", str(model_dir), "--initial-peers", *peers, "--blocks", blocks,
                "--num-threads", str(threads), *host.peer_args], env=env))
        for child in servers:
            child.wait_for("server ready:", 300)
        yield net, peers


def run_condition(name: str, rtt_ms: float, rate: float, args, compute_s: float) -> dict:
    from swarmllm.wan import Link

    link = Link(rtt_ms=rtt_ms, rate_mbit=rate)
    got = {}
    with wan_swarm(link, args.threads) as (net, peers):
        for push in (True, False):  # each client in a host of its own
            cmd = client_command(net.add_host(link), __file__, peers, "--tokens", str(args.tokens), "--threads",
                                 str(args.threads), "--push" if push else "--no-push")
            got["push" if push else "nopush"] = run_client(net, cmd, name)["steps_s"]
    one_way = rtt_ms / 2 / 1000
    limit = {"push": 1 / (compute_s + 4 * one_way), "nopush": 1 / (compute_s + 6 * one_way)}
    return {
        "rtt_ms": rtt_ms, "rate_mbit": rate,
        "push_steps_s": round(got["push"], 3), "nopush_steps_s": round(got["nopush"], 3),
        "push_vs_limit": round(got["push"] / limit["push"], 3), "nopush_vs_limit": round(got["nopush"] / limit["nopush"], 3),
        "push_speedup": round(got["push"] / got["nopush"], 3),
    }


def main() -> int:
    args = parse_args()
    if args.client:
        prepare()
        client_main(args)
        return 0
    prepare()  # as the CLI does, before torch loads; and SIGTERM still removes the namespaces
    from swarmllm.wan import unavailable

    compute_s = local_compute_s(args.threads, args.tokens)
    print(f"local compute: {compute_s * 1e3:.1f} ms per step ({args.threads} thread(s))")
    results: dict = {"local_compute_ms": round(compute_s * 1e3, 2), "threads": args.threads, "tokens": args.tokens}
    reason = unavailable()
    if not reason:
        relay = results["relay_check"] = check_relay()
        print(f"relay: 1 ms -> {relay['1ms']['measured_ms']:.3f} ms, 100 ms -> {relay['100ms']['measured_ms']:.2f} ms "
              f"(within 10%: {relay['within_10pct']}; no relay {relay['no_relay_ms']:.3f} ms)")
    for name, (rtt_ms, rate) in CONDITIONS.items():
        if reason:
            print(f"{name}: skipped: {reason}")
            results[name] = {"skipped": reason}
            continue
        try:
            r = run_condition(name, rtt_ms, rate, args, compute_s)
        except ConditionFailed as e:
            print(f"{name}: failed: {e}")
            results[name] = {"failed": str(e)}
            continue
        results[name] = r
        print(f"{name}: push {r['push_steps_s']:.2f} steps/s ({r['push_vs_limit']:.2f} of the limit), "
              f"no push {r['nopush_steps_s']:.2f} ({r['nopush_vs_limit']:.2f}), push speedup {r['push_speedup']:.2f}x")
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**merged, "wan": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
