"""`swarmllm status`: the swarm as a table (or JSON): models, block coverage, servers, spans, speed, state."""

from __future__ import annotations

import json
import time

from swarmllm.cli.configs import StatusConfig
from swarmllm.observe.snapshot import ModelView, SwarmSnapshot


def cmd_status(args: StatusConfig) -> None:
    from swarmllm.client import loop
    from swarmllm.dht.node import join
    from swarmllm.observe.snapshot import collect

    peer = join(args.initial_peers, swarm_key=args.swarm_key, host_maddrs=["/ip4/0.0.0.0/tcp/0"], client_mode=True)
    try:
        p2p = loop.run(peer.dht.replicate_p2p(), timeout=30)
        snap = collect(peer, p2p, models=args.model or ())
    finally:
        peer.dht.shutdown()
    if args.json_output:
        print(json.dumps(snap.model_dump(mode="json")))
        return
    if args.swarm_key:
        from swarmllm.trust.swarm_key import SwarmKey

        print(f"private swarm {SwarmKey.load(args.swarm_key).fingerprint}")
    print(render(snap))


def render(snap: SwarmSnapshot) -> str:
    servers = sum(len(m.servers) for m in snap.models)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.at))
    lines = [f"swarm at {when}: {len(snap.models)} model(s), {servers} server(s)"]
    if not snap.models:
        lines.append("no server has announced a model (yet)")
    for m in snap.models:
        lines += ["", *_model(m)]
    if snap.adapters:
        lines += ["", "adapters:"]
        lines += [f"  {a.name:<32} {a.model:<16} {a.kind:<6} {a.size / 2**20:>8.2f} MiB" for a in snap.adapters]
    if snap.points:
        lines += ["", f"  {'points account':<54} {'balance':>14} {'served':>14} {'used':>14}"]
        lines += [f"  {p.account:<54} {p.balance:>14,.0f} {p.served:>14,} {p.used:>14,}" for p in snap.points]
    return "\n".join(lines)


def _model(m: ModelView) -> list[str]:
    held = sum(1 for c in m.coverage if c)
    if m.complete:
        summary = f"all {m.num_blocks} blocks covered"
    elif not m.gaps:  # no block known (nobody announced the model's size): there are no ranges to name
        summary = "no server holds any block (the number of blocks is unknown)"
    else:
        gaps = ", ".join(f"{a}:{b}" for a, b in m.gaps)
        summary = f"{held}/{m.num_blocks} blocks covered; NO SERVER for blocks {gaps}"
    # One character per block: how many online servers hold it (9+ shows 9), '!' where none does.
    bar = "".join("!" if c == 0 else str(min(c, 9)) for c in m.coverage)
    lines = [f"{m.name}: {summary}", f"  coverage |{bar}|"]
    header = (f"  {'server':<54} {'blocks':>7} {'state':<8} {'tok/s':>7} {'fwd/blk':>8} {'rtt ms':>7} "
              f"{'sess':>4} {'served':>9} {'cache':>8} {'up':>6}")
    lines.append(header)
    for s in m.servers:
        rtt = f"{s.rtt_ms:.1f}" if s.rtt_ms is not None else "-"
        flag = " REPORTED" if s.reported else ""
        lines.append(f"  {s.peer_id:<54} {f'{s.start}:{s.end}':>7} {s.state.value:<8} {s.inference_tps:>7.1f} "
                     f"{s.forward_tps:>8.0f} {rtt:>7} {s.active_sessions:>4} {s.tokens_served:>9,} "
                     f"{s.cache_tokens_left:>8,} {_duration(s.uptime):>6}{flag}")
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
