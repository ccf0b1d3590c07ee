"""Fine-tune SmolLM2 through a swarm with LoRA, on made-up facts about a bank, and compare its answers.

The client keeps the embeddings, the LM head and the LoRA weights; the servers run the blocks, with the
adapter applied on every server, and send gradients back. The training loop below is plain PyTorch: a
forward with `labels`, `loss.backward()`, an AdamW step over the parameters that require grad.

The data is examples/data/bank_faq.jsonl: questions about "Northwind Mutual", a bank that does not exist,
whose answers the base model cannot know. Prompts use the model's chat template and the loss counts only
the answer tokens. After training, the script prints the greedy answers of the base model and of the tuned
model to held-out questions (facts seen in training, worded differently), and saves the adapter in peft's
format.

Without --initial-peers it starts its own swarm on loopback (a bootstrap peer and 3 servers of 10 blocks
each) and stops it at the end; the defaults then take about 3 minutes on 2 CPU cores. With --initial-peers,
the servers must have been started with the same model name (`swarmllm serve smollm2 ...`). The saved
adapter also works without a swarm: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
resolve_model("smollm2")), out_dir)` gives the same greedy answers.

Usage: python examples/finetune.py [--steps 120] [--batch-size 4] [--lr 3e-3] [--rank 8] [--out DIR]
                                   [--initial-peers MADDR ...] [--threads N]
"""

from __future__ import annotations

import os

# Before torch loads: processes that share a host and take turns must not busy-wait for the cores (see
# README, "Several processes on one host"). The servers started here inherit it.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import argparse
import contextlib
import json
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

