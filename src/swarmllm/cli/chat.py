"""Interactive chat over the swarm: one inference session holds the whole conversation."""

from __future__ import annotations

import sys
from typing import cast

import torch
from transformers import AutoTokenizer, TextStreamer

from swarmllm.models.shards import no_tensors
from swarmllm.models.source import resolve_model


def chat_loop(model, model_name: str, max_new_tokens: int, max_length: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_name, tensors=no_tensors))
    if tokenizer.chat_template is None:
        raise SystemExit(f"error: {model_name} has no chat template; use `swarmllm generate` instead")
    messages: list[dict[str, str]] = []
    print("Chat through the swarm. An empty line or Ctrl-D ends it.", file=sys.stderr)
    try:
        with model.inference_session(max_length=max_length) as session:
            while True:
                try:
                    text = input("you> ").strip()
                except EOFError:
                    break
                if not text:
                    break
                messages.append({"role": "user", "content": text})
                # The whole conversation is re-rendered by the template; generate() sends only the tokens the
                # session has not seen yet, because the rendered prefix equals the session's history.
                rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                         return_dict=True)
                ids = cast(torch.Tensor, rendered["input_ids"])  # type: ignore[index, call-overload]  # a BatchEncoding
                seen = session.output_ids
                if seen is not None:
                    # Send only what the session has not seen. Where the render differs from the tokens the
                    # model actually produced (e.g. after its end-of-turn token), the session keeps its own.
                    ids = ids[:, _common_prefix(ids, seen) :]
                    start = seen.shape[1] + ids.shape[1]
                else:
                    start = ids.shape[1]
                print("assistant> ", end="", flush=True)
                streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
                out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
                reply = str(tokenizer.decode(out[0, start:], skip_special_tokens=True))
                messages.append({"role": "assistant", "content": reply.strip()})
    finally:
        model.sequence_manager.shutdown()


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.shape[1], b.shape[1])
    diff = (a[0, :n] != b[0, :n]).nonzero()
    return int(diff[0]) if len(diff) else n
