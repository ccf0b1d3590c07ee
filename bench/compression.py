"""Wire compression on the real SmolLM2: bytes per token on the wire, and what each mode does to the output.

The swarm is simulated in one process, without the network: three spans of 10 blocks (as the test swarm
splits them), each with its own attention cache as a server keeps it, and every hidden state that would
cross the wire goes through `compression.encode`/`decode` once per crossing: client -> span 1 -> client ->
span 2 -> client -> span 3 -> client. Each mode is compared with the uncompressed run ("none", which must
equal local transformers token for token):

- greedy: 64 new tokens for each of 5 chat prompts; the fraction of positions whose token equals the
  uncompressed run's, and the index of the first that differs (None: none differs);
- teacher-forced: one prefill of a fixed text; the fraction of positions whose top-1 next token is the
  uncompressed top-1, and the mean KL divergence from the uncompressed next-token distribution (no drift
  can build up here, so it isolates the per-step error; KL is the least noisy of these numbers);
- bytes: the serialized tensor proto of a real hidden state, for one decode token and a 128-token prefill,
  and the CPU time of one encode plus decode of it.

A block-size sweep of blockwise8 reports the same numbers for other block sizes (the module constant is
what the wire uses). Results merge into bench/results.json under "compression".

Usage: python bench/compression.py [--new-tokens 64] [--threads N] [--blocks 16 32 64 128 576]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _process import prepare  # noqa: E402  (bench/ is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "results.json"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea and the wind.",
    "Explain in a few sentences why the sky is blue.",
    "List three good habits for writing maintainable Python code.",  # tests/integration/test_compression_swarm.py
    "Describe how a bicycle works to a ten-year-old.",
]
TEXT = (
    "The Industrial Revolution began in Great Britain in the late eighteenth century and spread to continental "
    "Europe and North America over the following decades. Mechanised spinning and weaving transformed the "
    "textile industry, while improvements to the steam engine made factories independent of rivers. Railways "
    "cut the cost of moving coal, iron and people, and cities grew quickly as workers left the countryside. "
    "Historians still debate why the changes started where they did: cheap coal, high wages, secure property "
    "rights, overseas trade and a culture that prized practical invention have all been proposed, and most "
    "accounts combine several of them. The social costs were high, with long working hours, child labour and "
    "crowded housing, which in turn led to new laws, trade unions and public health reforms.\n\n"
    "A compiler turns source code into a form a machine can run. It first splits the text into tokens, then "
    "parses them into a tree that reflects the grammar of the language. Later passes check types, resolve "
    "names and rewrite the tree into a simpler intermediate representation, where most optimisations happen: "
    "constant folding, inlining of small functions, removal of dead code and the allocation of registers. "
    "Finally a code generator emits instructions for the target processor. Interpreters skip some of these "
    "steps and execute the tree or a compact bytecode directly, trading speed for simplicity and portability, "
    "and just-in-time compilers mix both approaches by compiling only the parts of a program that run often.\n\n"
    "To bake a simple loaf of bread, mix five hundred grams of flour with ten grams of salt, seven grams of dried "
    "yeast and about three hundred and fifty millilitres of warm water. Knead the dough for ten minutes until it "
    "is smooth and elastic, then leave it covered in a warm place until it has doubled in size, which usually "
    "takes an hour or two. Shape it, let it rise again for half an hour, and bake it in a hot oven for thirty "
    "to thirty-five minutes, until the crust is brown and the loaf sounds hollow when tapped underneath."
)
SPANS = [(0, 10), (10, 20), (20, 30)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--blocks", type=int, nargs="*", default=[16, 32, 64, 128, 576],
                   help="blockwise8 block sizes for the sweep (the wire uses compression.BLOCK)")
    return p.parse_args()


class SimulatedSwarm:
    """The model's blocks as three spans with server-side caches; hidden states cross a lossy wire."""

    def __init__(self, model, mode: str):
        from swarmllm.models.span import span_from_model

        self.model, self.mode = model, mode
        self.spans = [span_from_model(model, a, b) for a, b in SPANS]
        self.caches = [s.new_cache() for s in self.spans]
        self.length = 0
        self.fallbacks = 0  # tensors sent as bfloat16 instead (float16 overflow, non-finite blockwise8)

    def _wire(self, hidden):
        from swarmllm import compression

        proto = compression.encode(hidden, self.mode)
        self.fallbacks += self.mode not in ("none", "bfloat16") and proto.dtype.endswith(":bfloat16")
        return compression.decode(proto)

    def logits(self, ids):  # ids (batch, seq) -> logits (batch, seq, vocab)
        import torch

        backbone = self.model.base_model
        hidden = backbone.embed_tokens(ids)  # (batch, seq, hidden)
        positions = torch.arange(self.length, self.length + ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        for span, cache in zip(self.spans, self.caches):
            hidden = self._wire(span(self._wire(hidden), positions, None, cache))  # to the server, and back
        self.length += ids.shape[1]
        return self.model.lm_head(backbone.norm(hidden))


def greedy(model, mode: str, ids, new_tokens: int) -> tuple[list[int], int]:
    """Greedy tokens through the simulated swarm (prefill, then one token per step), and the fallbacks.

    End-of-sequence tokens are never picked, as with generate(min_new_tokens=new_tokens): every run, and
    the local reference, decodes exactly `new_tokens` tokens."""
    import torch

    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    swarm, out, step = SimulatedSwarm(model, mode), [], ids
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = swarm.logits(step)[:, -1]  # (1, vocab)
            logits[:, eos] = -torch.inf
            token = logits.argmax(-1, keepdim=True)  # (1, 1)
            out.append(int(token))
            step = token
    return out, swarm.fallbacks


def teacher_forced(model, mode: str, ids):
    """Log-probabilities of the next token at every position of `ids`, through the simulated swarm."""
    import torch

    with torch.inference_mode():
        return torch.log_softmax(SimulatedSwarm(model, mode).logits(ids)[0], dim=-1)  # (seq, vocab)


def agreement(got: list[int], want: list[int]) -> tuple[float, int | None]:
    same = [a == b for a, b in zip(got, want)]
    return sum(same) / len(same), next((i for i, s in enumerate(same) if not s), None)


def wire_sizes(model, ids, modes) -> dict:
    """Bytes of the serialized hidden-state proto per token: one decode token, and a 128-token prefill."""
    import torch

    from swarmllm import compression

    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states[10]  # what span 1 sends back
    out = {}
    for mode in modes:
        one = compression.encode(hidden[:, -1:], mode).ByteSize()
        prefill = compression.encode(hidden[:, :128], mode).ByteSize() / 128
        out[mode] = {"bytes_per_token_decode": one, "bytes_per_token_prefill128": round(prefill, 1),
                     "encode_decode_us_decode": _microseconds(hidden[:, -1:], mode),
                     "encode_decode_us_prefill128": _microseconds(hidden[:, :128], mode)}
    return out


def _microseconds(hidden, mode: str, repeats: int = 200) -> float:
    """Median time of one encode plus one decode (one wire crossing's CPU cost), on one thread as servers
    of the test swarm run."""
    import torch

    from swarmllm import compression

    threads, times = torch.get_num_threads(), []
    torch.set_num_threads(1)
    for _ in range(repeats):
        t0 = time.perf_counter()
        compression.decode(compression.encode(hidden, mode))
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return round(1e6 * statistics.median(times), 1)


def evaluate(model, tokenizer, mode: str, reference: dict, args) -> dict:
    """Agreement of `mode` with the uncompressed reference, over the prompts and the teacher-forced text."""
    fractions, firsts, first16, fallbacks = [], [], [], 0
    for prompt, want in zip(PROMPTS, reference["greedy"]):
        got, fb = greedy(model, mode, chat_ids(tokenizer, prompt), args.new_tokens)
        fraction, first = agreement(got, want)
        fractions.append(round(fraction, 4))
        firsts.append(first)
        first16.append(sum(a == b for a, b in zip(got[:16], want[:16])))
        fallbacks += fb
    logp, want = teacher_forced(model, mode, reference["text_ids"]), reference["logp"]
    kl = (want.exp() * (want - logp)).sum(-1).mean()  # KL(uncompressed || mode), nats per position
    return {
        "greedy_agreement": round(sum(fractions) / len(fractions), 4),
        "greedy_identical_per_prompt": fractions, "first_divergence_per_prompt": firsts,
        "prompts_fully_identical": sum(f is None for f in firsts),
        "identical_of_first16_per_prompt": first16,  # what tests/integration/test_compression_swarm.py sees
        "teacher_forced_top1": round(float((logp.argmax(-1) == want.argmax(-1)).float().mean()), 4),
        "teacher_forced_kl": float(f"{float(kl):.3g}"),
        "bfloat16_fallbacks": fallbacks,
    }


def chat_ids(tokenizer, prompt: str):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]  # (1, prompt)


