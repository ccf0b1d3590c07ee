"""`swarmllm local` (what `make run` runs): a local swarm of real processes answering one chat prompt."""

from __future__ import annotations

import argparse
import os
import sys
import time

from swarmllm.launcher import LocalSwarm, ServerSpec


def even_spans(num_blocks: int, servers: int) -> list[str]:
    bounds = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


def run_local(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from swarmllm.models.distributed import AutoDistributedModelForCausalLM
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
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=swarm.initial_peers)
        try:
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
        finally:
            model.sequence_manager.shutdown()
    print("swarm stopped.", file=sys.stderr)
