"""Petals' client-side tests, in Petals' own call forms, against a swarmllm swarm of the real SmolLM2.

Code written for Petals calls blocks, sessions and the model in these shapes: a remote block taken by index
and stepped token by token, chained spans with autograd, `model(...)` inside `model.inference_session()`,
generate (greedy, padded batch, sampling, beams), deep prompts passed per call, and `sess.position = n`.
Each test here does what a Petals test checks, written for swarmllm from those behaviours, and compares
with the same blocks run locally by transformers."""

from __future__ import annotations

import pytest
import torch

from swarmllm.models.span import span_from_model

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_torch_thread")]

# A float32 swarm against float32 local blocks: sums in another order, so last-bit differences.
ATOL = 5e-4


def _local(smollm2_local, start: int, end: int):
    span = span_from_model(smollm2_local, start, end)
    return lambda x: span(x, torch.arange(x.shape[1]).expand(x.shape[0], -1))


@pytest.mark.parametrize("block_index", [3, 29])
def test_remote_block_exact_match(smollm2_client, smollm2_local, block_index) -> None:
    remote_block = smollm2_client.model.layers[block_index]
    inputs = torch.randn(1, 8, smollm2_client.config.hidden_size)
    outputs_forward = remote_block(inputs)
    outputs_inference = []
    with torch.inference_mode(), remote_block.inference_session(max_length=inputs.shape[1]) as sess:
        for i in range(inputs.shape[1]):
            outputs_inference.append(sess.step(inputs[:, i : i + 1]))
        with pytest.raises(ValueError, match="max_length"):  # the declared length is enforced
            sess.step(inputs[:, -1:])
    outputs_inference = torch.cat(outputs_inference, dim=1)
    with torch.no_grad():
        ref_outputs = _local(smollm2_local, block_index, block_index + 1)(inputs)
    torch.testing.assert_close(outputs_forward, ref_outputs, rtol=0, atol=ATOL)
    torch.testing.assert_close(outputs_inference, ref_outputs, rtol=0, atol=ATOL)


def test_chained_forward_backward_exact_match(smollm2_client, smollm2_local) -> None:
    torch.manual_seed(0)
    inputs = torch.randn(1, 8, smollm2_client.config.hidden_size, requires_grad=True)
    grad_proj = torch.randn(1, 8, smollm2_client.config.hidden_size)
    remote_blocks = smollm2_client.model.layers[8:14]  # across the servers' boundary at block 10
    outputs = remote_blocks(inputs)
    (outputs * grad_proj).sum().backward()
    grad_remote = inputs.grad.clone()
    inputs.grad = None
    ref_outputs = _local(smollm2_local, 8, 14)(inputs)
    (ref_outputs * grad_proj).sum().backward()
    torch.testing.assert_close(outputs, ref_outputs, rtol=0, atol=ATOL)
    torch.testing.assert_close(grad_remote, inputs.grad, rtol=1e-3, atol=ATOL)


def test_chained_inference_exact_match(smollm2_client, smollm2_local) -> None:
    inputs = torch.randn(1, 10, smollm2_client.config.hidden_size)
    remote_blocks = smollm2_client.model.layers[5:25]
    outputs_inference = []
    with torch.inference_mode(), remote_blocks.inference_session(max_length=10) as sess:
        for i in range(inputs.shape[1]):
            outputs_inference.append(sess.step(inputs[:, i : i + 1]))
    outputs_inference = torch.cat(outputs_inference, dim=1)
    with torch.no_grad():
        ref_outputs = _local(smollm2_local, 5, 25)(inputs)
    torch.testing.assert_close(outputs_inference, ref_outputs, rtol=0, atol=ATOL)


