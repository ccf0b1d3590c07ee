"""Swarm versus local transformers on one GPU: greedy agreement, decode speed and time to first token in
bfloat16 and float16; then int8 and nf4 servers (bitsandbytes' kernels; int4 is CPU-only): the memory their
weights hold per block and their decode speed, against bfloat16 servers.

One run, one swarm: a bootstrap peer and 12 server processes on cuda:0, three of 10 blocks for each variant
(bfloat16, float16, int8, nf4), plus local transformers on the same GPU in this process. Each variant's
client is restricted to its own servers (`allowed_servers`). Every number is a ratio against a baseline
from the same run: swarm/local in the same dtype, quantized/bfloat16 over the same route. Sides alternate
from run to run so drift hits all alike; medians are reported.

The model is a random-weight Llama of SmolLM2's geometry: the real one cannot travel to the GPU machine (see
bench/gpu_wheels.sh). A random model's greedy tokens are often decided by near-ties, so agreement is
reported in full (`Agreement` in tests/cuda/conftest.py): equal or not, first divergence, the share of the
swarm's tokens that are local's top-1 on the swarm's own prefix, and the worst gap against the rounding
bound. The run fails (exit 1) only if some disagreement is larger than rounding explains.

Usage: python bench/gpu_bench.py [--new-tokens 32] [--repeats 5] [--out $OUT/gpu_bench.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _process import prepare  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parent.parent
# name -> (server dtype, server quant); clients run in the server dtype.
VARIANTS = {"bfloat16": ("bfloat16", "none"), "float16": ("float16", "none"),
            "int8": ("bfloat16", "int8"), "nf4": ("bfloat16", "nf4")}
QUANTS = ("int8", "nf4")
SERVERS_PER_VARIANT = 3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to decode per timed run")
    p.add_argument("--prompt-tokens", type=int, default=32, help="length of the (random) prompt")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side; medians are reported")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_bench.json",
                   help="where the JSON goes (default: $OUT/gpu_bench.json, else ./gpu_bench.json)")
    return p.parse_args()


def make_model(path: Path) -> Path:
    """Save a random-weight Llama of SmolLM2's geometry (the GPU tests' one) in float32 under `path`."""
    import torch
    from tests.cuda.conftest import SMOLLM2_GEOMETRY
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_GEOMETRY), dtype=torch.float32).save_pretrained(path)
    return path


def run_once(generate, ids, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds for one greedy generation of exactly `new_tokens` tokens (prefill included), and the tokens."""
    t0 = time.perf_counter()
    out = generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    tokens = out[0, ids.shape[1] :].tolist()  # copies to the host: waits for the GPU
    return time.perf_counter() - t0, tokens


def weight_mib_per_block(log: list[str]) -> float:
    """From a server's line 'blocks A:B hold X MiB of weights'."""
    for line in log:
        m = re.search(r"blocks (\d+):(\d+) hold ([\d.]+) MiB of weights", line)
        if m:
            return float(m[3]) / (int(m[2]) - int(m[1]))
    raise RuntimeError("a server never logged the memory its weights hold:\n" + "".join(log[-20:]))


