"""What trust costs: signing and sealing, and decode speed with a private swarm and with verification.

Micro-benchmarks time the cryptography in this process (RSA signatures of receipts and records, the
membership HMAC, AES-GCM sealing of DHT records). Then SmolLM2 decodes greedily on a loopback swarm where
each half of the blocks has two servers (so every step can be checked), with verify = 0, 0.2 and 1, and on
a private swarm of the same shape; each configuration's tokens/s is reported as a ratio to the public swarm
without verification, measured in the same run, and every configuration's tokens must equal local
transformers' (exit 1 otherwise). Settling a receipt with a server (two RPCs, three signatures) is timed too.

Usage: python bench/trust.py [--new-tokens 32] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _process import prepare  # noqa: E402  (bench/ is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "results.json"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (5 processes share the cores)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per configuration; the median is reported")
    return p.parse_args()


def _per_call_us(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def micro() -> dict:
    import msgpack
    from hivemind.dht.validation import DHTRecord

    from swarmllm.points import check, countersign, issue
    from swarmllm.trust.identity import Identity
    from swarmllm.trust.records import SignedRecords
    from swarmllm.trust.swarm_key import SwarmKey

    server, client = Identity.ephemeral(), Identity.ephemeral()
    key = SwarmKey.create(Path(tempfile.mkdtemp()) / "swarm.key")
    receipt = countersign(client, issue(server, client.peer_id, 1000, 1), 1000)
    record = DHTRecord(b"k" * 20, msgpack.packb(server.peer_id), b"x" * 400, 1e9)
    out = {}
    for name, validator in (("public", SignedRecords(server)), ("private", SignedRecords(server, key))):
        value = validator.sign_value(record)
        signed = DHTRecord(record.key, record.subkey, value, record.expiration_time)
        out[f"record_sign_us_{name}"] = round(_per_call_us(lambda v=validator: v.sign_value(record), 50), 1)
        out[f"record_validate_us_{name}"] = round(_per_call_us(lambda v=validator, s=signed: v.validate(s), 200), 1)
    out["receipt_issue_us"] = round(_per_call_us(lambda: issue(server, client.peer_id, 1000, 1), 50), 1)
    out["receipt_check_us"] = round(_per_call_us(lambda: check(receipt), 200), 1)
    out["membership_proof_us"] = round(_per_call_us(lambda: key.is_member(client.peer_id, key.proof(client.peer_id)), 2000), 2)
    return out


def decode(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.client import loop
    from swarmllm.launcher import LocalSwarm, ServerSpec
    from swarmllm.models.source import resolve_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference = local.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    specs = [ServerSpec("0:15"), ServerSpec("0:15"), ServerSpec("15:30"), ServerSpec("15:30")]
    times: dict[str, list[float]] = {}
    exact: dict[str, bool] = {}
    settle_ms: list[float] = []

    def run(name: str, model) -> None:
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: connections, checkers' first steps
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            times.setdefault(name, []).append(time.perf_counter() - t0)
            exact[name] = exact.get(name, True) and torch.equal(out, reference)
            print(f"  {name}: {args.new_tokens / times[name][-1]:.2f} tok/s", file=sys.stderr)

    for private in (False, True):
        key = str(Path(tempfile.mkdtemp()) / "swarm.key") if private else None
        with LocalSwarm(str(model_dir), specs, threads=args.threads, swarm_key=key) as swarm:
            configs = {"private": {}} if private else {"public": {}, "verify_0.2": {"verify": 0.2}, "verify_1": {"verify": 1.0}}
            for name, options in configs.items():
                model = AutoDistributedModelForCausalLM.from_pretrained(
                    str(model_dir), initial_peers=swarm.initial_peers, num_threads=args.threads, swarm_key=key,
                    settle_period=3600, **options)
                try:
                    run(name, model)
                    if name == "public":
                        for server in model.sequence_manager.points.requested.servers():
                            t0 = time.perf_counter()
                            loop.run(model.sequence_manager.points.settle(server))
                            settle_ms.append((time.perf_counter() - t0) * 1e3)
                finally:
                    model.sequence_manager.shutdown()
    tps = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
    return {
        "tok_s": {k: round(v, 3) for k, v in tps.items()},
        "ratio_to_public": {k: round(v / tps["public"], 3) for k, v in tps.items()},
        "tokens_match": exact, "settle_ms": round(statistics.median(settle_ms), 1) if settle_ms else None,
        "new_tokens": args.new_tokens, "threads": args.threads, "repeats": args.repeats,
    }


def main() -> int:
    args = parse_args()
    prepare()
    results = {"micro": micro()}
    print("crypto:", json.dumps(results["micro"]))
    results["decode"] = decode(args)
    d = results["decode"]
    for name, ratio in d["ratio_to_public"].items():
        print(f"{name:>11}: {d['tok_s'][name]:.2f} tok/s, {ratio:.2f}x the public swarm without verification, "
              f"tokens {'match' if d['tokens_match'][name] else 'DIFFER from'} local")
    print(f"settling a receipt with a server: {d['settle_ms']} ms (two RPCs, three RSA signatures)")
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**merged, "trust": results}, indent=2) + "\n")
    return 0 if all(d["tokens_match"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
