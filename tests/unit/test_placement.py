"""Nothing a server computes is created off the span's device.

There is no GPU here, so a forgotten `device=` would go unnoticed on the CPU. These tests watch every
tensor factory call (`torch.zeros`, `arange`, `tensor`, `randn`, ...) made from swarmllm's own code while a
server runs a forward, a backward, batched inference steps with padding, and its speed measurement, and
fail on any that names no device. Factories that derive the device from a tensor (`zeros_like`,
`new_empty`) are fine by construction and not watched. A span loaded on the `meta` device then shows that
loading places every weight on the chosen device.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from swarmllm.models.span import load_span
from swarmllm.server import compute
from swarmllm.server.cache import PagePool, SessionKV, bytes_per_token
from swarmllm.server.inference import Session, StepInput, run_batch
from swarmllm.server.throughput import measure
from tests.unit.tiny import tiny_span

_FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor, torch.randn, torch.rand,
    torch.randint, torch.linspace, torch.eye, torch.as_tensor,
}


class _DevicelessFactories(TorchFunctionMode):
    """Records (caller, factory) for each factory call from swarmllm code without a `device` argument."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and "device" not in kwargs:
            caller = sys._getframe(1)
            name = caller.f_globals.get("__name__", "")
            if name.startswith("swarmllm."):
                self.found.append(f"{name}:{caller.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def span():
    return tiny_span(2)


def _session(span, batch: int, tokens: int) -> Session:
    kv = SessionKV(PagePool(span, bytes_per_token(span, batch) * tokens, tokens), span, batch=batch)
    kv.take(tokens)
    return Session(span, batch, tokens, kv, compute.Extras())


def test_server_compute_names_the_device_of_everything_it_creates(span) -> None:
    hidden, pos = torch.randn(2, 5, 32), torch.arange(5).expand(2, -1).contiguous()
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    a, b = _session(span, 1, 16), _session(span, 2, 16)
    with _DevicelessFactories() as watch:
        compute.forward(span, hidden, pos, mask)
        compute.backward(span, hidden, pos, torch.randn_like(hidden), mask)
        run_batch([StepInput(a, hidden[:1], pos[:1], None)])
        run_batch([StepInput(b, hidden, pos, mask)])
        # Two sessions of different lengths in one pass: the padded batch masks are built here.
        run_batch([StepInput(a, hidden[:1, :1], torch.tensor([[5]]), None), StepInput(b, hidden[:, :1], pos[:, :1] + 5, None)])
        measure(span, repeats=1, context=4, batch_tokens=8)
    assert watch.found == []


def test_the_watch_catches_a_factory_without_a_device() -> None:
    with _DevicelessFactories() as watch:
        _made_here = torch.arange(3)  # noqa: F841 -- from this test module, not swarmllm: ignored
    assert watch.found == []
    import swarmllm.server.inference as inference

    with _DevicelessFactories() as watch:
        eval("torch.zeros(2)", vars(inference))  # a call whose caller is swarmllm code
    assert len(watch.found) == 1 and "swarmllm.server.inference" in watch.found[0]


def test_a_span_loaded_on_a_device_holds_every_weight_and_buffer_there(tiny_llama_dir) -> None:
    span = load_span(tiny_llama_dir, 1, 3, torch.bfloat16, device="meta")
    tensors = [*span.parameters(), *span.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert span.device == torch.device("meta") and span.dtype == torch.bfloat16