def measure(args: argparse.Namespace, model_dir: Path) -> dict:
    """Start the swarm, time every side, compare tokens; return the raw numbers."""
    import torch
    from tests.cuda.conftest import allocated_bytes, greedy_agreement
    from transformers import AutoModelForCausalLM

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.cli.local import even_spans
    from swarmllm.launcher import LocalSwarm, ServerSpec
    from swarmllm.models.evaluation import quantized_copy
    from swarmllm.models.span import load_span

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    spans = even_spans(30, SERVERS_PER_VARIANT)
    specs, owner = [], []
    for name, (dtype, quant) in VARIANTS.items():
        for blocks in spans:
            specs.append(ServerSpec(blocks, ("--device", "cuda", "--dtype", dtype, "--quant", quant)))
            owner.append(name)
    ids = torch.randint(3, 49152, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(7)).to("cuda")
    out: dict = {"decode_s": {}, "ttft_s": {}, "tokens": {}, "agreement": {}, "mib_per_block": {},
                 "allocated_mib_per_block": {}}
    # Weights as the allocator counts them, 10 blocks loaded here alone (the blocks are all alike): the
    # servers' log line counts parameters and buffers only, which misses bitsandbytes' scales (attributes).
    for name, quant in (("bfloat16", "none"), *((q, q) for q in QUANTS)):
        held = allocated_bytes(lambda q=quant: load_span(model_dir, 0, 10, torch.bfloat16, quant=q, device="cuda"))
        out["allocated_mib_per_block"][name] = held / 10 / 2**20
    local = {name: AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda").eval()
             for name, dtype in dtypes.items()}
    # The same quantizations run locally: the copies' blocks are on cuda, so they get bitsandbytes' layers,
    # as the servers' do.
    references = {"bfloat16": local["bfloat16"], "float16": local["float16"],
                  **{q: quantized_copy(local["bfloat16"], q) for q in QUANTS}}
    with LocalSwarm(str(model_dir), specs, threads=1) as swarm:
        peers: dict[str, list[str]] = {name: [] for name in VARIANTS}
        for i, name in enumerate(owner):
            peers[name].append(swarm.server_lines[f"server{i}"].split(" peer ")[1].split()[0])
            out["mib_per_block"].setdefault(name, []).append(weight_mib_per_block(swarm.servers[f"server{i}"].log))
        clients = {name: AutoDistributedModelForCausalLM.from_pretrained(
            str(model_dir), initial_peers=swarm.initial_peers, device="cuda", dtype=VARIANTS[name][0],
            allowed_servers=peers[name]) for name in VARIANTS}
        try:
            sides = {f"local {n}": m.generate for n, m in local.items()}
            sides |= {f"swarm {n}": m.generate for n, m in clients.items()}
            with torch.inference_mode():
                _time_sides(args, sides, ids, out)
                for name, reference in references.items():
                    _, want = run_once(reference.generate, ids, args.new_tokens)
                    got = out["tokens"][f"swarm {name}"]
                    out["agreement"][name] = greedy_agreement(reference, ids, got, want)
        finally:
            for client in clients.values():
                client.sequence_manager.shutdown()
    out["device"] = torch.cuda.get_device_name(0)
    out["torch"] = torch.__version__
    return out


def _time_sides(args: argparse.Namespace, sides: dict, ids, out: dict) -> None:
    """Warm every side up, then `repeats` rounds, each side once per round in alternating order."""
    for generate in sides.values():
        run_once(generate, ids, 4)  # connections, allocator, kernels: not timed
    names = list(sides)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else reversed(names):
            seconds, tokens = run_once(sides[name], ids, args.new_tokens)
            first, _ = run_once(sides[name], ids, 1)
            out["decode_s"].setdefault(name, []).append(seconds)
            out["ttft_s"].setdefault(name, []).append(first)
            out["tokens"].setdefault(name, tokens)
            print(f"  run {r} {name}: {args.new_tokens / seconds:.1f} tok/s, first token {1000 * first:.1f} ms",
                  file=sys.stderr)


