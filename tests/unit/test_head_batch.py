"""The client's LM-head batcher: concurrent decode steps of several threads share one matmul.

The batching is made deterministic by holding the first pass inside the layer until the other threads'
calls are queued: what is asserted is the batcher's own count of calls and passes, never a race.
"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from swarmllm.client.head_batch import HeadBatcher


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=1, vocab_size=50, hidden_size=32, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return AutoModelForCausalLM.from_config(config).eval()


class _Held:
    """Wraps a forward: its first call waits until `release` is set (and says it started)."""

    def __init__(self, forward, fail: bool = False):
        self.forward, self.fail = forward, fail
        self.started, self.release = threading.Event(), threading.Event()
        self.rows: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        if len(self.rows) == 1:
            self.started.set()
            self.release.wait(10)
        if self.fail and len(self.rows) == 2:
            raise RuntimeError("the head failed")
        return self.forward(x)


def _concurrent(batcher: HeadBatcher, held: _Held, inputs: list[torch.Tensor]) -> list:
    """The first input's call starts alone and is held; the others queue behind it; then it is released."""
    results: list = [None] * len(inputs)

    def call(i: int) -> None:
        try:
            with torch.inference_mode():
                results[i] = batcher(inputs[i])
        except RuntimeError as e:
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    threads[0].start()
    assert held.started.wait(10)
    for t in threads[1:]:
        t.start()
    while True:  # the others' calls are queued (the batcher's own list), not merely started
        with batcher._cv:
            if len(batcher._pending) == len(inputs) - 1:
                break
        time.sleep(0.001)
    held.release.set()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_decode_steps_share_one_head_pass_and_get_their_own_rows() -> None:
    model = _model()
    head = model.get_output_embeddings()
    original = head.forward
    held = _Held(original)
    batcher = HeadBatcher(held)
    inputs = [torch.randn(1 if i != 2 else 2, 1, 32) for i in range(4)]  # one caller decodes 2 rows
    results = _concurrent(batcher, held, inputs)
    assert held.rows == [1, 4], "the first call alone, then the 3 queued ones (4 rows) in one pass"
    assert (batcher.calls, batcher.passes) == (4, 2)
    with torch.no_grad():
        for x, got in zip(inputs, results):
            assert got.shape == (x.shape[0], 1, 50)
            torch.testing.assert_close(got, original(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(batcher(inputs[0]), original(inputs[0]), rtol=0, atol=0)  # alone: bit for bit


def test_a_failed_pass_fails_each_of_its_calls_and_the_next_call_works() -> None:
    model = _model()
    original = model.get_output_embeddings().forward
    held = _Held(original, fail=True)
    batcher = HeadBatcher(held)
    inputs = [torch.randn(1, 1, 32) for _ in range(3)]
    results = _concurrent(batcher, held, inputs)
    assert isinstance(results[0], torch.Tensor)
    assert all(isinstance(r, RuntimeError) and "the head failed" in str(r) for r in results[1:])
    with torch.no_grad():
        torch.testing.assert_close(batcher(inputs[1]), original(inputs[1]), rtol=0, atol=0)


def test_installed_on_a_model_it_batches_decode_steps_only_and_keeps_the_weights() -> None:
    model = _model()
    names = sorted(model.state_dict())
    batcher = HeadBatcher.install(model)
    assert HeadBatcher.install(model) is batcher and sorted(model.state_dict()) == names
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        model(ids)  # a prefill: every position, its own call
        assert batcher.calls == 0
        model(ids, logits_to_keep=1)  # one position per row: through the batcher
        assert batcher.calls == 1
    loss = model(ids, labels=ids).loss  # training: autograd through the layer's own call
    loss.backward()
    assert model.get_output_embeddings().weight.grad is not None and batcher.calls == 1


@pytest.mark.parametrize("batch_heads", [True, False])
def test_the_api_engine_installs_it_unless_told_not_to(batch_heads: bool) -> None:
    from swarmllm.api.config import ApiConfig
    from swarmllm.api.engine import Engine

    model = _model()

    class _Tokenizer:
        eos_token_id = 2

    engine = Engine(model, _Tokenizer(), "tiny", ApiConfig(model="tiny", batch_heads=batch_heads))
    try:
        assert isinstance(model.get_output_embeddings().forward, HeadBatcher) == batch_heads
        assert (engine.heads is not None) == batch_heads
    finally:
        engine.shutdown()


class _Recorder:
    def __init__(self, forward):
        self.forward, self.rows = forward, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return self.forward(x)


def _in_thread(fn) -> threading.Thread:
    thread = threading.Thread(target=fn)
    thread.start()
    return thread


def test_a_pass_waits_for_a_recently_active_thread_but_not_for_one_that_is_done() -> None:
    model = _model()
    recorder = _Recorder(model.get_output_embeddings().forward)
    batcher = HeadBatcher(recorder, wait=30.0)  # far longer than the test: a wait that ends early was answered
    x = torch.randn(1, 1, 32)
    go_again, done = threading.Event(), threading.Event()

    def a() -> None:  # a user decoding: one step, then (when told) the next; then done
        with torch.no_grad():
            batcher(x)
            go_again.wait(10)
            batcher(x)
        batcher.forget()

    def b() -> None:
        with torch.no_grad():
            batcher(x)  # waits for a, recently active
        done.set()
        batcher.forget()

    thread_a = _in_thread(a)
    while recorder.rows != [1]:
        time.sleep(0.001)
    thread_b = _in_thread(b)
    while True:
        with batcher._cv:
            if batcher._leading and len(batcher._pending) == 1:
                break
        time.sleep(0.001)
    go_again.set()
    thread_a.join(10)
    thread_b.join(10)
    assert done.is_set() and recorder.rows == [1, 2], "b's pass took a's next step with it"

    def finished_user() -> None:
        with torch.no_grad():
            batcher(x)
        batcher.forget()

    _in_thread(finished_user).join(10)
    t0 = time.monotonic()
    with torch.no_grad():
        batcher(x)  # the only other recent thread said it is done: no waiting
    assert time.monotonic() - t0 < 10 and recorder.rows == [1, 2, 1, 1]


def test_a_pass_stops_waiting_for_a_thread_overdue_by_half_its_period() -> None:
    """A thread that called twice, 20 ms apart, then went silent (its user paused) is still recent, but a
    pass waits for it only until 1.5 of its periods after its last call: not the 30 s cap."""
    model = _model()
    recorder = _Recorder(model.get_output_embeddings().forward)
    batcher = HeadBatcher(recorder, wait=30.0, recent=30.0)
    x = torch.randn(1, 1, 32)
    stop = threading.Event()

    def paused_user() -> None:
        with torch.no_grad():
            batcher(x)
            time.sleep(0.02)
            batcher(x)
        stop.wait(30)  # silent, and never says it is done

    user = _in_thread(paused_user)
    while recorder.rows != [1, 1]:
        time.sleep(0.001)
    finished = threading.Event()
    other = _in_thread(lambda: (batcher(x), finished.set()))
    other.join(10)
    assert finished.is_set() and recorder.rows == [1, 1, 1], "the pass waited for the paused thread"
    with batcher._cv:
        assert 0.02 <= batcher._period[user.ident] < 10 and user.ident in batcher._last  # still recent
    stop.set()
    user.join(10)


def test_a_model_with_a_batcher_deep_copies_into_one_with_its_own() -> None:
    """transformers' assisted generation users copy a model to make a draft of it: the copy batches its own
    head, over its own weights."""
    model = _model()
    HeadBatcher.install(model)
    twin = copy.deepcopy(model)
    batcher = twin.get_output_embeddings().forward
    assert isinstance(batcher, HeadBatcher) and batcher is not model.get_output_embeddings().forward
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(2)
        x = torch.randn(1, 1, 32)
        torch.testing.assert_close(twin.get_output_embeddings()(x), model.get_output_embeddings()(x) * 2)
    assert batcher.calls == 1
