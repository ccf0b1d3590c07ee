"""Memory, decode speed and quality of SmolLM2's blocks in float32, bfloat16, int8, int4 and NF4, on this CPU.

Variants: float32 (the baseline, measured in the same run), bfloat16 (the whole model), int8 (int8 blocks in
a float32 model; on CPU the int8 matmuls take bfloat16-rounded inputs, see swarmllm.models.quant), int8 in a
bfloat16 model, int4 blocks (groups of 32) in a float32 model, and NF4 blocks in a float32 model. Only the
30 decoder blocks are quantized, as on a swarm's servers; embeddings, final norm and lm_head stay as loaded.
Blocks are cast to the variant's dtype before they are quantized, as `load_span` does on servers.

Per variant: memory per block (parameters + buffers, mean over the blocks); decode tokens/s (greedy
generation of `--new-tokens` tokens with the KV cache, prefill included, median of `--repeats` runs; the
variants take turns within each repeat so drift on a shared machine hits all alike) and its ratio to
float32; perplexity on the whole shipped evaluation text (windows of 512) and its ratio to float32; top-1
agreement with float32 (teacher-forced, on the same text); and greedy agreement: the fraction of generated
tokens identical to float32's, and the first index that differs, for 3 fixed prompts (part "generation").

Part "layer": the time of one call of a 1536x576 matrix (block 0's up_proj) on one row, per quantization, and
for int4 the time of its two branches (kernel, dequantize + GEMM) by row count, for float32 and bfloat16
inputs: where the kernel stops paying sets `INT4_GEMM_MIN_ROWS`. Part "span": one decode step (one token,
with the KV cache, after a 16-token prefill) through all 30 blocks as a server holds them (`load_span` with
the variant's dtype and quantization). Both: median of `--repeats` timings, the variants taking turns.

Speed on a shared machine is noise: the load average before and after the timed runs is printed and
stored; rerun when it is above the thread count. The quality numbers are deterministic.

Usage: python bench/quant.py [--new-tokens 64] [--repeats 3] [--threads 2] [--variants float32,int8,...]
                             [--parts generation,layer,span]
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
    "int4": ("int4", "float32"),
    "nf4": ("nf4", "float32"),
}
PARTS = ("generation", "layer", "span")
CROSSOVER_ROWS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 64, 96, 128)
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
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    return p.parse_args()


def build(base: torch.nn.Module, variant: str) -> torch.nn.Module:
    """The variant of the loaded float32 model (a copy; `base` itself is the float32 variant), cast first
    and quantized after, as servers do (int4 keeps bfloat16 scales, which a later cast would convert)."""
    import copy

    import torch

    from swarmllm.models.quant import quantize_blocks

    if variant == "float32":
        return base
    mode, dtype = VARIANTS[variant]
    model = copy.deepcopy(base).to(getattr(torch, dtype))
    quantize_blocks(model.base_model.layers, mode)  # type: ignore[arg-type]
    return model


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


def _per_call(fn, seconds: float = 0.02) -> float:
    """Mean seconds of one `fn()` over a loop of about `seconds` (after one warm-up call)."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        fn()
        calls += 1
    return elapsed / max(calls, 1)


