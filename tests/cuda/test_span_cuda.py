"""A span loaded onto the GPU lives there entirely and computes what the same blocks of local transformers
compute on the same GPU; quantized spans (bitsandbytes' int8 and nf4 on CUDA) hold the memory their formats
promise, as the allocator counts it, and pass gradients to their input, as LoRA and server backward need."""

from __future__ import annotations

import pytest
import torch

from swarmllm.models import quant_cuda
from swarmllm.models.span import load_span

pytestmark = pytest.mark.cuda

START, END = 10, 20  # a span in the middle: its input is another span's output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_span_on_cuda_equals_the_local_blocks(dtype, random_smollm2_dir, local_model, prompt_ids, record_property) -> None:
    span = load_span(random_smollm2_dir, START, END, dtype, device="cuda")
    tensors = dict(span.named_parameters()) | dict(span.named_buffers())
    assert tensors and {t.device for t in tensors.values()} == {torch.device("cuda", 0)}, \
        [name for name, t in tensors.items() if t.device.type != "cuda"]
    assert span.dtype == dtype and span.device == torch.device("cuda", 0)

    local = local_model(dtype)
    positions = torch.arange(prompt_ids.shape[1], device="cuda")[None]  # (1, seq)
    with torch.inference_mode():
        # hidden_states[i] is the input of block i, (1, seq, hidden): START's input and END - 1's output.
        states = local(prompt_ids, output_hidden_states=True).hidden_states
        got = span(states[START], positions, None)
    want = states[END]
    record_property("max_abs_diff", (got.float() - want.float()).abs().max().item())
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # same kernels, same shapes: bit for bit
    else:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_quantized_spans_hold_their_share_of_gpu_memory(random_smollm2_dir, allocated, record_property) -> None:
    held = {quant: allocated(lambda q=quant: load_span(random_smollm2_dir, 0, 30, torch.bfloat16, quant=q, device="cuda"))
            for quant in ("none", "int8", "nf4")}
    ratios = {q: held[q] / held["none"] for q in ("int8", "nf4")}
    record_property("mib_per_block", {q: round(b / 30 / 2**20, 3) for q, b in held.items()})
    record_property("ratio_to_bf16", {q: round(r, 4) for q, r in ratios.items()})
    # The allocator counts bitsandbytes' scales, which it keeps outside parameters and buffers. int8: one
    # byte per weight and a float32 scale per row -> ~0.503; nf4: half a byte per weight and a float32 absmax
    # per 64 -> (0.5 + 4/64) / 2 ~ 0.28. Norms stay bfloat16 in both.
    assert 0.47 < ratios["int8"] < 0.56, (held, ratios)
    assert 0.26 < ratios["nf4"] < 0.33, (held, ratios)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_span_passes_gradients_to_its_input(quant, random_smollm2_dir, local_model, prompt_ids,
                                                      record_property) -> None:
    span = load_span(random_smollm2_dir, START, END, torch.bfloat16, quant=quant, device="cuda")
    linears = [m for m in span.layers.modules() if isinstance(m, quant_cuda.quantized_types())]
    assert len(linears) == 7 * (END - START), "load_span on cuda did not give bitsandbytes' layers"
    with torch.no_grad():  # not inference_mode: its tensors could not enter autograd below
        states = local_model(torch.bfloat16)(prompt_ids, output_hidden_states=True).hidden_states
    # What a server does in backward, and LoRA (or prompt tuning) on a client: the blocks' weights stay
    # frozen and the gradient flows to their input.
    hidden = states[START].clone().requires_grad_(True)  # (1, seq, hidden)
    positions = torch.arange(prompt_ids.shape[1], device="cuda")[None]  # (1, seq)
    out = span(hidden, positions, None)
    out.float().sum().backward()
    grad = hidden.grad
    error = ((out.detach().float() - states[END].float()).norm() / states[END].float().norm()).item()
    record_property("relative_error_vs_bf16", round(error, 4))
    record_property("grad_abs_mean", grad.float().abs().mean().item() if grad is not None else None)
    assert grad is not None and grad.shape == hidden.shape
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(not m.weight.requires_grad for m in linears)
    assert error < 0.5, error  # a quantization error, not garbage (which is ~1 or more)


def test_batched_decode_steps_on_cuda_attend_in_place_and_equal_lone_steps(random_smollm2_dir, record_property) -> None:
    """Per-session attention (server/ragged.py) on the GPU: 3 sessions of different lengths decode in shared
    passes, copy no past keys or values, and give what each gives in passes of its own."""
    from swarmllm.server.cache import PagePool, SessionKV, bytes_per_token
    from swarmllm.server.compute import Extras
    from swarmllm.server.inference import Session, StepInput, run_batch

    span = load_span(random_smollm2_dir, START, END, torch.float32, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    lengths, steps = [7, 5, 3], 3
    inputs = [torch.randn(1, n + steps, span.config.hidden_size, device="cuda", generator=generator) for n in lengths]

    def sessions() -> list[Session]:
        made = []
        for x, n in zip(inputs, lengths):
            kv = SessionKV(PagePool(span, bytes_per_token(span) * 64, 64), span, 1)
            kv.take(64)
            session = Session(span, 1, 64, kv, Extras())
            run_batch([StepInput(session, x[:, :n], torch.arange(n, device="cuda")[None], None)])
            made.append(session)
        return made

    def step(session: Session, x: torch.Tensor) -> StepInput:
        at = session.length
        return StepInput(session, x[:, at : at + 1], torch.tensor([[at]], device="cuda"), None)

    batched, alone = sessions(), sessions()
    worst = 0.0
    with torch.inference_mode():
        for _ in range(steps):
            together = run_batch([step(s, x) for s, x in zip(batched, inputs)])
            for s, x, got in zip(alone, inputs, together):
                (want,) = run_batch([step(s, x)])
                worst = max(worst, (got - want).abs().max().item())
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    record_property("max_abs_diff", worst)
    assert sum(s.kv.copied for s in batched) == 0