def measure(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarmllm import compression
    from swarmllm.models.source import resolve_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text_ids = tokenizer(TEXT, return_tensors="pt").input_ids  # (1, seq)
    assert text_ids.shape[1] >= 128, "the text must give at least a 128-token prefill"

    reference = {"greedy": [greedy(model, "none", chat_ids(tokenizer, p), args.new_tokens)[0] for p in PROMPTS],
                 "logp": teacher_forced(model, "none", text_ids), "text_ids": text_ids}
    local = [model.generate(chat_ids(tokenizer, p), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            do_sample=False)[0, -args.new_tokens:].tolist() for p in PROMPTS]
    results: dict = {"none_equals_local": local == reference["greedy"], "new_tokens": args.new_tokens,
                     "prompts": len(PROMPTS), "text_tokens": text_ids.shape[1], "block": compression.BLOCK,
                     "wire": wire_sizes(model, text_ids, compression.MODES), "modes": {}, "blockwise8_blocks": {}}
    for mode in compression.MODES[1:]:
        t0 = time.perf_counter()
        results["modes"][mode] = evaluate(model, tokenizer, mode, reference, args)
        print(f"  {mode}: {results['modes'][mode]} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    default = compression.BLOCK
    try:
        for block in args.blocks:
            compression.BLOCK = block  # the sweep only: encode reads the module constant at each call
            if block == default:
                row = dict(results["modes"]["blockwise8"])
            else:
                row = evaluate(model, tokenizer, "blockwise8", reference, args)
            row["bytes_per_token_decode"] = wire_sizes(model, text_ids, ["blockwise8"])["blockwise8"]["bytes_per_token_decode"]
            results["blockwise8_blocks"][str(block)] = row
            print(f"  blockwise8 block {block}: {row}", file=sys.stderr)
    finally:
        compression.BLOCK = default
    results["torch"] = torch.__version__
    return results


def main() -> int:
    args = parse_args()
    prepare()  # before `measure` loads torch
    results = measure(args)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**merged, "compression": results}, indent=2) + "\n")
    none = results["wire"]["none"]["bytes_per_token_decode"]
    print(f"uncompressed simulation equals local transformers: {results['none_equals_local']}")
    for mode, row in results["wire"].items():
        agree = results["modes"].get(mode, {})
        print(f"{mode:>10}: {row['bytes_per_token_decode']} B/token ({row['bytes_per_token_decode'] / none:.3f} of none), "
              f"prefill {row['bytes_per_token_prefill128']} B/token; greedy identical "
              f"{agree.get('greedy_agreement', 1.0):.3f}, teacher-forced top-1 {agree.get('teacher_forced_top1', 1.0):.3f}")
    return 0 if results["none_equals_local"] else 1


if __name__ == "__main__":
    sys.exit(main())