def _taking_turns(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """name -> median over `repeats` of `_per_call(fn)` in microseconds, the functions taking turns."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in fns if r % 2 == 0 else list(fns)[::-1]:
            times[name].append(_per_call(fns[name]))  # type: ignore[arg-type]
    return {name: round(statistics.median(t) * 1e6, 1) for name, t in times.items()}


def layer_times(args: argparse.Namespace) -> dict:
    """One 1536x576 matrix: a one-row call per quantization, and int4's branches by row count."""
    import torch

    from swarmllm.models.quant import quantize_linear
    from swarmllm.models.source import resolve_model
    from swarmllm.models.span import load_span

    block = load_span(resolve_model("smollm2"), 0, 1).layers[0]
    linear = block.mlp.up_proj  # (1536, 576): SmolLM2's largest shape, with down_proj's
    layers = {"float32": linear, **{m: quantize_linear(linear, m) for m in ("int8", "int4", "nf4")}}
    x = torch.randn(1, linear.in_features)
    with torch.inference_mode():
        one_row = _taking_turns({name: (lambda q=q: q(x)) for name, q in layers.items()}, args.repeats)
        int4, crossover = layers["int4"], {}
        for dtype in ("float32", "bfloat16"):
            for rows in CROSSOVER_ROWS:
                xr = torch.randn(rows, linear.in_features).to(getattr(torch, dtype))
                w = linear.weight.to(xr.dtype)
                crossover[f"{dtype} {rows}"] = _taking_turns({
                    "linear": lambda xr=xr, w=w: torch.nn.functional.linear(xr, w),
                    "int4 kernel": lambda xr=xr: int4._kernel_matmul(xr),
                    "int4 gemm": lambda xr=xr: int4._gemm_matmul(xr),
                }, args.repeats)
    return {"shape": list(linear.weight.shape), "one_row_us": one_row, "int4_branches_us": crossover}


def span_step_times(args: argparse.Namespace, variants: list[str]) -> dict:
    """One decode step through all 30 blocks, loaded as a server loads them, per variant."""
    import torch

    from swarmllm.models.source import resolve_model
    from swarmllm.models.span import load_span

    model_dir = resolve_model("smollm2")
    spans, caches, pos = {}, {}, {}
    with torch.inference_mode():
        for v in variants:
            mode, dtype = VARIANTS[v]
            spans[v] = load_span(model_dir, 0, 30, getattr(torch, dtype), quant=mode)  # type: ignore[arg-type]
            caches[v], pos[v] = spans[v].new_cache(), 16
            hidden = torch.randn(1, 16, spans[v].config.hidden_size, dtype=spans[v].dtype)
            spans[v](hidden, torch.arange(16)[None], cache=caches[v])  # prefill (batch, seq, hidden)

        def step(v: str) -> None:
            hidden = torch.randn(1, 1, spans[v].config.hidden_size, dtype=spans[v].dtype)
            spans[v](hidden, torch.tensor([[pos[v]]]), cache=caches[v])
            pos[v] += 1

        us = _taking_turns({v: (lambda v=v: step(v)) for v in variants}, args.repeats)
    return {"step_ms": {v: round(t / 1e3, 2) for v, t in us.items()},
            "step_ratio": {v: round(us["float32"] / t, 3) for v, t in us.items()}}


def _greedy(reference: list[int], other: list[int]) -> tuple[float, int | None]:
    from swarmllm.models.evaluation import greedy_agreement

    fraction, first = greedy_agreement(reference, other)
    return round(fraction, 4), first


def main() -> int:
    args = parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = (set(variants) - set(VARIANTS)) | (set(parts) - set(PARTS))
    if unknown or "float32" not in variants:
        sys.exit(f"variants must include float32 and come from {VARIANTS}, parts from {PARTS}; "
                 f"unknown: {sorted(unknown)}")
    prepare(args.gomp_spincount)  # before `measure` loads torch
    import torch

    torch.set_num_threads(args.threads)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results = merged.get("quant", {}) if set(parts) != set(PARTS) else {}  # parts run alone update theirs
    if "generation" in parts:
        results.update(summarize(args, variants, measure(args, variants)))
        print_generation(args, results)
    for part, run in (("layer", lambda: layer_times(args)), ("span", lambda: span_step_times(args, variants))):
        if part in parts:
            before = os.getloadavg()[0]
            results[part] = {**run(), **_stamp(args), "loadavg_1min": [round(before, 2), round(os.getloadavg()[0], 2)]}
            (print_layer if part == "layer" else print_span)(results[part])
            _warn_if_loaded(args, results[part]["loadavg_1min"])
    RESULTS.write_text(json.dumps({**merged, "quant": results}, indent=2) + "\n")
    return 0


def _stamp(args: argparse.Namespace) -> dict:
    """What a timing depends on besides the code: CPU, torch, threads."""
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats}


def _warn_if_loaded(args: argparse.Namespace, loadavg: list[float]) -> None:
    if max(loadavg) > args.threads + 0.5:
        print("!!! the load average exceeded the thread count: another process competed for the cores, so the "
              "speeds are unreliable; rerun on a quiet machine", file=sys.stderr)


def print_generation(args: argparse.Namespace, results: dict) -> None:
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
    _warn_if_loaded(args, [before, after])


def print_layer(r: dict) -> None:
    one = r["one_row_us"]
    print(f"one {r['shape'][0]}x{r['shape'][1]} matrix, one row (us per call, speed ratio to float32): "
          + ", ".join(f"{k} {t:.0f} ({one['float32'] / t:.2f}x)" for k, t in one.items()))
    print("int4 by rows (us per call): rows, then for float32 and for bfloat16 inputs: F.linear (float weight in the "
          "input's dtype), int4 kernel, int4 dequantize + GEMM")
    for rows in CROSSOVER_ROWS:
        cells = [r["int4_branches_us"][f"{dtype} {rows}"] for dtype in ("float32", "bfloat16")]
        print(f"{rows:>5} " + "   ".join(f"{c['linear']:>8.0f} {c['int4 kernel']:>8.0f} {c['int4 gemm']:>8.0f}"
                                        for c in cells))


def print_span(r: dict) -> None:
    print("one decode step through 30 blocks (ms; speed ratio to float32): "
          + ", ".join(f"{v} {ms:.1f} ({r['step_ratio'][v]:.2f}x)" for v, ms in r["step_ms"].items()))
    print(f"{r['cpu']} ({r['cpu_capability']}), {r['threads']} threads, median of {r['repeats']}, "
          f"1-min load average {r['loadavg_1min'][0]} before and {r['loadavg_1min'][1]} after")


if __name__ == "__main__":
    sys.exit(main())
