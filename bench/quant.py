"""Memory, decode speed and quality of SmolLM2's blocks in float32, bfloat16, int8 and NF4, on this CPU.

Variants: float32 (the baseline, measured in the same run), bfloat16 (the whole model), int8 (int8 blocks in
a float32 model; on CPU the int8 matmuls take bfloat16-rounded inputs, see swarmllm.models.quant), int8 in a
bfloat16 model, and NF4 blocks in a float32 model. Only the 30 decoder blocks are quantized, as on a swarm's
servers; embeddings, final norm and lm_head stay as loaded.

Per variant: memory per block (parameters + buffers, mean over the blocks); decode tokens/s (greedy
generation of `--new-tokens` tokens with the KV cache, prefill included, median of `--repeats` runs; the
variants take turns within each repeat so drift on a shared machine hits all alike) and its ratio to
float32; perplexity on the whole shipped evaluation text (windows of 512) and its ratio to float32; top-1
agreement with float32 (teacher-forced, on the same text); and greedy agreement: the fraction of generated
tokens identical to float32's, and the first index that differs, for 3 fixed prompts.

Speed on a shared machine is noise: the load average before and after the timed runs is printed and
stored; rerun when it is above the thread count. The quality numbers are deterministic.

Usage: python bench/quant.py [--new-tokens 64] [--repeats 3] [--threads 2] [--variants float32,int8,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from _process import prepare  # noqa: E402  (bench/ is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "results.json"
# variant -> (quantization of the blocks, dtype of the whole model)
VARIANTS = {
    "float32": ("none", "float32"),
    "bfloat16": ("none", "bfloat16"),
    "int8": ("int8", "float32"),
    "int8-bf16": ("int8", "bfloat16"),
    "nf4": ("nf4", "float32"),
}
PROMPTS = (
    "Explain in a few sentences why the sky is blue.",
    "Write a short recipe for a simple vegetable soup.",
    "What does a bank do with the money in a savings account?",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per greedy generation")
    p.add_argument("--repeats", type=int, default=5, help="timed generations per variant; the median is reported")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--window", type=int, default=512, help="tokens per scoring window")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--gomp-spincount", type=int, default=30000, help="GOMP_SPINCOUNT; -1 keeps libgomp's default")
    return p.parse_args()


def build(base: torch.nn.Module, variant: str) -> torch.nn.Module:
    """The variant of the loaded float32 model (a copy; `base` itself is the float32 variant)."""
    import torch

    from swarmllm.models.evaluation import quantized_copy

    if variant == "float32":
        return base
    mode, dtype = VARIANTS[variant]
    return quantized_copy(base, mode).to(getattr(torch, dtype))  # type: ignore[arg-type]


def timed_generation(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    from swarmllm.models.evaluation import greedy_tokens

    t0 = time.perf_counter()
    tokens = greedy_tokens(model, ids, new_tokens)
    return time.perf_counter() - t0, tokens


def measure(args: argparse.Namespace, variants: list[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarmllm.models.evaluation import eval_text, greedy_tokens, score_text
    from swarmllm.models.quant import weight_bytes
    from swarmllm.models.source import resolve_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    models = {v: build(base, v) for v in variants}
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"] for p in PROMPTS]
    out: dict = {v: {"seconds": []} for v in variants}
    text = eval_text()
    for v, model in models.items():
        t0 = time.perf_counter()
        out[v]["score"] = score_text(model, tokenizer, text, args.window)
        layers = model.base_model.layers
        out[v]["block_bytes"] = sum(weight_bytes(layer) for layer in layers) / len(layers)
        # Prompts 1.. once each; prompt 0's tokens come from the timed runs.
        out[v]["tokens"] = [None] + [greedy_tokens(model, ids, args.new_tokens) for ids in prompts[1:]]
        greedy_tokens(model, prompts[0], 4)  # warm-up: allocator, kernels; not timed
        print(f"  {v}: scored and sampled in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out["loadavg_before"] = os.getloadavg()[0]
    for r in range(args.repeats):
        for v in variants if r % 2 == 0 else variants[::-1]:
            seconds, tokens = timed_generation(models[v], prompts[0], args.new_tokens)
            out[v]["seconds"].append(seconds)
            out[v]["tokens"][0] = tokens
            print(f"  run {r} {v}: {args.new_tokens / seconds:.2f} tok/s", file=sys.stderr)
    out["loadavg_after"] = os.getloadavg()[0]
    out["torch"] = torch.__version__
    return out


def summarize(args: argparse.Namespace, variants: list[str], m: dict) -> dict:
    ref = m["float32"]
    ref_tps = args.new_tokens / statistics.median(ref["seconds"])
    ref_best = args.new_tokens / min(ref["seconds"])
    rows = {}
    for v in variants:
        tps = args.new_tokens / statistics.median(m[v]["seconds"])
        greedy = [_greedy(a, b) for a, b in zip(ref["tokens"], m[v]["tokens"])]
        rows[v] = {
            "block_bytes": round(m[v]["block_bytes"]),
            "block_bytes_ratio": round(m[v]["block_bytes"] / ref["block_bytes"], 4),
            "tok_s": round(tps, 3), "tok_s_ratio": round(tps / ref_tps, 4),
            "best_tok_s": round(args.new_tokens / min(m[v]["seconds"]), 3),
            "best_tok_s_ratio": round(args.new_tokens / min(m[v]["seconds"]) / ref_best, 4),
            "perplexity": round(m[v]["score"].perplexity, 4),
            "perplexity_ratio": round(m[v]["score"].perplexity / ref["score"].perplexity, 4),
            "top1_agreement": round(m[v]["score"].agreement(ref["score"]), 4),
            "greedy_agreement": [g[0] for g in greedy], "greedy_first_divergence": [g[1] for g in greedy],
            "seconds": [round(s, 3) for s in m[v]["seconds"]],
        }
    return {"variants": rows, "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads,
            "window": args.window, "scored_positions": ref["score"].top1.numel(), "prompts": list(PROMPTS),
            "cpu_count": os.cpu_count(), "torch": m["torch"],
            "loadavg_1min": [round(m["loadavg_before"], 2), round(m["loadavg_after"], 2)]}


def _greedy(reference: list[int], other: list[int]) -> tuple[float, int | None]:
    from swarmllm.models.evaluation import greedy_agreement

    fraction, first = greedy_agreement(reference, other)
    return round(fraction, 4), first


def main() -> int:
    args = parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown or "float32" not in variants:
        sys.exit(f"variants must include float32 and come from {VARIANTS}; unknown: {sorted(unknown)}")
    prepare(args.gomp_spincount)  # before `measure` loads torch
    results = summarize(args, variants, measure(args, variants))
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**merged, "quant": results}, indent=2) + "\n")
    print(f"{'variant':<10} {'MiB/block':>9} {'mem':>5} {'tok/s':>6} {'speed':>5} {'best':>5} {'ppl':>7} "
          f"{'ppl x':>6} {'top-1':>6}  greedy agreement (first divergence)")
    for v, r in results["variants"].items():
        greedy = ", ".join(f"{a:.2f} ({'-' if f is None else f})"
                           for a, f in zip(r["greedy_agreement"], r["greedy_first_divergence"]))
        print(f"{v:<10} {r['block_bytes'] / 2**20:>9.2f} {r['block_bytes_ratio']:>5.2f} {r['tok_s']:>6.1f} "
              f"{r['tok_s_ratio']:>5.2f} {r['best_tok_s_ratio']:>5.2f} {r['perplexity']:>7.2f} "
              f"{r['perplexity_ratio']:>6.3f} {r['top1_agreement']:>6.3f}  {greedy}")
    print("mem, speed (median tok/s), best (fastest run's tok/s) and ppl x are ratios to float32 in this run;")
    before, after = results["loadavg_1min"]
    print(f"{results['scored_positions']} scored positions, {args.new_tokens} greedy tokens, {args.threads} "
          f"threads, 1-min load average {before} before and {after} after the timed runs")
    if max(before, after) > args.threads + 0.5:
        print("!!! the load average exceeded the thread count: another process competed for the cores, so the "
              "speeds are unreliable; rerun on a quiet machine", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