def test_full_model_exact_match(smollm2_client, smollm2_local, smollm2_tokenizer) -> None:
    """Logits of one pass, and of a session fed one token per `model(...)` call, as Petals' test does."""
    test_inputs = smollm2_tokenizer("A quick brown fox was minding its own buisness", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        parallel_outputs = smollm2_client.forward(test_inputs).logits
        assert torch.all(torch.isfinite(parallel_outputs))
        ref_outputs = smollm2_local.forward(test_inputs).logits
        torch.testing.assert_close(parallel_outputs, ref_outputs, rtol=1e-4, atol=1e-3)
        recurrent_outputs = []
        with smollm2_client.inference_session(max_length=test_inputs.shape[1]) as sess:
            for t in range(test_inputs.shape[1]):
                recurrent_outputs.append(smollm2_client(test_inputs[:, t : t + 1]).logits)
            assert sess.position == test_inputs.shape[1]
    torch.testing.assert_close(torch.cat(recurrent_outputs, dim=1), ref_outputs, rtol=1e-4, atol=1e-3)


def test_greedy_generation(smollm2_client, smollm2_local, smollm2_tokenizer) -> None:
    inputs = smollm2_tokenizer("A cat sat on a mat", return_tensors="pt")["input_ids"]
    remote = smollm2_client.generate(inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(remote, smollm2_local.generate(inputs, max_new_tokens=10, do_sample=False))

    side, smollm2_tokenizer.padding_side = smollm2_tokenizer.padding_side, "left"  # a padded batch, as Petals pads it
    try:
        batch = smollm2_tokenizer(["A cat sat on a mat", "A dog sat"], return_tensors="pt", padding=True)
    finally:
        smollm2_tokenizer.padding_side = side
    assert batch["attention_mask"][1, 0] == 0
    remote = smollm2_client.generate(**batch, max_new_tokens=10, do_sample=False)
    assert torch.equal(remote, smollm2_local.generate(**batch, max_new_tokens=10, do_sample=False))


@pytest.mark.parametrize("sampling", [dict(temperature=0.5), dict(top_k=5), dict(top_p=0.9), dict(temperature=0.8, top_k=20)])
def test_sampling(smollm2_client, smollm2_local, smollm2_tokenizer, sampling) -> None:
    inputs = smollm2_tokenizer("A cat sat on a mat", return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    remote = smollm2_client.generate(inputs, max_new_tokens=10, do_sample=True, **sampling)
    torch.manual_seed(0)
    assert torch.equal(remote, smollm2_local.generate(inputs, max_new_tokens=10, do_sample=True, **sampling))


def test_beam_search_generation(smollm2_client, smollm2_local, smollm2_tokenizer) -> None:
    inputs = smollm2_tokenizer("A cat sat on a mat", return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=10, num_beams=4, early_stopping=True, do_sample=False)
    assert torch.equal(smollm2_client.generate(inputs, **kwargs), smollm2_local.generate(inputs, **kwargs))


def test_remote_sequential_prompts(smollm2_client, smollm2_local, batch_size=2, seq_len=5, pre_seq_len=3) -> None:
    """Prompts before the input and deep prompts added at every block, both trained through the swarm. The
    reference adds each block's prompts by hand, block by block."""
    remote_sequential = smollm2_client.model.layers
    hidden = smollm2_client.config.hidden_size
    torch.manual_seed(1)
    inputs = torch.randn(batch_size, seq_len, hidden)
    output_proj = torch.randn(batch_size, seq_len + pre_seq_len, hidden)
    input_prompts = torch.randn(batch_size, pre_seq_len, hidden, requires_grad=True)
    intermediate_prompts = torch.randn(len(remote_sequential), batch_size, pre_seq_len, hidden, requires_grad=True)

    inputs_with_prompts = torch.cat([input_prompts, inputs], dim=1)
    outputs = remote_sequential(inputs_with_prompts, prompts=intermediate_prompts)
    (outputs * output_proj).sum().backward()
    grads = input_prompts.grad.clone(), intermediate_prompts.grad.clone()
    input_prompts.grad = intermediate_prompts.grad = None

    ref_hidden = torch.cat([input_prompts, inputs], dim=1)
    for i in range(len(remote_sequential)):
        ref_hidden = torch.cat([ref_hidden[:, :pre_seq_len] + intermediate_prompts[i], ref_hidden[:, pre_seq_len:]], 1)
        ref_hidden = _local(smollm2_local, i, i + 1)(ref_hidden)
    (ref_hidden * output_proj).sum().backward()
    torch.testing.assert_close(outputs, ref_hidden, rtol=1e-4, atol=ATOL)
    torch.testing.assert_close(grads[0], input_prompts.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grads[1], intermediate_prompts.grad, rtol=1e-3, atol=1e-3)


def test_cache_invalidation(smollm2_client, smollm2_local) -> None:
    """`sess.position = n`: the tokens after n are forgotten, as if never sent."""
    torch.manual_seed(2)
    hidden = smollm2_client.config.hidden_size
    inputs, others = torch.randn(1, 6, hidden), torch.randn(1, 4, hidden)
    remote_blocks = smollm2_client.model.layers
    with torch.inference_mode(), remote_blocks.inference_session(max_length=10) as sess:
        sess.step(inputs)
        sess.position = 2
        outputs = sess.step(others)
        assert sess.position == 6
    with torch.no_grad():
        ref_outputs = _local(smollm2_local, 0, 30)(torch.cat([inputs[:, :2], others], dim=1))[:, 2:]
    torch.testing.assert_close(outputs, ref_outputs, rtol=1e-4, atol=ATOL)
