"""Greedy decoding speed of SmolLM2 through a 3-server loopback swarm versus local transformers.

Both sides run in the same process and the same run, in float32, with the same torch thread count (the
servers get it too), on the same chat-templated prompt; local and swarm runs alternate so drift on a shared
machine hits both alike. Absolute tokens/s on a shared machine are noise; the ratio swarm/local is the
number to track: it is what the swarm's network, serialization and hand-offs cost over the same compute.
The swarm's tokens must equal the local tokens exactly, or the run fails (exit 1).

Usage: python bench/decode.py [--new-tokens 128] [--threads N] [--repeats 3] [--gomp-spincount -1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from _process import prepare  # noqa: E402  (bench/ is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "results.json"
TARGET = 0.9


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to decode per run")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, here and per server")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side; the median is reported")
    p.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    # Spinning, not the thread count, is what costs on a small machine. After each parallel region libgomp's
    # idle threads busy-wait (300000 spins, ~3 ms) unless told otherwise; in a pipeline that is exactly when
    # the next process computes, so every hop runs on half the cores. Measured on 2 cores, 3 servers + client:
    # default spin 18 tok/s swarm / 29 local (0.63); OMP_WAIT_POLICY=PASSIVE 15.5 / 17.4 (0.89, but only
    # because sleeping between every op slows local most); GOMP_SPINCOUNT=15000..50000 23.5 / 29 (0.82),
    # local unchanged. So: keep the wait policy, shorten the spin, in this process and (inherited) servers.
    p.add_argument("--gomp-spincount", type=int, default=30000,
                   help="GOMP_SPINCOUNT here and for the servers; -1 keeps libgomp's default (a set spin "
                        "count overrides the wait policy's)")
    p.add_argument("--omp-wait-policy", choices=["unset", "PASSIVE", "ACTIVE"], default="unset",
                   help="OMP_WAIT_POLICY here and for the servers")
    return p.parse_args()


@contextlib.contextmanager
def timed_steps(cls: type, totals: list[float]) -> Iterator[None]:
    """Add the seconds spent in `cls.step` (the client's remote step: all hops, round trips) to `totals[0]`,
    for sessions of the default client only (the one whose breakdown is printed)."""
    original = cls.step

    def step(self, *args, **kwargs):
        if self.manager.config.push_min_rtt == 0.0:  # the forced-push side: not part of the breakdown
            return original(self, *args, **kwargs)
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            totals[0] += time.perf_counter() - t0

    cls.step = step
    try:
        yield
    finally:
        cls.step = original


def run_once(generate: Callable, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds for one greedy generation of exactly `new_tokens` tokens (prefill included), and the tokens."""
    t0 = time.perf_counter()
    # min_new_tokens keeps an early EOS from shortening a run: both sides decode the same count.
    out = generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - t0, out[0, ids.shape[1] :].tolist()


def measure(args: argparse.Namespace) -> dict:
    """Alternate local and swarm runs; return their times, tokens and the time spent in remote steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.cli.local import even_spans
    from swarmllm.client.inference_session import InferenceSession
    from swarmllm.launcher import LocalSwarm, ServerSpec
    from swarmllm.models.source import resolve_model
    from swarmllm.models.span import load_config

    torch.set_num_threads(args.threads)
    model_dir = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": args.prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]  # (1, prompt)
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    specs = [ServerSpec(s) for s in even_spans(load_config(model_dir).num_hidden_layers, 3)]
    out: dict = {"local_s": [], "swarm_s": [], "pushed_s": [], "local_tokens": [], "swarm_tokens": [],
                 "pushed_tokens": [], "remote_s": [0.0]}
    with LocalSwarm(str(model_dir), specs, threads=args.threads) as swarm:
        # "swarm": default settings (push only where servers are far enough apart: not on one host);
        # "pushed": the same swarm with server-to-server push forced on, to measure what it costs or saves here.
        dist, pushed = (AutoDistributedModelForCausalLM.from_pretrained(
            str(model_dir), initial_peers=swarm.initial_peers, num_threads=args.threads, dtype=torch.float32,
            **options,
        ) for options in ({}, {"push_min_rtt": 0.0}))
        try:
            sides = {"local": local.generate, "swarm": dist.generate, "pushed": pushed.generate}
            for generate in sides.values():
                run_once(generate, ids, 4)  # warm-up: connections, allocator, kernels; not timed
            with timed_steps(InferenceSession, out["remote_s"]):
                for r in range(args.repeats):
                    for name in ("local", "swarm", "pushed") if r % 2 == 0 else ("pushed", "swarm", "local"):
                        seconds, tokens = run_once(sides[name], ids, args.new_tokens)
                        out[f"{name}_s"].append(seconds)
                        out[f"{name}_tokens"].append(tokens)
                        print(f"  run {r} {name}: {args.new_tokens / seconds:.2f} tok/s", file=sys.stderr)
        finally:
            dist.sequence_manager.shutdown()
            pushed.sequence_manager.shutdown()
    out["torch"] = torch.__version__
    return out


def main() -> int:
    args = parse_args()
    prepare(args.gomp_spincount, args.omp_wait_policy)  # before `measure` loads torch
    m = measure(args)
    reference = m["local_tokens"][0]
    match = all(t == reference for t in m["local_tokens"] + m["swarm_tokens"] + m["pushed_tokens"])
    local_tps = args.new_tokens / statistics.median(m["local_s"])
    swarm_tps = args.new_tokens / statistics.median(m["swarm_s"])
    pushed_tps = args.new_tokens / statistics.median(m["pushed_s"])
    ratio = swarm_tps / local_tps
    steps = args.repeats * args.new_tokens
    remote_ms, client_ms = 1000 * m["remote_s"][0] / steps, 1000 * (sum(m["swarm_s"]) - m["remote_s"][0]) / steps
    print(f"swarm per token: {remote_ms:.1f} ms in remote steps (3 hops), {client_ms:.1f} ms on the client "
          f"(embeddings, norm, lm_head, generate)")
    results = {
        "local_tok_s": round(local_tps, 3), "swarm_tok_s": round(swarm_tps, 3), "ratio": round(ratio, 4),
        "target": TARGET, "tokens_match": match, "new_tokens": args.new_tokens, "threads": args.threads,
        "repeats": args.repeats, "gomp_spincount": args.gomp_spincount, "omp_wait_policy": args.omp_wait_policy,
        "cpu_count": os.cpu_count(), "torch": m["torch"], "local_s": m["local_s"], "swarm_s": m["swarm_s"],
        "swarm_remote_ms_per_token": round(remote_ms, 2), "swarm_client_ms_per_token": round(client_ms, 2),
        "pushed_tok_s": round(pushed_tps, 3), "forced_push_speedup": round(pushed_tps / swarm_tps, 4),
        "pushed_s": m["pushed_s"],
    }
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**merged, "decode": results}, indent=2) + "\n")
    print(f"greedy tokens {'match' if match else 'DIFFER'} between swarm and local")
    if not match:
        print("!!! EXACTNESS FAILURE: the swarm's greedy tokens differ from local transformers !!!", file=sys.stderr)
        for name in ("local", "swarm"):
            print(f"{name}: {m[f'{name}_tokens']}", file=sys.stderr)
    print(f"push: forced on {pushed_tps:.1f} tok/s, default (off on one host) {swarm_tps:.1f} tok/s, "
          f"ratio {pushed_tps / swarm_tps:.3f}")
    print(f"decode: swarm {swarm_tps:.1f} tok/s, local {local_tps:.1f} tok/s, ratio {ratio:.2f} (target >= {TARGET})")
    return 0 if match else 1


if __name__ == "__main__":
    sys.exit(main())