def summarize(args: argparse.Namespace, m: dict) -> dict:
    tok_s = {name: args.new_tokens / statistics.median(s) for name, s in m["decode_s"].items()}
    ttft_ms = {name: 1000 * statistics.median(s) for name, s in m["ttft_s"].items()}
    mib = {name: statistics.fmean(v) for name, v in m["mib_per_block"].items()}
    allocated = m["allocated_mib_per_block"]
    agreement = {name: {**dataclasses.asdict(a), "explained_by_rounding": a.explained_by_rounding}
                 for name, a in m["agreement"].items()}
    dtypes = {
        name: {
            "local_tok_s": round(tok_s[f"local {name}"], 2), "swarm_tok_s": round(tok_s[f"swarm {name}"], 2),
            "decode_ratio": round(tok_s[f"swarm {name}"] / tok_s[f"local {name}"], 4),
            "local_ttft_ms": round(ttft_ms[f"local {name}"], 2), "swarm_ttft_ms": round(ttft_ms[f"swarm {name}"], 2),
            "ttft_ratio": round(ttft_ms[f"swarm {name}"] / ttft_ms[f"local {name}"], 4),
            "agreement": agreement[name],
        }
        for name in ("bfloat16", "float16")
    }
    quant = {
        name: {
            "mib_per_block": round(allocated[name], 3),
            "memory_ratio_to_bf16": round(allocated[name] / allocated["bfloat16"], 4),
            "logged_mib_per_block": round(mib[name], 3), "logged_ratio_to_bf16": round(mib[name] / mib["bfloat16"], 4),
            "swarm_tok_s": round(tok_s[f"swarm {name}"], 2),
            "decode_ratio_to_bf16": round(tok_s[f"swarm {name}"] / tok_s["swarm bfloat16"], 4),
            "agreement_with_local_quantized": agreement[name],
        }
        for name in QUANTS
    }
    return {
        "device": m["device"], "torch": m["torch"], "model": "random-weight Llama, SmolLM2-135M geometry (30 blocks)",
        "servers": f"{SERVERS_PER_VARIANT} per variant, 10 blocks each, all on cuda:0",
        "bf16_mib_per_block": round(allocated["bfloat16"], 3), "bf16_logged_mib_per_block": round(mib["bfloat16"], 3),
        "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
        "dtypes": dtypes, "quant": quant, "decode_s": m["decode_s"], "ttft_s": m["ttft_s"],
    }


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, torch {results['torch']}, {results['model']}, {results['new_tokens']} new tokens")
    print(f"{'side':<10} {'local tok/s':>11} {'swarm tok/s':>11} {'ratio':>6} {'TTFT ratio':>10}  greedy agreement")
    for name, d in results["dtypes"].items():
        a = d["agreement"]
        print(f"{name:<10} {d['local_tok_s']:>11.1f} {d['swarm_tok_s']:>11.1f} {d['decode_ratio']:>6.2f} "
              f"{d['ttft_ratio']:>10.2f}  {_agreement_text(a)}")
    print(f"{'quant':<10} {'MiB/block':>11} {'vs bf16':>11} {'logged':>7} {'tok/s':>6} {'vs bf16':>10}  "
          "agreement with local quantized")
    for name, q in results["quant"].items():
        print(f"{name:<10} {q['mib_per_block']:>11.2f} {q['memory_ratio_to_bf16']:>11.3f} "
              f"{q['logged_ratio_to_bf16']:>7.3f} {q['swarm_tok_s']:>6.1f} {q['decode_ratio_to_bf16']:>10.2f}  "
              f"{_agreement_text(q['agreement_with_local_quantized'])}")
    print("(MiB/block: the allocator's count, bitsandbytes' scales included; logged: the servers' log line, "
          "without them)")


def _agreement_text(a: dict) -> str:
    if a["equal"]:
        return "equal"
    return (f"first divergence at token {a['first_divergence']}, top-1 {a['top1']:.0%}, worst gap "
            f"{a['worst_gap']:.3g} (rounding bound {a['tie']:.3g})")


def main() -> int:
    args = parse_args()
    prepare()  # SIGTERM (from `timeout`) exits through `finally`: the swarm is stopped, not orphaned
    sys.path.insert(0, str(ROOT))  # tests.cuda.conftest: the GPU tests' model geometry and agreement measure
    import torch

    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__} sees none): this benchmark needs a GPU; see docs/gpu.md",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        results = summarize(args, measure(args, make_model(Path(tmp))))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out}")
    agreements = [d["agreement"] for d in results["dtypes"].values()]
    agreements += [q["agreement_with_local_quantized"] for q in results["quant"].values()]
    if not all(a["explained_by_rounding"] for a in agreements):
        print("!!! a swarm's greedy tokens differ from local by more than rounding explains !!!", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
