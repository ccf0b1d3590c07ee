"""Serving many clients: what a batched decode step costs a server, and aggregate tokens/s of 8 concurrent
clients against 1, with time to first token.

Part `steps` (in this process, no network): one server's 10 blocks at SmolLM2's geometry (random weights,
float32) run decode steps of 8 sessions in one pass, at a 64-token and at a 1,024-token context. It reports
the step's time at 1,024 over that at 64, against what attention's own arithmetic adds: the same sessions'
attention alone (`scaled_dot_product_attention` over each session's keys, every block), timed in the same
run. And the bytes of keys and values a step moves besides storing its new tokens (the sessions' `copied`
counters), per step: a step should store its new tokens and read the past in place. A session of 4 beams,
reordered before every step as beam search does, reports the same at 1,024 tokens. Then the long step again
with every session's pages interleaved with the others' (the worst layout the page pool can hand out: one
run per page), over the step with one run each.

Part `swarm`: one 3-server loopback swarm of SmolLM2 (float32, 10 blocks each). In the same run:
- 1 client decoding greedily, then 8 clients at once (threads sharing one client model, as an API server
  does); the figure is aggregate tokens/s of the 8 over that of the 1. Servers batch the 8 sessions' steps
  (see swarmllm/server/scheduler.py); the servers' own counters give the mean batch size.
- The servers' CPU seconds per generated token (from /proc), 8 sessions over 1: what batching saves them.
  With `--batch-heads` (default on) the 8 client threads share one LM-head pass per step, as the API host's
  requests do (client/head_batch.py).
- With `--unbatched` (default on), the same against a second swarm whose servers run one step per pass
  (`--max-batch-rows 1`): what batching itself buys, against the same machine.
- Time to first token for a 512-token prompt: swarm (prefill through 3 servers, in chunks) over local
  transformers. Lower is better.

Usage: python bench/serving.py [--parts steps swarm] [--clients 8] [--new-tokens 32] [--threads 1]
       [--no-unbatched] [--server-args "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

from _process import prepare  # noqa: E402  (bench/ is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "results.json"
TARGET_AGGREGATE = 4.0
TARGET_SERVER_CPU = 0.35  # servers' CPU per token, 8 sessions over 1
PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "What is a savings account?",
    "List three uses of copper.",
    "Describe a cat to someone who has never seen one.",
    "How do airplanes stay in the air?",
    "Give me a recipe for pancakes.",
    "Why do we have seasons?",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=("steps", "swarm"), default=["steps", "swarm"])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens each client decodes")
    # One thread per process: 3 servers and 8 client threads share 2 cores, and with 2 threads each the
    # OpenMP teams oversubscribe them (measured: 8 clients 0.71x of 1 client at 2 threads, ~3x at 1).
    p.add_argument("--threads", type=int, default=1, help="torch threads, here and per server")
    p.add_argument("--ttft-prompt", type=int, default=512, help="prompt tokens for time to first token")
    p.add_argument("--server-args", default="", help="extra options for every server, e.g. '--batch-wait 0.01'")
    p.add_argument("--push-always", action="store_true",
                   help="servers push every step to the next server, however close (push_min_rtt=0)")
    p.add_argument("--batch-heads", action=argparse.BooleanOptionalAction, default=True,
                   help="the concurrent clients share one LM-head pass per step (client/head_batch.py)")
    p.add_argument("--unbatched", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure a swarm whose servers do not batch (one step per pass)")
    return p.parse_args()


STEP_CONTEXTS = (64, 1024)
STEP_SESSIONS = 8
STEP_PAGE = 64  # the servers' default cache page (server/config.py)
TIMED_STEPS = STEP_PAGE  # one page of decode steps: every session's cache grows by one page in between


def measure_steps() -> dict:
    """Decode steps of `STEP_SESSIONS` sessions in one pass on one server's blocks, at each context."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from swarmllm.models.span import span_from_model
    from swarmllm.server.cache import bytes_per_token

    # SmolLM2-135M's geometry, 10 of its 30 blocks (what one of 3 servers holds), random weights.
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, num_hidden_layers=10, vocab_size=128, max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    span = span_from_model(AutoModelForCausalLM.from_config(config).eval(), 0, config.num_hidden_layers)
    new_bytes = bytes_per_token(span) * STEP_SESSIONS  # what one step must store: its new tokens
    out: dict = {"sessions": STEP_SESSIONS, "blocks": len(span.layers), "new_token_bytes_per_step": new_bytes}
    for context in STEP_CONTEXTS:
        step_s, copied = _batched_steps(span, context)
        attention_s = _attention_alone(config, context)
        out[context] = {"step_s": step_s, "attention_s": attention_s, "copied_bytes_per_step": copied}
        print(f"  context {context}: step {step_s * 1e3:.2f} ms, attention alone {attention_s * 1e3:.2f} ms, "
              f"copied {copied / 2**20:.2f} MiB/step ({copied / new_bytes:.1f}x the new tokens' bytes)", file=sys.stderr)
    # The same long step with every session's pages interleaved with the others' (one run per page).
    step_s, copied = _batched_steps(span, STEP_CONTEXTS[1], interleaved=True)
    out["interleaved"] = {"step_s": step_s, "copied_bytes_per_step": copied,
                          "ratio_to_one_run": step_s / out[STEP_CONTEXTS[1]]["step_s"]}
    print(f"  context {STEP_CONTEXTS[1]}, pages interleaved: step {step_s * 1e3:.2f} ms, copied {copied / 2**20:.2f} MiB/step",
          file=sys.stderr)
    # Beam search: one session of BEAMS rows reordered every step, at the long context.
    step_s, copied = _beam_steps(span, STEP_CONTEXTS[1])
    whole = bytes_per_token(span) * BEAMS * STEP_CONTEXTS[1]  # what a reorder copying the session's cache would move
    out["beams"] = {"rows": BEAMS, "step_s": step_s, "copied_bytes_per_step": copied, "whole_cache_bytes": whole}
    print(f"  {BEAMS} beams at {STEP_CONTEXTS[1]}, reordered every step: step {step_s * 1e3:.2f} ms, copied "
          f"{copied / 2**20:.2f} MiB/step (the session's whole cache: {whole / 2**20:.1f} MiB)", file=sys.stderr)
    short, long = (out[c] for c in STEP_CONTEXTS)
    out["step_ratio"] = long["step_s"] / short["step_s"]
    out["arithmetic_ratio"] = (STEP_CONTEXTS[1] + 1) / (STEP_CONTEXTS[0] + 1)  # attention's work per new token
    # What the long step would take if context only added attention's own time.
    out["attention_bound_s"] = short["step_s"] + long["attention_s"] - short["attention_s"]
    out["over_attention_bound"] = long["step_s"] / out["attention_bound_s"]
    return out


