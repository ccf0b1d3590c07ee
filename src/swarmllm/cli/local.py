"""`swarmllm local` (what `make run` runs): a local swarm of real processes, with the API and web UI on
localhost, answering one chat prompt on the command line; it then serves the web UI until Ctrl-C (`--once`:
stop after the answer)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from swarmllm.cli.configs import LocalConfig
from swarmllm.launcher import LocalSwarm, ServerSpec


def even_spans(num_blocks: int, servers: int) -> list[str]:
    bounds = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


def run_local(args: LocalConfig) -> None:
    import torch
    from transformers import TextStreamer

    from swarmllm.client.model import AutoDistributedModelForCausalLM
    from swarmllm.models.source import resolve_model
    from swarmllm.models.span import load_config

    model_dir = resolve_model(args.model)  # converts a GGUF once, before servers race to do it
    num_blocks = load_config(model_dir).num_hidden_layers
    threads = args.threads or os.cpu_count() or 1
    specs = [ServerSpec(s) for s in even_spans(num_blocks, args.servers)]
    print(f"starting a bootstrap peer and {len(specs)} servers for {args.model} ({num_blocks} blocks)...", file=sys.stderr)
    # Servers and client get the name as typed: it names the model in the DHT, and the conversion above is
    # cached, so the servers resolve it instantly instead of racing to convert it.
    with LocalSwarm(args.model, specs, threads=threads) as swarm:
        print(f"initial peers: {' '.join(swarm.initial_peers)}")
        for name, line in swarm.server_lines.items():
            blocks = line.split(" blocks ")[1].split()[0]
            peer = line.split(" peer ")[1].split()[0]
            print(f"  {name}: blocks {blocks}  peer ...{peer[-12:]}")
        torch.set_num_threads(threads)
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
        api = None
        try:
            api = _start_api(args, model)
            tokenizer = api.engine.tokenizer  # the API loaded it; the prompt below uses the same one
            print(f"web chat: {api.url}/   swarm monitor: {api.url}/monitor   OpenAI API: {api.url}/v1")
            messages = [{"role": "user", "content": args.prompt}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            print(f"\nuser> {args.prompt}\nassistant> ", end="", flush=True)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
            dt = time.perf_counter() - t0
            new = out.shape[1] - ids.shape[1]
            print(f"\n[{new} tokens in {dt:.2f}s: {new / dt:.2f} tokens/s through {len(specs)} servers]")
            if not args.once:
                print(f"\nThe swarm keeps serving: open {api.url}/ to chat, {api.url}/monitor to watch it. "
                      "Ctrl-C stops everything.", flush=True)
                _wait_for_signal()
        finally:
            if api is not None:
                api.stop()
            model.sequence_manager.shutdown()
    print("swarm stopped.", file=sys.stderr)


def _start_api(args: LocalConfig, model):
    """The API and web UI on localhost, sharing the model above; on another port if the asked one is taken."""
    from swarmllm.api.config import ApiConfig
    from swarmllm.api.serve import ApiServer, swarm_engine

    engine = swarm_engine(ApiConfig(model=args.model, port=args.port), model.sequence_manager.config, model=model)
    try:
        return ApiServer(engine).start()
    except OSError as e:  # the port is taken: any free one will do for a local demo
        print(f"port {args.port} is taken ({e.strerror}); using a free one", file=sys.stderr)
        return ApiServer(engine, port=0).start()


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
