"""What the HTTP API costs, and what concurrent requests gain, on a loopback swarm of SmolLM2.

One swarm (3 servers, 10 blocks each), one distributed model in this process, and the API app over it on
a free port. Measured in the same run:
- direct: `model.generate()` greedy, N new tokens (the baseline);
- api: the same completion through the official `openai` client, streamed (tokens/s and time to first
  token), as a ratio to direct; its text must equal direct's (exit 1 otherwise);
- logprobs: the same streamed request with `logprobs` (top 5 per token), as a ratio to the plain one;
- prompt lookup: a code-editing chat streamed through this API host and through a second one over the same
  model with `--prompt-lookup 10`: time to first token and tokens/s, and equal texts (exit 1 otherwise);
- concurrency: K requests at once through the API, total tokens/s as a ratio to one request at a time
  (the servers batch the concurrent sessions' steps; target >= 3x at K=8), first with every request
  computing its own LM head, then with the host's head batcher (`batch_heads`, the default: one head
  pass for every request's decode step); and one request with n=K choices, the same way;
- sampling: the host's CPU per sampled token (top_p 0.9) on real logits, ranking only the most likely tokens
  for the nucleus against sorting the whole vocabulary, with equal draws (exit 1 otherwise).

Usage: python bench/api.py [--new-tokens 32] [--concurrent 8] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from _process import prepare  # noqa: E402  (bench/ is on sys.path when run as a script)
from serving import cpu_snapshot  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results.json"
TARGET_CONCURRENT = 3.0  # 8 requests at once over 1, aggregate tokens/s
LOOKUP_TOKENS = 10
CODE_PROMPT = """Add type hints to this function and change nothing else. Reply with the code only.

def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            averages.append(total / window)
    return averages
