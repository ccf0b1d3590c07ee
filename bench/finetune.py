"""LoRA training step time of SmolLM2 through a 3-server loopback swarm versus a local peft model.

One step is a forward with labels, `loss.backward()` and an AdamW step over the LoRA weights (rank 8 on
q_proj and v_proj), on a batch of 4 rows of 128 tokens packed from examples/data/bank_faq.jsonl. Both sides
run in the same process and the same run, in float32, with the same torch thread count (the servers get it
too), on the same batches, from the same initial LoRA weights: the swarm model's adapter is saved and loaded
into the local peft model. Sides alternate step by step so drift on a shared machine hits both alike; the
first `--warmup` steps are not timed. The number to track is the ratio of the median seconds per step,
swarm/local: what the swarm's network, serialization and hand-offs cost over the same compute (target
<= 1.3; Petals' prompt tuning ran at 1.85x local). The first step's loss must agree between the two sides
(same weights, same data), or the run fails (exit 1).

Threads: as in bench/decode.py, every process (this one and each server) gets `--threads` torch threads,
all the cores by default, and a short OpenMP spin (GOMP_SPINCOUNT=30000). A swarm step is a pipeline: the
forward goes through servers 0, 1, 2, the backward through 2, 1, 0, then the client steps its optimizer;
only one process computes at a time, so each may use every core, provided the idle ones release the cores
quickly instead of busy-waiting for 300000 spins (libgomp's default). The local side gets the same threads.

Usage: python bench/finetune.py [--steps 16] [--warmup 2] [--threads N] [--gomp-spincount 30000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from _process import prepare  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
DATA = ROOT / "examples" / "data" / "bank_faq.jsonl"
TARGET = 1.3
LOSS_RTOL = 1e-4  # float32 through 30 blocks on both sides; the decode bench matches token for token
TARGETS = ("q_proj", "v_proj")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=16, help="timed steps per side; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps per side (connections)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank; alpha is twice the rank")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (both sides)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads, here and per server")
    p.add_argument("--gomp-spincount", type=int, default=30000,
                   help="GOMP_SPINCOUNT here and for the servers; -1 keeps libgomp's default")
    return p.parse_args()


def packed_batches(tokenizer, count: int, batch_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """`count` batches of full rows (no padding) cut from the chat-templated FAQ, repeated as needed."""
    import torch

    stream: list[int] = []
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in rows:
        messages = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        stream += tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    need = count * batch_size * seq_len
    stream = (stream * (need // len(stream) + 1))[:need]
    ids = torch.tensor(stream).view(count, batch_size, seq_len)  # (count, batch, seq)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b} for b in ids]


def train_step(model, opt, batch: dict) -> tuple[float, float]:
    """Seconds for one forward + backward + optimizer step, and the step's loss (before the update)."""
    t0 = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, loss.item()