DATA = Path(__file__).resolve().parent / "data" / "bank_faq.jsonl"
IGNORE = -100  # label of tokens that take no part in the loss (prompt and padding)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model name, as the servers were started with")
    p.add_argument("--data", type=Path, default=DATA, help="JSONL with question, answer, split")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha is twice the rank)")
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="modules that get LoRA")
    p.add_argument("--out", type=Path, default=Path("bank_faq_lora"), help="where to save the adapter")
    p.add_argument("--initial-peers", nargs="+", default=None,
                   help="join this swarm instead of starting a local one")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads, here and in each local server")
    p.add_argument("--max-new-tokens", type=int, default=32, help="length of the compared answers")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def load_pairs(path: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """The chat-templated question, ending where the assistant's answer starts."""
    messages = [{"role": "user", "content": question}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return encoded["input_ids"]


def encode(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the whole exchange, and labels that are IGNORE on the prompt: only the answer counts."""
    prompt = prompt_ids(tokenizer, question)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    if ids[: len(prompt)] != prompt:
        raise ValueError("the chat template does not render the prompt as a prefix of the exchange")
    return ids, [IGNORE] * len(prompt) + ids[len(prompt) :]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and of the loss."""
    width = max(len(ids) for ids, _ in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, labels in examples:
        pad = width - len(ids)
        batch["input_ids"].append(ids + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(ids) + [0] * pad)
        batch["labels"].append(labels + [IGNORE] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}  # each (batch, width)


def batches(examples: list, batch_size: int, steps: int, seed: int) -> Iterator[tuple[int, list]]:
    """(epoch, batch) for `steps` batches: each epoch is one shuffled pass over the examples."""
    generator = torch.Generator().manual_seed(seed)
    step, epoch = 0, 0
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            if step == steps:
                return
            yield epoch, [examples[j] for j in order[i : i + batch_size]]
            step += 1
        epoch += 1


def train(model, examples: list, pad_id: int, args: argparse.Namespace) -> dict[int, list[float]]:
    """Plain PyTorch loop; returns the losses of each epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"training {sum(p.numel() for p in params):,} LoRA parameters ({len(params)} tensors) "
          f"for {args.steps} steps of {args.batch_size}")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    losses: dict[int, list[float]] = {}
    model.train()
    bar = tqdm(batches(examples, args.batch_size, args.steps, args.seed), total=args.steps, unit="step")
    for epoch, chunk in bar:
        out = model(**collate(chunk, pad_id))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.setdefault(epoch, []).append(out.loss.item())
        bar.set_postfix(epoch=epoch, loss=f"{out.loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def answer(model, tokenizer: PreTrainedTokenizerBase, questions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to a batch of questions (left-padded, so every answer starts at the same column)."""
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # (batch, width)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def report_losses(losses: dict[int, list[float]]) -> None:
    epochs = sorted(losses)
    first, last = losses[epochs[0]], losses[epochs[-1]]
    if len(epochs) == 1:  # a single (partial) epoch: compare its halves instead
        half = max(1, len(first) // 2)
        first, last = first[:half], first[half:] or first[-1:]
        print(f"loss: first half {statistics.mean(first):.3f} -> second half {statistics.mean(last):.3f}")
        return
    print(f"loss: epoch 1 mean {statistics.mean(first):.3f} -> epoch {epochs[-1] + 1} mean "
          f"{statistics.mean(last):.3f} ({len(epochs)} epochs)")


def compare(held_out: list[dict], before: list[str], after: list[str]) -> None:
    for row, base, tuned in zip(held_out, before, after):
        print(f"\nQ: {row['question']}\n  expected: {row['answer']}\n  base:     {base}\n  tuned:    {tuned}")
    print()
    n = len(held_out)
    checks = {
        "exactly right": lambda a, r: a == r["answer"],
        "with the key detail": lambda a, r: r["key"] in a,  # the made-up fact, whatever the wording
    }
    for what, hit in checks.items():
        base, tuned = (sum(hit(a, r) for a, r in zip(answers, held_out)) for answers in (before, after))
        print(f"held-out answers {what}: base {base}/{n}, tuned {tuned}/{n}")


def run(args: argparse.Namespace, initial_peers: list[str]) -> None:
    from swarmllm import AutoDistributedModelForCausalLM, LoraSpec
    from swarmllm.models.source import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    train_set = [encode(tokenizer, r["question"], r["answer"]) for r in load_pairs(args.data, "train")]
    held_out = load_pairs(args.data, "test")
    torch.manual_seed(args.seed)  # the adapter's initial weights
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=initial_peers, num_threads=args.threads, tuning_mode="lora",
        lora=LoraSpec(rank=args.rank, alpha=2 * args.rank, dropout=0.0, target_modules=tuple(args.targets)),
    )
    try:
        questions = [r["question"] for r in held_out]
        # LoRA starts with B = 0, so before the first step the adapted model computes exactly the base model.
        before = answer(model, tokenizer, questions, args.max_new_tokens)
        t0 = time.perf_counter()
        losses = train(model, train_set, tokenizer.pad_token_id, args)
        print(f"{args.steps} steps in {time.perf_counter() - t0:.0f}s")
        report_losses(losses)
        after = answer(model, tokenizer, questions, args.max_new_tokens)
        compare(held_out, before, after)
        model.save_adapter(args.out)
        print(f"adapter saved to {args.out}/ (peft format)")
    finally:
        model.sequence_manager.shutdown()


@contextlib.contextmanager
def swarm_peers(args: argparse.Namespace) -> Iterator[list[str]]:
    """The given swarm, or a local one of 3 servers that stops when the block exits."""
    if args.initial_peers:
        yield args.initial_peers
        return
    from swarmllm.cli.local import even_spans
    from swarmllm.launcher import LocalSwarm, ServerSpec
    from swarmllm.models.source import resolve_model
    from swarmllm.models.span import load_config

    # Resolve (and convert, the first time) before the servers start, so they do not race to convert it.
    num_blocks = load_config(resolve_model(args.model)).num_hidden_layers
    specs = [ServerSpec(s) for s in even_spans(num_blocks, 3)]
    spans = ", ".join(s.blocks for s in specs)
    print(f"starting a local swarm: a bootstrap peer and {len(specs)} servers (blocks {spans})")
    with LocalSwarm(args.model, specs, threads=args.threads) as swarm:
        yield swarm.initial_peers
    print("local swarm stopped")


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    # A plain SIGTERM would skip LocalSwarm's cleanup and orphan the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with swarm_peers(args) as peers:
        run(args, peers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
