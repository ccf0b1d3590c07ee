"""Draw bench/results.json as bench/results.png: every benchmark's ratios, each against its target.

Only ratios are drawn (each measured within one run, against a baseline of the same run); absolute speeds
on a shared machine are noise. A figure missing from results.json (a benchmark not run, or a condition
this machine cannot emulate) is left out, not drawn as zero.

Usage: python bench/chart.py [--results bench/results.json] [--out bench/results.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _get(d: dict, *path):
    for key in path:
        if not isinstance(d, dict) or key not in d or d[key] is None:
            return None
        d = d[key]
    return d


def figures(results: dict) -> list[tuple[str, str, float, float | None, bool]]:
    """(panel, label, value, target, higher_is_better) for every ratio present."""
    out = []

    def add(panel, label, value, target=None, higher=True):
        if isinstance(value, (int, float)):
            out.append((panel, label, float(value), target, higher))

    add("speed vs baseline", "decode: swarm / local", _get(results, "decode", "ratio"), 0.9)
    add("speed vs baseline", "finetune: swarm / local time", _get(results, "finetune", "ratio"), 1.3, False)
    add("speed vs baseline", "TTFT 512: swarm / local time", _get(results, "serving", "batched", "ttft", "ratio"), None, False)
    add("serving many clients", "8 clients / 1 client", _get(results, "serving", "batched", "ratio"), 4.0)
    add("serving many clients", "batched / unbatched servers", _get(results, "serving", "batched_over_unbatched"), None)
    add("serving many clients", "servers' CPU per token: 8 sessions / 1",
        _get(results, "serving", "batched", "server_cpu_per_token_ratio"), 0.35, False)
    add("serving many clients", "API: 8 requests / 1 (tokens/s)", _get(results, "api", "concurrent_ratio_to_one"), 3.0)
    add("serving many clients", "API: n=4 choices / 1", _get(results, "api", "n_choices_ratio_to_one"), None)
    add("speed vs baseline", "API stream / direct generate", _get(results, "api", "api_ratio_to_direct"), None)
    add("speed vs baseline", "API with logprobs / without", _get(results, "api", "logprobs_ratio_to_api"), None)
    add("speed vs baseline", "API top_p sampling CPU: top tokens first / full sort", _get(results, "api", "sampling", "ratio"),
        None, False)
    steps = _get(results, "serving_steps") or {}
    if isinstance(steps.get("step_ratio"), (int, float)) and steps.get("arithmetic_ratio"):
        add("batch-8 decode step at 1,024 tokens", "step growth 1,024/64 / attention's arithmetic growth",
            steps["step_ratio"] / steps["arithmetic_ratio"], 1.0, False)
    add("batch-8 decode step at 1,024 tokens", "step / attention-bound time", steps.get("over_attention_bound"), None, False)
    long = _get(steps, "1024", "copied_bytes_per_step")
    if isinstance(long, (int, float)) and steps.get("new_token_bytes_per_step"):
        add("batch-8 decode step at 1,024 tokens", "bytes copied / new tokens' bytes", long / steps["new_token_bytes_per_step"],
            0.0, False)
    add("batch-8 decode step at 1,024 tokens", "pages interleaved / one run", _get(steps, "interleaved", "ratio_to_one_run"),
        None, False)
    beams = _get(steps, "beams") or {}
    if isinstance(beams.get("copied_bytes_per_step"), (int, float)) and beams.get("whole_cache_bytes"):
        add("batch-8 decode step at 1,024 tokens", "4 beams reordered: bytes copied per step / their cache",
            beams["copied_bytes_per_step"] / beams["whole_cache_bytes"], None, False)
    for mode in ("prompt_lookup", "draft_model"):
        add("fewer round trips (100 ms RTT)", f"{mode.replace('_', ' ')}: tok/s over plain",
            _get(results, "speculative", mode, "speedup"))
    add("fewer round trips (100 ms RTT)", "API --prompt-lookup: tok/s over plain (loopback)",
        _get(results, "api", "prompt_lookup", "speedup"))
    for target in ("1ms", "100ms"):
        measured = _get(results, "wan", "relay_check", target, "measured_ms")
        if isinstance(measured, (int, float)):
            add("WAN: steps/s / limit", f"relay RTT / target {target}", measured / float(target[:-2]), 1.1, False)
    for key, cond in (_get(results, "wan") or {}).items():
        for side in ("push", "nopush"):
            add("WAN: steps/s / limit", f"{key} {side}", _get(cond, f"{side}_vs_limit") if isinstance(cond, dict) else None)
    for mode, row in (_get(results, "quant", "variants") or {}).items():
        if mode == "float32":
            continue
        add("dtype and quantization vs float32", f"{mode}: decode tok/s", _get(row, "tok_s_ratio"))
        add("dtype and quantization vs float32", f"{mode}: memory per block", _get(row, "block_bytes_ratio"), None, False)
        add("dtype and quantization vs float32", f"{mode}: perplexity", _get(row, "perplexity_ratio"), 1.05, False)
    for mode, row in (_get(results, "compression", "modes") or {}).items():
        add("wire compression", f"{mode}: greedy agreement", _get(row, "greedy_agreement"))
    return out


def draw(results: dict, out: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = figures(results)
    panels = list(dict.fromkeys(p for p, *_ in figs))
    if not panels:
        print("no figures in results.json", file=sys.stderr)
        return 1
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.2 + 0.45 * len(figs) + 0.6 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        rows = [f for f in figs if f[0] == panel]
        labels = [r[1] for r in rows]
        values = [r[2] for r in rows]
        colors = []
        for _, _, v, target, higher in rows:
            ok = target is None or (v >= target if higher else v <= target)
            colors.append("#4c9a2a" if ok else "#c0392b")
        ax.barh(labels, values, color=colors)
        for y, (_, _, v, target, _higher) in enumerate(rows):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
            if target is not None:
                ax.plot([target, target], [y - 0.4, y + 0.4], color="black", lw=1.5)
        ax.set_title(panel, fontsize=10, loc="left")
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
    fig.suptitle("swarmllm benchmarks (ratios within one run; black tick = target; red = target missed)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=HERE / "results.json")
    p.add_argument("--out", type=Path, default=HERE / "results.png")
    args = p.parse_args()
    return draw(json.loads(args.results.read_text()), args.out)


if __name__ == "__main__":
    sys.exit(main())