def local_copy(model_dir: Path, adapter_dir: str, args: argparse.Namespace):
    """A local peft model with the adapter the swarm model starts from; checks it is the adapter asked for."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    local = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    cfg = local.peft_config["default"]
    got = (cfg.r, cfg.lora_alpha, cfg.lora_dropout, sorted(cfg.target_modules))
    want = (args.rank, 2 * args.rank, 0.0, sorted(TARGETS))
    if got != want:
        raise RuntimeError(f"the swarm saved an adapter with (r, alpha, dropout, targets) {got}, not {want}")
    return local


def measure(args: argparse.Namespace) -> dict:
    """Alternate swarm and local training steps on the same batches; return times and losses per side."""
    import torch
    from transformers import AutoTokenizer

    from swarmllm import AutoDistributedModelForCausalLM, LoraSpec
    from swarmllm.cli.local import even_spans
    from swarmllm.launcher import LocalSwarm, ServerSpec
    from swarmllm.models.source import resolve_model
    from swarmllm.models.span import load_config

    torch.set_num_threads(args.threads)
    model_dir = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = packed_batches(tokenizer, args.warmup + args.steps, args.batch_size, args.seq_len)
    specs = [ServerSpec(s) for s in even_spans(load_config(model_dir).num_hidden_layers, 3)]
    out: dict = {"local_s": [], "swarm_s": [], "local_loss": [], "swarm_loss": []}
    with LocalSwarm(str(model_dir), specs, threads=args.threads) as swarm:
        torch.manual_seed(0)
        dist = AutoDistributedModelForCausalLM.from_pretrained(
            str(model_dir), initial_peers=swarm.initial_peers, num_threads=args.threads, dtype=torch.float32,
            tuning_mode="lora",
            lora=LoraSpec(rank=args.rank, alpha=2 * args.rank, dropout=0.0, target_modules=TARGETS),
        )
        try:
            with tempfile.TemporaryDirectory() as tmp:
                dist.save_adapter(tmp)
                local = local_copy(model_dir, tmp, args)
            sides = {}
            for name, model in (("swarm", dist), ("local", local)):
                params = [p for p in model.parameters() if p.requires_grad]
                out[f"{name}_params"] = sum(p.numel() for p in params)
                sides[name] = (model.train(), torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0))
            for i, batch in enumerate(data):
                for name in ("local", "swarm") if i % 2 == 0 else ("swarm", "local"):
                    seconds, loss = train_step(*sides[name], batch)
                    out[f"{name}_loss"].append(loss)
                    if i >= args.warmup:
                        out[f"{name}_s"].append(seconds)
                    print(f"  step {i}{' (warmup)' if i < args.warmup else ''} {name}: {seconds:.3f}s "
                          f"loss {loss:.4f}", file=sys.stderr)
        finally:
            dist.sequence_manager.shutdown()
    out["torch"] = torch.__version__
    return out


def main() -> int:
    args = parse_args()
    prepare(args.gomp_spincount)  # before `measure` loads torch
    m = measure(args)
    local_s, swarm_s = statistics.median(m["local_s"]), statistics.median(m["swarm_s"])
    ratio = swarm_s / local_s
    first_local, first_swarm = m["local_loss"][0], m["swarm_loss"][0]
    loss_ok = abs(first_swarm - first_local) <= LOSS_RTOL * abs(first_local)
    params_ok = m["local_params"] == m["swarm_params"]
    drift = max(abs(a - b) for a, b in zip(m["local_loss"], m["swarm_loss"]))
    results = {
        "local_s_per_step": round(local_s, 4), "swarm_s_per_step": round(swarm_s, 4),
        "ratio": round(ratio, 4),
        "target": TARGET, "first_loss_local": first_local, "first_loss_swarm": first_swarm,
        "first_loss_match": loss_ok, "max_loss_diff_all_steps": drift, "lora_params": m["swarm_params"],
        "batch_size": args.batch_size, "seq_len": args.seq_len, "rank": args.rank, "targets": list(TARGETS),
        "lr": args.lr, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
        "gomp_spincount": args.gomp_spincount, "cpu_count": os.cpu_count(), "torch": m["torch"],
        "local_s": m["local_s"], "swarm_s": m["swarm_s"],
        "local_loss": m["local_loss"], "swarm_loss": m["swarm_loss"],
    }
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**merged, "finetune": results}, indent=2) + "\n")
    verdict = "match" if loss_ok else "DIFFER"
    print(f"first-step loss: swarm {first_swarm:.6f}, local {first_local:.6f} ({verdict}); "
          f"largest difference over all {len(m['local_loss'])} steps {drift:.2e}")
    if not params_ok:
        print(f"!!! trainable parameters differ: swarm {m['swarm_params']}, local {m['local_params']} !!!",
              file=sys.stderr)
    if not loss_ok:
        print("!!! EXACTNESS FAILURE: the swarm's first-step loss differs from the local peft model's !!!",
              file=sys.stderr)
    print(f"finetune: swarm {swarm_s:.3f} s/step, local {local_s:.3f} s/step, ratio {ratio:.2f} "
          f"(target <= {TARGET})")
    return 0 if loss_ok and params_ok else 1


if __name__ == "__main__":
    sys.exit(main())