"""
PROMPT = "The history of the printing press begins"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; the median is reported")
    p.add_argument("--lookup-tokens", type=int, default=64, help="new tokens of the prompt-lookup comparison")
    return p.parse_args()


def run(args: argparse.Namespace) -> dict:
    import openai
    import torch
    from transformers import AutoTokenizer

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.api.config import ApiConfig
    from swarmllm.api.serve import ApiServer, swarm_engine
    from swarmllm.client.head_batch import HeadBatcher
    from swarmllm.launcher import LocalSwarm, ServerSpec
    from swarmllm.models.source import resolve_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    n = args.new_tokens
    specs = [ServerSpec("0:10"), ServerSpec("10:20"), ServerSpec("20:30")]
    with LocalSwarm(str(model_dir), specs, threads=args.threads) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(str(model_dir), initial_peers=swarm.initial_peers,
                                                                num_threads=args.threads)
        # Heads unbatched first; the batcher is installed before the second concurrency measurement.
        engine = swarm_engine(ApiConfig(model=str(model_dir), port=0, batch_heads=False), model.sequence_manager.config,
                              model=model)
        api = ApiServer(engine).start()
        client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
        model_id = api.engine.model_id
        try:
            model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: connections
            direct, api_times, first_token, logprob_times = [], [], [], []
            text_direct = text_api = ""
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                direct.append(time.perf_counter() - t0)
                text_direct = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

                t0, first, text_api = time.perf_counter(), None, ""
                for chunk in client.completions.create(model=model_id, prompt=PROMPT, max_tokens=n, temperature=0,
                                                       stream=True):
                    if chunk.choices and chunk.choices[0].text:
                        first = first or time.perf_counter() - t0
                        text_api += chunk.choices[0].text
                api_times.append(time.perf_counter() - t0)
                first_token.append(first)

                t0, scored = time.perf_counter(), 0
                for chunk in client.completions.create(model=model_id, prompt=PROMPT, max_tokens=n, temperature=0,
                                                       stream=True, logprobs=5):
                    if chunk.choices and chunk.choices[0].logprobs:
                        scored += len(chunk.choices[0].logprobs.tokens)
                logprob_times.append(time.perf_counter() - t0)
                assert scored == n, f"{scored} logprob entries for {n} tokens"
                print(f"  direct {n / direct[-1]:.2f} tok/s, api {n / api_times[-1]:.2f} tok/s, "
                      f"with logprobs {n / logprob_times[-1]:.2f} tok/s", file=sys.stderr)

            def one(results: list) -> None:
                reply = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=n, temperature=0)
                results.append(reply.usage.completion_tokens)

            cpu_ms: dict[str, dict[str, float]] = {}

            def at_once(label: str) -> float:
                """Total tokens/s of `concurrent` requests at once; CPU ms per token of each process, by `label`."""
                done: list[int] = []
                threads = [threading.Thread(target=one, args=(done,)) for _ in range(args.concurrent)]
                cpu0 = cpu_snapshot(swarm)
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                seconds, cpu1 = time.perf_counter() - t0, cpu_snapshot(swarm)
                cpu_ms[label] = {k: round((cpu1[k] - cpu0[k]) / sum(done) * 1e3, 2) for k in cpu0}
                return sum(done) / seconds

            unbatched = [at_once("unbatched_heads") for _ in range(args.repeats)]
            print(f"  {args.concurrent} at once, heads unbatched: {statistics.median(unbatched):.2f} tok/s in total, "
                  f"CPU ms per token {cpu_ms['unbatched_heads']}", file=sys.stderr)
            heads = HeadBatcher.install(model)
            together, choices = [], []
            for _ in range(args.repeats):
                together.append(at_once("batched_heads"))
                t0 = time.perf_counter()
                reply = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=n, temperature=0,
                                                  n=args.concurrent)
                choices.append(reply.usage.completion_tokens / (time.perf_counter() - t0))
                print(f"  {args.concurrent} at once: {together[-1]:.2f} tok/s in total, CPU ms per token "
                      f"{cpu_ms['batched_heads']}; "
                      f"n={args.concurrent} in one request: {choices[-1]:.2f} tok/s", file=sys.stderr)
            rows_per_head_pass = heads.calls / max(1, heads.passes)
            lookup = prompt_lookup(args, client, model, model_dir)
        finally:
            api.stop()
            model.sequence_manager.shutdown()
    direct_tps, api_tps = n / statistics.median(direct), n / statistics.median(api_times)
    single = api_tps
    return {
        "direct_tok_s": round(direct_tps, 3), "api_tok_s": round(api_tps, 3),
        "api_ratio_to_direct": round(api_tps / direct_tps, 3),
        "api_first_token_s": round(statistics.median(first_token), 3),
        "concurrent": args.concurrent, "concurrent_total_tok_s": round(statistics.median(together), 3),
        "concurrent_ratio_to_one": round(statistics.median(together) / single, 3),
        "concurrent_unbatched_heads_ratio_to_one": round(statistics.median(unbatched) / single, 3),
        "head_calls_per_pass": round(rows_per_head_pass, 2), "cpu_ms_per_token": cpu_ms, "target_concurrent": TARGET_CONCURRENT,
        "n_choices_total_tok_s": round(statistics.median(choices), 3),
        "n_choices_ratio_to_one": round(statistics.median(choices) / single, 3),
        "logprobs_tok_s": round(n / statistics.median(logprob_times), 3),
        "logprobs_ratio_to_api": round(statistics.median(api_times) / statistics.median(logprob_times), 3),
        "text_matches": text_api == text_direct, "prompt_lookup": lookup,
        "new_tokens": n, "threads": args.threads, "repeats": args.repeats,
    }


def streamed_chat(client, model_id: str, n: int) -> tuple[float, float, str]:
    """(time to first token, tokens/s, text) of one greedy streamed chat completion of CODE_PROMPT."""
    t0, first, text = time.perf_counter(), None, ""
    for chunk in client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": CODE_PROMPT}],
                                                max_tokens=n, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            text += chunk.choices[0].delta.content
    return first or 0.0, n / (time.perf_counter() - t0), text


def prompt_lookup(args, client, model, model_dir) -> dict:
    """A code-editing chat (the answer copies the code) through this API and through a second API host over
    the same model with `prompt_lookup`: time to first token and tokens/s, alternating, and equal texts."""
    import openai

    from swarmllm.api.config import ApiConfig
    from swarmllm.api.serve import ApiServer, swarm_engine

    n = args.lookup_tokens
    engine = swarm_engine(ApiConfig(model=str(model_dir), port=0, prompt_lookup=LOOKUP_TOKENS),
                          model.sequence_manager.config, model=model)
    with_lookup = ApiServer(engine).start()
    try:
        clients = {"plain": client, "lookup": openai.OpenAI(base_url=f"{with_lookup.url}/v1", api_key="unused",
                                                           max_retries=0)}
        got: dict[str, list] = {"plain": [], "lookup": []}
        for r in range(args.repeats):
            for name in ("plain", "lookup") if r % 2 == 0 else ("lookup", "plain"):
                got[name].append(streamed_chat(clients[name], with_lookup.engine.model_id, n))
                print(f"  {name}: first token {got[name][-1][0] * 1e3:.0f} ms, {got[name][-1][1]:.2f} tok/s",
                      file=sys.stderr)
    finally:
        with_lookup.stop()
    out = {"lookup_tokens": LOOKUP_TOKENS, "new_tokens": n,
           "texts_equal": all(a[2] == b[2] for a, b in zip(got["plain"], got["lookup"]))}
    for name, runs in got.items():
        out[name] = {"first_token_s": round(statistics.median(r[0] for r in runs), 3),
                     "tok_s": round(statistics.median(r[1] for r in runs), 3)}
    out["speedup"] = round(out["lookup"]["tok_s"] / out["plain"]["tok_s"], 3)
    return out


def sampling_cost(threads: int) -> dict:
    """The API host's CPU per sampled token (temperature 0.7, top_p 0.9) on SmolLM2's real logits: the
    positions of a code-editing prompt, run once by a local model. Ranking only the most likely tokens for the
    nucleus (`generation.nucleus_candidates`) against sorting the whole vocabulary, in the same run, with the
    same draws."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarmllm.api import generation
    from swarmllm.models.source import resolve_model

    torch.set_num_threads(threads)
    model_dir = resolve_model("smollm2")
    ids = AutoTokenizer.from_pretrained(model_dir)(CODE_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(model_dir).eval()(ids).logits[0]  # (positions, vocab)
    sampling = generation.Sampling(max_tokens=1, temperature=0.7, top_p=0.9)
    first = generation.NUCLEUS_FIRST
    times, draws = {}, {}
    for label, ranked in (("full_sort", logits.shape[1]), ("top_first", first), ("full_sort", logits.shape[1]),
                          ("top_first", first)):
        generation.NUCLEUS_FIRST = ranked
        generator = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        draws[label] = [generation.pick(row, sampling, generator) for row in logits]
        times.setdefault(label, []).append((time.perf_counter() - t0) / len(logits))
    generation.NUCLEUS_FIRST = first
    probs = torch.softmax(logits / 0.7, dim=-1)
    fits = float((probs.topk(first).values.sum(-1) >= 0.9).float().mean())
    full, fast = min(times["full_sort"]), min(times["top_first"])
    return {"positions": len(logits), "full_sort_ms": round(full * 1e3, 3), "top_first_ms": round(fast * 1e3, 3),
            "ratio": round(fast / full, 3), "nucleus_in_top_share": round(fits, 3),
            "same_draws": draws["full_sort"] == draws["top_first"]}


def main() -> int:
    args = parse_args()
    prepare()
    r = run(args)
    r["sampling"] = sampling_cost(args.threads)
    print(f"api: {r['api_tok_s']:.2f} tok/s, {r['api_ratio_to_direct']:.2f}x direct generate() "
          f"({r['direct_tok_s']:.2f}); first token after {r['api_first_token_s'] * 1e3:.0f} ms; "
          f"text {'matches' if r['text_matches'] else 'DIFFERS from'} direct")
    print(f"with logprobs (top 5): {r['logprobs_tok_s']:.2f} tok/s, {r['logprobs_ratio_to_api']:.2f}x the plain stream")
    print(f"{r['concurrent']} concurrent requests: {r['concurrent_total_tok_s']:.2f} tok/s in total, "
          f"{r['concurrent_ratio_to_one']:.2f}x one request (target >= {TARGET_CONCURRENT}; "
          f"{r['concurrent_unbatched_heads_ratio_to_one']:.2f}x with every request computing its own head; "
          f"{r['head_calls_per_pass']:.2f} requests' decode steps per head pass)")
    print(f"one request with n={r['concurrent']}: {r['n_choices_total_tok_s']:.2f} tok/s in total, "
          f"{r['n_choices_ratio_to_one']:.2f}x one request")
    lk = r["prompt_lookup"]
    print(f"--prompt-lookup {lk['lookup_tokens']} on a code edit: {lk['lookup']['tok_s']:.2f} tok/s against "
          f"{lk['plain']['tok_s']:.2f} ({lk['speedup']:.2f}x), first token {lk['lookup']['first_token_s'] * 1e3:.0f} "
          f"against {lk['plain']['first_token_s'] * 1e3:.0f} ms; text {'equal' if lk['texts_equal'] else 'DIFFERS'}")
    sm = r["sampling"]
    print(f"sampling a token (t=0.7, top_p=0.9) on the API host: {sm['top_first_ms']:.2f} ms ranking the top "
          f"tokens first against {sm['full_sort_ms']:.2f} ms sorting the vocabulary ({sm['ratio']:.2f}x; nucleus "
          f"within the top at {sm['nucleus_in_top_share']:.0%} of {sm['positions']} positions; draws "
          f"{'equal' if sm['same_draws'] else 'DIFFER'})")
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**merged, "api": r}, indent=2) + "\n")
    return 0 if r["text_matches"] and lk["texts_equal"] and sm["same_draws"] else 1


if __name__ == "__main__":
    sys.exit(main())
