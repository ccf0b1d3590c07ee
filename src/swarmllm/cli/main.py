"""`swarmllm`: one entry point with subcommands: dht, serve, generate, chat, api, status, local, points, adapters."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

# Set before anything imports torch. A swarm on one host runs several torch processes that take turns
# (one computes while the others wait for it). After each parallel region libgomp's idle threads busy-wait
# for 300000 spins by default, exactly when the next process of the pipeline needs the cores. Measured with
# 3 servers and a client on 2 cores (bench/decode.py): default spinning 18 tok/s (local 29); passive waiting
# 15.5 (it sleeps between every op); a short spin of 15000..50000, 23.5, with local speed unchanged.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from swarmllm.cli.adapters import add_adapter_commands
from swarmllm.cli.configs import (
    ChatConfig,
    DhtConfig,
    GenerateConfig,
    LocalConfig,
    PointsConfig,
    StatusConfig,
)
from swarmllm.cli.options import add_config_args, config_from_args
from swarmllm.client.config import ClientConfig
from swarmllm.server.config import ServerConfig


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # hivemind and transformers are chatty at INFO; their warnings still show.
    for name in ("hivemind", "transformers", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from hivemind.utils.logging import use_hivemind_log_handler

        use_hivemind_log_handler("nowhere")
    except ImportError:
        pass


def cmd_dht(args: argparse.Namespace) -> None:
    from pathlib import Path

    from swarmllm.dht.node import join
    from swarmllm.trust.swarm_key import SwarmKey

    config = config_from_args(DhtConfig, args)
    swarm_key = config.swarm_key
    if config.private:
        key_path = Path(config.swarm_key or "swarm.key")
        if key_path.exists():
            key = SwarmKey.load(key_path)  # restarting the bootstrap peer of an existing private swarm
        else:
            key = SwarmKey.create(key_path)
            print(f"created a new private swarm: its key is {key_path.resolve()} (give it to every member)", flush=True)
        swarm_key = str(key_path)
        print(f"private swarm {key.fingerprint}: members join with --swarm-key {key_path.resolve()}", flush=True)
    peer = join(identity=config.identity, swarm_key=swarm_key, host_maddrs=config.host_maddrs,
                announce_maddrs=config.announce_maddrs)
    dht = peer.dht
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the ready line: a launcher may stop it right after
        signal.signal(sig, lambda *_: stop.set())
    print("initial peers: " + " ".join(str(m) for m in dht.get_visible_maddrs()), flush=True)
    stop.wait()
    dht.shutdown()


def cmd_serve(args: argparse.Namespace) -> None:
    from swarmllm.server.server import Server

    Server(config_from_args(ServerConfig, args)).run()


def _client_model(args: argparse.Namespace):
    from swarmllm.client.model import AutoDistributedModelForCausalLM

    config = config_from_args(ClientConfig, args)
    return AutoDistributedModelForCausalLM.from_pretrained(args.model, config=config)


def cmd_generate(args: argparse.Namespace) -> None:
    import time

    from transformers import AutoTokenizer, TextStreamer

    from swarmllm.models.shards import no_tensors
    from swarmllm.models.source import resolve_model

    config = config_from_args(GenerateConfig, args)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model, tensors=no_tensors))
    model = _client_model(args)
    try:
        ids = tokenizer(config.prompt, return_tensors="pt").input_ids
        streamer = TextStreamer(tokenizer, skip_prompt=False)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=config.max_new_tokens, do_sample=config.temperature > 0,
                             temperature=config.temperature or None, streamer=streamer)
        dt = time.perf_counter() - t0
        new = out.shape[1] - ids.shape[1]
        print(f"\n[{new} tokens in {dt:.2f}s: {new / dt:.2f} tokens/s]", file=sys.stderr)
    finally:
        model.sequence_manager.shutdown()


def cmd_chat(args: argparse.Namespace) -> None:
    from swarmllm.cli.chat import chat_loop

    config = config_from_args(ChatConfig, args)
    chat_loop(_client_model(args), args.model, config.max_new_tokens, config.max_length)


def cmd_points(args: argparse.Namespace) -> None:
    import json

    from swarmllm.dht.node import join
    from swarmllm.dht.points import get_receipts
    from swarmllm.observe.snapshot import accounts

    config = config_from_args(PointsConfig, args)
    peer = join(config.initial_peers, swarm_key=config.swarm_key, host_maddrs=["/ip4/0.0.0.0/tcp/0"], client_mode=True)
    try:
        receipts = get_receipts(peer.dht)
    finally:
        peer.dht.shutdown()
    rows = accounts(receipts)
    if config.json_output:
        print(json.dumps([r.model_dump(include={"account", "balance", "served", "used"}) for r in rows]))
        return
    print(f"{'account':<48} {'balance':>14} {'served':>14} {'used':>14}")
    for r in rows:
        print(f"{r.account:<48} {r.balance:>14,.0f} {r.served:>14,} {r.used:>14,}")
    print(f"({len(receipts)} receipts; points are block-tokens: blocks x tokens of work)")


def cmd_api(args: argparse.Namespace) -> None:
    from swarmllm.api.config import ApiConfig
    from swarmllm.api.serve import ApiServer, ready_line, swarm_engine

    config = config_from_args(ApiConfig, args)
    if config.api_keys_file is not None:  # a bad keys file fails here, before minutes of model loading
        from swarmllm.api.auth import ApiKeys

        try:
            ApiKeys(config.api_keys_file)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    server = ApiServer(swarm_engine(config, config_from_args(ClientConfig, args))).start()
    print(ready_line(server.url, server.engine.model_id), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        server.stop()
        server.engine.model.sequence_manager.shutdown()


def cmd_status(args: argparse.Namespace) -> None:
    from swarmllm.cli.status import cmd_status as run

    run(config_from_args(StatusConfig, args))


def cmd_local(args: argparse.Namespace) -> None:
    from swarmllm.cli.local import run_local

    run_local(config_from_args(LocalConfig, args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmllm", description="Run LLMs across a swarm of peers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dht", help="start a bootstrap peer and print its multiaddrs")
    add_config_args(p, DhtConfig)
    p.set_defaults(func=cmd_dht)

    p = sub.add_parser("serve", help="serve a span of blocks of a model")
    add_config_args(p, ServerConfig, positional=("model",))
    p.set_defaults(func=cmd_serve)

    for name, func, config, help_text in (
        ("generate", cmd_generate, GenerateConfig, "generate text from a prompt through the swarm"),
        ("chat", cmd_chat, ChatConfig, "interactive chat through the swarm, with the model's chat template"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", help="model: a local folder, a .gguf file, a hub repo id, or a shortcut (smollm2)")
        add_config_args(p, ClientConfig)
        add_config_args(p, config)
        p.set_defaults(func=func)

    from swarmllm.api.config import ApiConfig

    p = sub.add_parser("api", help="serve an OpenAI-compatible API, a web chat and a swarm monitor, backed by the swarm")
    add_config_args(p, ApiConfig, positional=("model",))
    add_config_args(p, ClientConfig)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("status", help="show the swarm: models, block coverage, servers, spans, speed and state")
    add_config_args(p, StatusConfig)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("local", help="start a local swarm (bootstrap + servers) with the API and web UI, answer a chat prompt")
    add_config_args(p, LocalConfig, positional=("model",))
    p.set_defaults(func=cmd_local)

    p = sub.add_parser("points", help="show every account's contribution points, from the receipts in the swarm")
    add_config_args(p, PointsConfig)
    p.set_defaults(func=cmd_points)

    p = sub.add_parser("adapters", help="publish, list and fetch trained adapters (in the swarm or a hub)")
    add_adapter_commands(p)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # clear one-line errors for users; tracebacks with -v
        if args.verbose:
            raise
        name = type(e).__name__
        print(f"error: {name}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
