"""What constrained decoding (api/constrained.py, llguidance) costs per token, against a decode step of the
model in the same run: the real SmolLM2, local, one thread.

For each grammar (a JSON schema, json_object, tool calls with tool_choice 'required', and 'auto' with a text
reply), the API's decoder writes a greedy reply once. Then, over that reply's tokens, the bench times:
- the model's decode steps (one token each, with a cache): the baseline;
- the grammar's work per token: the allowed-token mask (computed and unpacked) and advancing the matcher.
It prints both in ms per token and their ratio. The grammar work runs on the client (the API host), beside
the swarm's steps; on a GPU swarm the steps are faster and the ratio larger.

Usage: python bench/constrained.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _process import prepare  # noqa: E402  (bench/ is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "results.json"
CITY = {"type": "object", "additionalProperties": False, "required": ["city", "population", "country"],
        "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20},
                       "population": {"type": "integer", "minimum": 0, "maximum": 99_999_999}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per measurement; the median is reported")
    return p.parse_args()


def _grammars():
    from swarmllm.api import tool_calls
    from swarmllm.api.constrained import grammar_for

    tools = [tool_calls.Tool.model_validate(WEATHER)]
    return {
        "json_schema": ("Describe Paris in JSON.", grammar_for(CITY, "response_format")),
        "json_object": ('Return {"ok": true} as JSON.', grammar_for({"type": "object"}, "response_format")),
        "tools_required": ("What is the weather in Paris?", tool_calls.grammar(tools, "required", False)),
        "tools_auto_text": ("What is the weather in Paris?", tool_calls.grammar(tools, "auto", False)),
    }


def _step_times(model, prompt: list[int], reply: list[int]) -> float:
    """Seconds per decode step over `reply`, after a prefill of `prompt`."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
        began = time.perf_counter()
        for token in reply:
            model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True, logits_to_keep=1)
    return (time.perf_counter() - began) / len(reply)


def _grammar_times(vocabulary, grammar: str, reply: list[int], vocab: int) -> float:
    matcher = vocabulary.matcher(grammar)
    began = time.perf_counter()
    for token in reply:
        matcher.allowed(vocab)
        matcher.advance(token)
    return (time.perf_counter() - began) / len(reply)


def run(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarmllm.api.constrained import Vocabulary
    from swarmllm.api.generation import Sampling, complete
    from swarmllm.models.source import resolve_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_model("smollm2")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = frozenset({tokenizer.eos_token_id})
    began = time.perf_counter()
    vocabulary = Vocabulary(tokenizer, eos)
    results = {"vocabulary_build_s": round(time.perf_counter() - began, 3)}
    vocab = model.config.vocab_size
    for name, (question, grammar) in _grammars().items():
        prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                    return_dict=True)["input_ids"])
        done = complete(model, tokenizer, prompt, Sampling(max_tokens=48, temperature=0, grammar=grammar), eos,
                        vocabulary=vocabulary)
        reply = [t for t in done.token_ids]
        steps = statistics.median(_step_times(model, prompt, reply) for _ in range(args.repeats))
        masks = statistics.median(_grammar_times(vocabulary, grammar, reply, vocab) for _ in range(args.repeats))
        results[name] = {"tokens": len(reply), "step_ms": round(steps * 1e3, 3), "grammar_ms": round(masks * 1e3, 3),
                         "grammar_ratio_to_step": round(masks / steps, 4), "reply": done.text[:80]}
    results["threads"] = args.threads
    return results


def main() -> int:
    args = parse_args()
    prepare()
    r = run(args)
    print(f"llguidance vocabulary for SmolLM2's tokenizer: built in {r['vocabulary_build_s']:.2f} s (once per API)")
    for name, m in r.items():
        if isinstance(m, dict):
            print(f"{name}: {m['grammar_ms']:.3f} ms of grammar work per token, {m['grammar_ratio_to_step']:.3f}x a "
                  f"decode step ({m['step_ms']:.2f} ms), over {m['tokens']} tokens: {m['reply']!r}")
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**merged, "constrained": r}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
