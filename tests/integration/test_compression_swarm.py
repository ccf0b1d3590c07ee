"""Compressed hidden states through real swarms: with SmolLM2, float16 keeps greedy output exact on this
prompt and blockwise8 stays close; forward and backward (tiny Llama) stay within the compression's error;
and servers reply in the compression the client asked for."""

from __future__ import annotations

import pytest
import torch
from hivemind.proto import runtime_pb2

from swarmllm import AutoDistributedModelForCausalLM, wire
from swarmllm.launcher import LocalSwarm, ServerSpec
from swarmllm.models.span import span_from_model
from swarmllm.protocol import SpanReply, StepDone

pytestmark = pytest.mark.swarm

# Measured by bench/compression.py (the same prompt, 3 spans of 10 blocks, every hop compressed both ways):
# float16 gives the uncompressed tokens for all 64 tokens, blockwise8 for the first 61 (16 of the first 16).
# On other prompts blockwise8 diverges sooner (after 6 to 46 tokens): this one checks the wiring, not quality.
PROMPT = "List three good habits for writing maintainable Python code."
NEW_TOKENS = 16
MEASURED_BLOCKWISE8 = 16
# Servers sum in another thread count than the bench (float32 noise in the last bits), which can move a
# value across a rounding boundary of the 8-bit grid: a little slack for blockwise8 only.
BLOCKWISE8_SLACK = 2


def _reply_encodings(monkeypatch, reply: type = StepDone) -> list[tuple[int, str]]:
    """Record (compression, dtype) of the first tensor of every `reply` record the client receives."""
    seen: list[tuple[int, str]] = []
    parse = wire.parse

    def recording(msg, cls, *args, **kwargs):
        if cls is reply and msg.tensors:
            seen.append((msg.tensors[0].compression, msg.tensors[0].dtype))
        return parse(msg, cls, *args, **kwargs)

    monkeypatch.setattr(wire, "parse", recording)
    return seen


def _generate(swarm, model_dir, ids: torch.Tensor, compression: str) -> list[int]:
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(model_dir), initial_peers=swarm.initial_peers, compression=compression
    )
    try:
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        model.sequence_manager.shutdown()
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.real_model
def test_compressed_sessions_match_local_greedy_output(
    smollm2_swarm, smollm2_dir, smollm2_local, smollm2_tokenizer, monkeypatch
) -> None:
    ids = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]  # (1, prompt)
    want = smollm2_local.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    want = want[0, ids.shape[1] :].tolist()
    seen = _reply_encodings(monkeypatch)

    assert _generate(smollm2_swarm, smollm2_dir, ids, "float16") == want
    float16_replies, seen[:] = list(seen), []
    got = _generate(smollm2_swarm, smollm2_dir, ids, "blockwise8")
    same = sum(a == b for a, b in zip(got, want))
    assert same >= MEASURED_BLOCKWISE8 - BLOCKWISE8_SLACK, f"blockwise8 agrees on {same}/{NEW_TOKENS}: {got} vs {want}"

    # Servers answer in the session's compression (a fallback to bfloat16 is part of both modes' contract).
    assert float16_replies and all(
        c == runtime_pb2.CompressionType.FLOAT16 or d.endswith(":bfloat16") for c, d in float16_replies
    ), f"servers replied to a float16 session with {set(float16_replies)}"
    assert seen and all(d.endswith((":blockwise8", ":bfloat16")) for _, d in seen), (
        f"servers replied to a blockwise8 session with {set(seen)}"
    )


def test_forward_and_backward_stay_within_float16_error(tiny_llama_dir, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    seen = _reply_encodings(monkeypatch, SpanReply)
    with LocalSwarm(str(tiny_llama_dir), [ServerSpec("0:2"), ServerSpec("2:4")]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_llama_dir), initial_peers=swarm.initial_peers, compression="float16"
        )
        try:
            g = torch.Generator().manual_seed(0)
            hidden = torch.randn(2, 5, 32, generator=g).requires_grad_()  # (batch, seq, hidden)
            positions, weight = torch.arange(5).expand(2, 5), torch.randn(2, 5, 32, generator=g)
            out = model.backbone.layers(hidden, positions)  # 2 hops, each input and output compressed
            (out * weight).sum().backward()
        finally:
            model.sequence_manager.shutdown()
    reference = hidden.detach().clone().requires_grad_()
    want = span_from_model(local, 0, 4)(reference, positions)
    (want * weight).sum().backward()
    # float16 is 2^-11 relative per crossing; a few crossings through 4 random blocks stay well inside 1e-2.
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(hidden.grad, reference.grad, rtol=1e-2, atol=1e-2)
    assert len(seen) >= 4 and all(c == runtime_pb2.CompressionType.FLOAT16 for c, _ in seen), (
        f"servers replied to float16 forward/backward with {set(seen)}"
    )
