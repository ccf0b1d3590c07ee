"""Fewer round trips per token over a 100 ms link: prompt lookup and a small local draft against plain decoding.

Over the internet every token costs a full trip through the chain of servers. Assisted generation checks
several drafted tokens in one trip: `generate(prompt_lookup_num_tokens=k)` drafts by copying what followed
the same n-gram earlier in the text, `generate(assistant_model=small)` drafts with a small local model. Both
are transformers' own, through the swarm's session rewind; greedy output must equal plain decoding.

The task is repetitive, as editing code is: the answer mostly copies the given function. The draft model is
SmolLM2's first 24 of 30 blocks under its own head (same tokenizer; no smaller SmolLM2 is installed).

The swarm is bench/wan.py's: a bootstrap host, 3 SmolLM2 servers (10 blocks each) and a client, each in its
own network namespace, 100 Mbit/s with 100 ms round trips (a delay relay per host). Reported per mode:
tokens/s of whole generations (prefill included), the speed-up over plain decoding, the swarm steps per
token, and the share of drafted tokens accepted; and whether each output equals plain greedy decoding.

Usage: python bench/speculative.py [--new-tokens 64] [--rtt-ms 100] [--threads 1]   (needs root)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

from _process import prepare  # noqa: E402  (bench/ is on sys.path when run as a script)
from api import CODE_PROMPT  # noqa: E402
from wan import ConditionFailed, add_client_args, client_command, peer_kwargs, run_client, wan_swarm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results.json"
LOOKUP_TOKENS = 10  # draft tokens per prompt-lookup step
DRAFT_BLOCKS = 24


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rtt-ms", type=float, default=100.0)
    p.add_argument("--rate-mbit", type=float, default=100.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    add_client_args(p)
    return p.parse_args()


def draft_model(local):
    """SmolLM2's first DRAFT_BLOCKS blocks under its own norm and head: a cheaper model, same tokenizer."""
    small = copy.deepcopy(local)
    small.model.layers = small.model.layers[:DRAFT_BLOCKS]
    small.config.num_hidden_layers = DRAFT_BLOCKS
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = small.config.layer_types[:DRAFT_BLOCKS]
    return small


def client_main(args: argparse.Namespace) -> None:
    """Runs inside the client's namespace: each mode twice, alternating; prints one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.models.source import resolve_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": CODE_PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(model_dir), initial_peers=args.initial_peers, num_threads=args.threads, request_timeout=120,
        **peer_kwargs(args))
    draft = draft_model(AutoModelForCausalLM.from_pretrained(model_dir).eval())
    modes = {"plain": {}, "prompt_lookup": {"prompt_lookup_num_tokens": LOOKUP_TOKENS},
             "draft_model": {"assistant_model": draft}}
    model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: connections, pings
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    stats, outputs = {}, {}
    for r in range(2):
        for mode in modes if r % 2 == 0 else reversed(list(modes)):
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                 **modes[mode])
            seconds[mode].append(time.perf_counter() - t0)
            stats[mode], outputs[mode] = model.generation_stats, out[0, ids.shape[1]:].tolist()
    model.sequence_manager.shutdown()
    print(json.dumps({mode: {
        "tok_s": args.new_tokens / statistics.median(seconds[mode]),
        "steps_per_token": stats[mode].steps_per_token,
        "acceptance": stats[mode].acceptance_rate,
        "equals_plain": outputs[mode] == outputs["plain"],
    } for mode in modes} | {"text": tokenizer.decode(outputs["plain"])}), flush=True)


def main() -> int:
    args = parse_args()
    prepare()
    if args.client:
        client_main(args)
        return 0
    from swarmllm.wan import Link, unavailable
    reason = unavailable()
    if reason:
        print(f"skipped: {reason}")
        return 0
    link = Link(rtt_ms=args.rtt_ms, rate_mbit=args.rate_mbit)
    with wan_swarm(link, args.threads) as (net, peers):
        cmd = client_command(net.add_host(link), __file__, peers, "--new-tokens", str(args.new_tokens),
                             "--threads", str(args.threads))
        try:
            got = run_client(net, cmd, "speculative")
        except ConditionFailed as e:
            print(f"failed: {e}")
            return 1
    plain = got["plain"]["tok_s"]
    results = {"rtt_ms": args.rtt_ms, "rate_mbit": args.rate_mbit, "new_tokens": args.new_tokens,
               "lookup_tokens": LOOKUP_TOKENS, "draft_blocks": DRAFT_BLOCKS, **got}
    for mode in ("plain", "prompt_lookup", "draft_model"):
        r = got[mode]
        r["speedup"] = round(r["tok_s"] / plain, 3)
        acceptance = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        print(f"{mode}: {r['tok_s']:.2f} tok/s ({r['speedup']:.2f}x plain), {r['steps_per_token']:.2f} steps per "
              f"token, drafts accepted {acceptance}, output {'equals' if r['equals_plain'] else 'DIFFERS from'} plain")
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**merged, "speculative": results}, indent=2) + "\n")
    return 0 if all(got[m]["equals_plain"] for m in ("prompt_lookup", "draft_model")) else 1


if __name__ == "__main__":
    sys.exit(main())
