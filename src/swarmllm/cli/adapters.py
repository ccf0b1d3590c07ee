"""`swarmllm adapters publish|list|fetch`: share trained adapters through the swarm or a hub.

Heavy imports (hivemind, torch) happen inside the commands, so `swarmllm --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Sequence
from pathlib import Path

from swarmllm.adapters.config import SwarmHubConfig
from swarmllm.cli.options import add_config_args, config_from_args


def add_adapter_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="adapters_command", required=True)

    p = sub.add_parser("publish", help="publish an adapter folder: seed it in the swarm, or upload it to a hub")
    p.add_argument("path", type=Path, help="adapter folder (peft LoRA, or a swarmllm block checkpoint)")
    p.add_argument("--name", required=True, help="name to publish under (the repo id for a hub, unless --repo)")
    p.add_argument("--model", help="base model it was trained for (default: read from the adapter's config)")
    p.add_argument("--hub-dir", type=Path, help="publish to this hub folder (<dir>/<org>/<name>) and exit")
    p.add_argument("--repo", help="publish to this Hugging Face repo id (or to this repo of --hub-dir) and exit")
    add_config_args(p, SwarmHubConfig)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("list", help="list the adapters announced in the swarm")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_config_args(p, SwarmHubConfig)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("fetch", help="fetch an adapter by name: local store, then the swarm, then a hub")
    p.add_argument("name", help="adapter name in the swarm, or a hub repo id (org/name)")
    p.add_argument("--out", type=Path, help="also copy the adapter into this (new or empty) folder")
    p.add_argument("--model", help="refuse an adapter published for another base model")
    p.add_argument("--hub-dir", type=Path, help="hub folder to look in when the swarm does not have it")
    add_config_args(p, SwarmHubConfig)
    p.set_defaults(func=cmd_fetch)


def cmd_publish(args: argparse.Namespace) -> None:
    from swarmllm.adapters.hub import publish_to_hub
    from swarmllm.adapters.package import adapter_kind, pack
    from swarmllm.adapters.store import AdapterStore
    from swarmllm.adapters.swarm_hub import check_name
    from swarmllm.dht.node import join_as

    adapter_kind(args.path)  # a bad folder or name fails here, before joining any swarm
    if args.hub_dir is not None or args.repo is not None:
        repo = args.repo or args.name
        sha = publish_to_hub(args.path, repo, hub_dir=args.hub_dir)
        where = f"{args.hub_dir}/{repo}" if args.hub_dir is not None else f"https://huggingface.co/{repo}"
        print(f"published: {args.name} sha256={sha} size={len(pack(args.path))} to {where}", flush=True)
        return
    check_name(args.name)
    config = config_from_args(SwarmHubConfig, args)
    model = _model_name(args.path, args.model)
    peer = join_as(config)
    try:
        asyncio.run(_seed(peer, AdapterStore(), config, args.path, args.name, model))
    finally:
        peer.dht.shutdown()


async def _seed(peer, store, config: SwarmHubConfig, folder: Path, name: str, model: str) -> None:
    """Publish, print the `published:` line, then serve and refresh until SIGINT/SIGTERM."""
    from swarmllm.adapters.swarm_hub import SwarmHub

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    hub = SwarmHub(peer.dht, store, config.max_bytes, ttl=config.announce_ttl, request_timeout=config.request_timeout,
                   membership=peer.membership)
    await hub.register()
    try:
        record = await hub.publish(folder, name, model)
        maddrs = " ".join(str(m) for m in peer.dht.get_visible_maddrs())
        # One line that scripts and tests wait for; the maddrs let others join the swarm through this peer.
        print(f"published: {name} sha256={record.sha256} size={record.size} kind={record.kind} "
              f"model={record.model} peer {hub.peer_id} at {maddrs}", flush=True)
        refresher = asyncio.create_task(hub.keep_fresh())
        await stop.wait()
        refresher.cancel()
    finally:
        await hub.close()


def cmd_list(args: argparse.Namespace) -> None:
    from swarmllm.adapters.swarm_hub import SyncSwarmHub

    with SyncSwarmHub.connect(config_from_args(SwarmHubConfig, args), serve=False) as hub:
        found = hub.list()
        providers = {r.sha256: len(hub.providers(r.sha256)) for r in found}
    if args.json:
        print(json.dumps([{**r.model_dump(mode="json"), "providers": providers[r.sha256]} for r in found], indent=2))
    elif not found:
        print("no adapters are announced in the swarm")
    else:
        rows = [(r.name, r.kind, r.model, _human_size(r.size), r.sha256[:12], str(providers[r.sha256]))
                for r in found]
        print(format_table(("NAME", "KIND", "MODEL", "SIZE", "SHA256", "PROVIDERS"), rows))


def cmd_fetch(args: argparse.Namespace) -> None:
    from swarmllm.adapters.package import unpack
    from swarmllm.adapters.resolve import resolve_adapter
    from swarmllm.adapters.store import AdapterStore
    from swarmllm.adapters.swarm_hub import SyncSwarmHub
    from swarmllm.client import loop as io_loop
    from swarmllm.models.source import model_display_name

    config = config_from_args(SwarmHubConfig, args)
    model = model_display_name(args.model) if args.model else None
    store = AdapterStore()
    hub = SyncSwarmHub.connect(config, store, serve=False) if config.initial_peers else None
    try:
        path = io_loop.run(resolve_adapter(args.name, hub.hub if hub else None, args.hub_dir, store=store, model=model))
    finally:
        if hub is not None:
            hub.shutdown()
    sha = path.name  # store entries are named by their sha256
    if args.out is not None:
        path = unpack(store.packed(sha), args.out)
    print(f"fetched: {args.name} sha256={sha} -> {path}", flush=True)


def format_table(header: tuple[str, ...], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _model_name(folder: Path, given: str | None) -> str:
    """The DHT display name of the base model: `given`, else what the adapter's own config names."""
    from swarmllm.adapters.package import AdapterError, adapter_kind
    from swarmllm.models.source import model_display_name

    if given is None:
        meta, key = {"lora": ("adapter_config.json", "base_model_name_or_path"),
                     "blocks": ("swarmllm_blocks.json", "model")}[adapter_kind(folder)]
        try:
            given = json.loads((folder / meta).read_text()).get(key) or None
        except (OSError, ValueError, AttributeError):
            given = None
        if given is None:
            raise AdapterError(f"{folder / meta} does not name its base model: pass --model")
    # The same name servers announce under, so `fetch(name, model=...)` on a server compares like with like.
    return model_display_name(given)