def _batched_steps(span, context: int, interleaved: bool = False) -> tuple[float, float]:
    """Median seconds of a decode step of the sessions in one pass, and bytes copied per step, over
    `TIMED_STEPS` steps. The sessions' lengths differ (context + i), as independent users' do; their pages are
    granted as a server grants them (`SessionKV.reserve`, from one pool) when a step needs room. `interleaved`:
    the sessions declare no max_length (no room set aside) and took their prompts' pages in turns, one page
    each, so that every session's past is one run per page: the worst layout a pool can hand out."""
    import asyncio

    import torch

    from swarmllm.server.cache import CacheMemory, PagePool, SessionKV, bytes_per_token
    from swarmllm.server.compute import Extras
    from swarmllm.server.inference import Session, StepInput, run_batch

    lengths = [context + i + TIMED_STEPS + 8 for i in range(STEP_SESSIONS)]
    pool = PagePool(span, bytes_per_token(span) * STEP_PAGE * (sum(lengths) // STEP_PAGE + 2 * STEP_SESSIONS), STEP_PAGE)
    loop, memory = asyncio.new_event_loop(), CacheMemory(pool.capacity, queue_timeout=1.0)

    def grant(kv: SessionKV, tokens: int) -> None:
        loop.run_until_complete(kv.reserve(memory, tokens, "a benchmark session"))

    hidden = span.config.hidden_size
    kvs = [SessionKV(pool, span, 1, limit=None if interleaved else n) for n in lengths]
    for tokens in range(STEP_PAGE if interleaved else context + STEP_SESSIONS, context + STEP_SESSIONS, STEP_PAGE):
        for kv in kvs:
            grant(kv, tokens)
    sessions = []
    for i, (kv, max_length) in enumerate(zip(kvs, lengths)):
        session = Session(span, 1, max_length, kv, Extras())
        grant(kv, context + i)
        run_batch([StepInput(session, torch.randn(1, context + i, hidden), torch.arange(context + i)[None], None)])
        sessions.append(session)
    times, copied0 = [], sum(s.kv.copied for s in sessions)
    for n in range(TIMED_STEPS + 2):  # 2 untimed warm-up steps
        if n == 2:
            copied0 = sum(s.kv.copied for s in sessions)
        steps = []
        for s in sessions:
            grant(s.kv, s.length + 1)
            steps.append(StepInput(s, torch.randn(1, 1, hidden), torch.tensor([[s.length]]), None))
        t0 = time.perf_counter()
        run_batch(steps)
        times.append(time.perf_counter() - t0)
    copied = (sum(s.kv.copied for s in sessions) - copied0) / TIMED_STEPS
    loop.close()
    return statistics.median(times[2:]), copied


BEAMS = 4


def _beam_steps(span, context: int) -> tuple[float, float]:
    """Median seconds of a decode step of one `BEAMS`-row session reordered before every step (random parents,
    as beam search's are), and bytes copied per step, over `TIMED_STEPS` steps."""
    import asyncio
    import random

    import torch

    from swarmllm.server.cache import CacheMemory, PagePool, SessionKV, bytes_per_token
    from swarmllm.server.compute import Extras
    from swarmllm.server.inference import Session, StepInput, run_batch

    limit = context + TIMED_STEPS + 8
    pool = PagePool(span, bytes_per_token(span, BEAMS) * STEP_PAGE * (limit // STEP_PAGE + 2), STEP_PAGE)
    loop, memory = asyncio.new_event_loop(), CacheMemory(pool.capacity, queue_timeout=1.0)
    kv = SessionKV(pool, span, BEAMS, limit=limit)
    session, hidden, rng = Session(span, BEAMS, limit, kv, Extras()), span.config.hidden_size, random.Random(0)

    def step(tokens: int, hypo_ids: list[int] | None) -> StepInput:
        loop.run_until_complete(kv.prepare(memory, kv.length, kv.length + tokens, hypo_ids, "a benchmark step"))
        pos = torch.arange(kv.length, kv.length + tokens).expand(BEAMS, -1)
        return StepInput(session, torch.randn(BEAMS, tokens, hidden), pos, None)

    run_batch([step(context, None)])
    times, copied0 = [], kv.copied
    for n in range(TIMED_STEPS + 2):  # 2 untimed warm-up steps
        if n == 2:
            copied0 = kv.copied
        inputs = step(1, [rng.randrange(BEAMS) for _ in range(BEAMS)])
        t0 = time.perf_counter()
        run_batch([inputs])
        times.append(time.perf_counter() - t0)
    loop.close()
    return statistics.median(times[2:]), (kv.copied - copied0) / TIMED_STEPS


def _attention_alone(config, context: int) -> float:
    """Median seconds of the attention of one decode step of every session on every block, alone: each
    session's query over its own keys and values, already in place (what the step cannot do with less)."""
    import torch
    import torch.nn.functional as F

    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    keys = [torch.randn(1, kv_heads, context + i + 1, dim) for i in range(STEP_SESSIONS)]
    values = [torch.randn_like(k) for k in keys]
    query = torch.randn(1, heads, 1, dim)
    times = []
    with torch.inference_mode():
        for _ in range(TIMED_STEPS + 2):
            t0 = time.perf_counter()
            for _ in range(config.num_hidden_layers):
                for k, v in zip(keys, values):
                    F.scaled_dot_product_attention(query, k, v, enable_gqa=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def chat_ids(tokenizer, text: str):
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def generate_n(model, ids, n: int) -> list[int]:
    """Up to `n` greedy tokens. No `min_new_tokens`: its logits processors cost the client more per token
    than the LM head (measured with py-spy), and 8 clients pay it 8 times over. Speeds count the tokens
    actually produced (the prompts make long answers, so early EOS is rare)."""
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def concurrent(model, prompts: list, n: int) -> tuple[float, list[list[int]]]:
    """Wall seconds for all prompts decoded at once, one thread each, and their tokens."""
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts) + 1)

    forget = getattr(model.get_output_embeddings().forward, "forget", None)  # a HeadBatcher's

    def client(i: int) -> None:
        barrier.wait()
        results[i] = generate_n(model, prompts[i], n)
        if forget is not None:
            forget()  # this thread is done: no head pass waits for it

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(swarm) -> dict[str, float]:
    """CPU seconds of each server process and of this client process."""
    out = {name: cpu_seconds(child.proc.pid) for name, child in swarm.servers.items()}
    times = os.times()
    out["client"] = times.user + times.system
    return out


def server_totals(swarm) -> tuple[int, int]:
    """Steps and passes summed over the servers, from their latest session-close log lines."""
    steps = passes = 0
    for child in swarm.servers.values():
        found = [m for m in (re.search(r"server total: (\d+) steps in (\d+) passes", x) for x in child.log) if m]
        if found:
            steps, passes = steps + int(found[-1][1]), passes + int(found[-1][2])
    return steps, passes


def measure_swarm(args, model_dir, tokenizer, extra: tuple[str, ...]) -> dict:
    import torch

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.cli.local import even_spans
    from swarmllm.client.head_batch import HeadBatcher
    from swarmllm.launcher import LocalSwarm, ServerSpec
    from swarmllm.models.span import load_config

    prompts = [chat_ids(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(args.clients)]
    specs = [ServerSpec(s, extra) for s in even_spans(load_config(model_dir).num_hidden_layers, 3)]
    out: dict = {}
    with LocalSwarm(str(model_dir), specs, threads=args.threads) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(model_dir), initial_peers=swarm.initial_peers, num_threads=args.threads, dtype=torch.float32,
            **({"push_min_rtt": 0.0} if args.push_always else {}))
        try:
            generate_n(model, prompts[0], 4)  # warm-up: connections, allocator; not timed
            singles, single_n = [], 0
            cpu0 = cpu_snapshot(swarm)
            for _ in range(2):
                t0 = time.perf_counter()
                single_tokens = generate_n(model, prompts[0], args.new_tokens)
                singles.append(len(single_tokens) / (time.perf_counter() - t0))
                single_n += len(single_tokens)
            cpu1 = cpu_snapshot(swarm)
            out["single_tok_s"] = statistics.median(singles)
            out["single_cpu_ms_per_token"] = {k: round((cpu1[k] - cpu0[k]) / single_n * 1e3, 2) for k in cpu0}
            print(f"  1 client: {out['single_tok_s']:.2f} tok/s, CPU ms per token {out['single_cpu_ms_per_token']}",
                  file=sys.stderr)
            steps0, passes0 = server_totals(swarm)
            cpu0 = cpu_snapshot(swarm)
            if args.batch_heads:
                HeadBatcher.install(model)  # the 8 threads share one head pass per step, as an API host's do
            seconds, tokens = concurrent(model, prompts, args.new_tokens)
            cpu1 = cpu_snapshot(swarm)
            time.sleep(1.0)  # let the servers log their session-close lines
            steps, passes = (a - b for a, b in zip(server_totals(swarm), (steps0, passes0)))
            out["aggregate_tok_s"] = sum(len(t) for t in tokens) / seconds
            out["ratio"] = out["aggregate_tok_s"] / out["single_tok_s"]
            out["mean_batch"] = steps / passes if passes else None
            # Where the CPU went, per generated token: what bounds the aggregate on a shared machine.
            n = sum(len(t) for t in tokens)
            out["cpu_ms_per_token"] = {k: round((cpu1[k] - cpu0[k]) / n * 1e3, 2) for k in cpu0}
            servers = [k for k in cpu0 if k != "client"]
            # What batching saves the servers: their CPU per generated token, 8 sessions over 1 (target <= 0.35).
            out["server_cpu_per_token_ratio"] = (sum(out["cpu_ms_per_token"][k] for k in servers)
                                                 / sum(out["single_cpu_ms_per_token"][k] for k in servers))
            out["tokens_match_single"] = tokens[0] == single_tokens
            out["concurrent_tokens"] = tokens
            print(f"  {args.clients} clients: {out['aggregate_tok_s']:.2f} tok/s aggregate "
                  f"({out['ratio']:.2f}x), mean batch {out['mean_batch']:.2f}, CPU ms per token "
                  f"{out['cpu_ms_per_token']}", file=sys.stderr)
            if "--max-batch-rows" not in extra:
                out["ttft"] = ttft(args, model_dir, model, tokenizer)
        finally:
            model.sequence_manager.shutdown()
    return out


def ttft(args, model_dir, swarm_model, tokenizer) -> dict:
    """Seconds to the first new token for a `ttft_prompt`-token prompt, swarm and local alternating."""
    import torch
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = " ".join(PROMPTS) * 40
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.ttft_prompt]  # (1, 512)
    times: dict[str, list[float]] = {"local": [], "swarm": []}
    firsts = {}
    for r in range(3):
        for name, model in (("local", local), ("swarm", swarm_model)) if r % 2 == 0 else (("swarm", swarm_model), ("local", local)):
            t0 = time.perf_counter()
            firsts[name] = generate_n(model, ids, 1)
            times[name].append(time.perf_counter() - t0)
    local_s, swarm_s = statistics.median(times["local"]), statistics.median(times["swarm"])
    print(f"  TTFT {args.ttft_prompt} tokens: local {local_s:.3f}s, swarm {swarm_s:.3f}s", file=sys.stderr)
    return {"prompt_tokens": ids.shape[1], "local_s": local_s, "swarm_s": swarm_s, "ratio": swarm_s / local_s,
            "first_token_match": firsts["local"] == firsts["swarm"]}


def main() -> int:
    args = parse_args()
    prepare()
    import torch

    torch.set_num_threads(args.threads)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    ok = True
    if "steps" in args.parts:
        steps = measure_steps()
        merged["serving_steps"] = steps
        RESULTS.write_text(json.dumps(merged, indent=2) + "\n")
        print(f"batch-{STEP_SESSIONS} decode step, context {STEP_CONTEXTS[1]} / {STEP_CONTEXTS[0]}: "
              f"{steps['step_ratio']:.2f}x (attention's arithmetic: {steps['arithmetic_ratio']:.2f}x; the step "
              f"over its attention-bound time: {steps['over_attention_bound']:.2f}x); copied per step: "
              + ", ".join(f"{steps[c]['copied_bytes_per_step'] / steps['new_token_bytes_per_step']:.1f}x the new "
                          f"tokens' bytes at {c}" for c in STEP_CONTEXTS)
              + f"; pages interleaved at {STEP_CONTEXTS[1]}: {steps['interleaved']['ratio_to_one_run']:.2f}x the step "
              "over one run")
    if "swarm" in args.parts:
        ok = measure_swarms(args, merged)
    return 0 if ok else 1


def measure_swarms(args, merged: dict) -> bool:
    from transformers import AutoTokenizer

    from swarmllm.models.source import resolve_model

    model_dir = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batched = measure_swarm(args, model_dir, tokenizer, tuple(args.server_args.split()))
    results = {"clients": args.clients, "new_tokens": args.new_tokens, "threads": args.threads,
               "batch_heads": args.batch_heads,
               "target_aggregate": TARGET_AGGREGATE, "batched": {k: v for k, v in batched.items() if k != "concurrent_tokens"}}
    if args.unbatched:
        unbatched = measure_swarm(args, model_dir, tokenizer, (*args.server_args.split(), "--max-batch-rows", "1"))
        results["unbatched"] = {k: v for k, v in unbatched.items() if k != "concurrent_tokens"}
        results["batched_over_unbatched"] = batched["aggregate_tok_s"] / unbatched["aggregate_tok_s"]
        results["outputs_equal_unbatched"] = batched["concurrent_tokens"] == unbatched["concurrent_tokens"]
    RESULTS.write_text(json.dumps({**merged, "serving": results}, indent=2) + "\n")
    print(f"aggregate {args.clients} clients / 1 client: {batched['ratio']:.2f}x (target >= {TARGET_AGGREGATE})")
    print(f"servers' CPU per token, {args.clients} sessions / 1: {batched['server_cpu_per_token_ratio']:.2f}x "
          f"(target <= {TARGET_SERVER_CPU})")
    if args.unbatched:
        print(f"batched / unbatched servers, {args.clients} clients: {results['batched_over_unbatched']:.2f}x")
    print(f"time to first token, {batched['ttft']['prompt_tokens']} tokens: swarm / local {batched['ttft']['ratio']:.2f}")
    return bool(batched["tokens_match_single"])


if __name__ == "__main__":
    sys.exit(main())
