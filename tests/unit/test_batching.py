"""Batched inference steps and the cache memory manager, without a network.

Several sessions of different lengths (some with left padding) run their steps in shared forward passes;
each must get what the full transformers model gives it alone, for every supported family (sliding
windows included). Then the scheduler's grouping, chunked prefill and cancellation, and the memory
queue's admission rules.
"""

from __future__ import annotations

import asyncio
import collections
import threading

import pytest
import torch
from transformers import DynamicCache

from swarmllm.models.span import span_from_model
from swarmllm.server.cache import CacheFullError, CacheMemory, PagePool, SessionKV, bytes_per_token
from swarmllm.server.compute import Extras
from swarmllm.server.inference import Session, StepInput, run_batch
from swarmllm.server.ragged import RaggedPass, ragged_capable
from swarmllm.server.scheduler import Scheduler, _Call, _Step, take_batch
from tests.unit.test_span_exact import CONFIGS, _model, final_norm, first_hidden, skip_unrun


def _session(span, batch: int = 1, capacity: int = 64) -> Session:
    """A session with pages for `capacity` tokens, in a pool of its own (one run of pages)."""
    kv = SessionKV(PagePool(span, bytes_per_token(span, batch) * capacity, 8), span, batch)
    kv.take(capacity)
    return Session(span, batch, capacity, kv, Extras())


class _Sequence:
    """One client's sequence: token embeddings, its padding mask and what the full model says."""

    def __init__(self, model, length: int, pad: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g)
        self.mask = torch.tensor([[0] * pad + [1] * (length - pad)])
        embeds = model.get_input_embeddings()(self.ids).detach()
        self.position_ids = (self.mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model.base_model(inputs_embeds=embeds, position_ids=self.position_ids, attention_mask=self.mask)
            self.embeds = first_hidden(model, embeds, self.position_ids)  # what the blocks take
        self.want = out.last_hidden_state
        self.norm = final_norm(model)

    def step(self, session: Session, a: int, b: int) -> StepInput:
        mask = self.mask[:, :b] if not self.mask.all() else None
        return StepInput(session, self.embeds[:, a:b], self.position_ids[:, a:b], mask)

    def check(self, got: torch.Tensor, a: int, b: int, name: str) -> None:
        real = self.mask[0, a:b].bool()
        torch.testing.assert_close(self.norm(got)[:, real], self.want[:, a:b][:, real], rtol=1e-4, atol=1e-4, msg=name)


def _prefill_then_decode_together(name: str, seqs: list[_Sequence], sessions: list[Session], prompt: list[int]) -> None:
    """Each session's prompt in a pass of its own, then every session's next token in shared passes until all
    sequences end; every output checked against the full model."""
    with torch.no_grad():
        for seq, session, n in zip(seqs, sessions, prompt):
            (out,) = run_batch([seq.step(session, 0, n)])
            seq.check(out, 0, n, f"{name} prefill {n}")
        pos = list(prompt)
        while any(p < seq.ids.shape[1] for p, seq in zip(pos, seqs)):
            live = [i for i, seq in enumerate(seqs) if pos[i] < seq.ids.shape[1]]
            outs = run_batch([seqs[i].step(sessions[i], pos[i], pos[i] + 1) for i in live])
            for i, out in zip(live, outs):
                seqs[i].check(out, pos[i], pos[i] + 1, f"{name} session {i} decode at {pos[i]}")
                pos[i] += 1


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager adds the mask to the scores: 0 or -inf
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batched_sessions_of_different_lengths_equal_the_full_model(name: str, attention: str) -> None:
    skip_unrun(name, attention)
    if name == "phi3_longrope":
        pytest.skip("the reference is one pass over each whole sequence, whose table differs from its steps' "
                    "past the limit: test_longrope_rows_take_the_table_of_their_own_step... checks it step by step")
    model = _model(name, attention)
    span = span_from_model(model, 0, model.config.num_hidden_layers)
    # Three sessions: different prompt lengths, one left-padded; then decode steps all batched together.
    seqs = [_Sequence(model, 14, 0, 1), _Sequence(model, 12, 2, 2), _Sequence(model, 9, 0, 3)]
    prompt = [7, 5, 2]
    sessions = [_session(span) for _ in seqs]
    _prefill_then_decode_together(name, seqs, sessions, prompt)


@pytest.mark.parametrize("name", ["llama", "gemma3", "qwen2", "falcon"])
def test_sessions_whose_pages_interleave_attend_over_each_run_in_place_and_equal_the_full_model(name: str) -> None:
    """Sessions that grow in turns from one pool, page by page and with no room set aside (no declared
    max_length), end up with pages that alternate: every session's past is many runs. Alone and batched, each
    attends over its runs in place (one softmax over all of them) and gets what the full model gives; nothing
    is copied. Gemma 3's sliding layers mask per run too; the second session is left-padded."""
    skip_unrun(name, "sdpa")
    model = _model(name)
    span = span_from_model(model, 0, model.config.num_hidden_layers)
    seqs = [_Sequence(model, 14, 0, 1), _Sequence(model, 12, 3, 2), _Sequence(model, 10, 0, 3)]
    pool = PagePool(span, bytes_per_token(span) * 40, page_tokens=2)
    kvs = [SessionKV(pool, span, 1) for _ in seqs]
    sessions = [Session(span, 1, 14, kv, Extras()) for kv in kvs]
    for tokens in range(2, 15, 2):  # one page each, in turns
        for kv, seq in zip(kvs, seqs):
            kv.take(min(tokens, seq.ids.shape[1]))
    assert all(len(kv.segments(0, kv.capacity)) >= 5 for kv in kvs), [kv.tables for kv in kvs]
    prompt = [5, 6, 2]
    _prefill_then_decode_together(name, seqs, sessions, prompt)  # prompts alone: over several runs from page 2
    assert sum(kv.copied for kv in kvs) == 0


def test_beams_share_pages_instead_of_copying_their_past_and_each_row_equals_its_own_history() -> None:
    """Beam search reorders a session's rows every step. Rows take each other's page tables, so beams share
    their common past; a row about to write into a page it shares gets its own copy of that one page. Over 24
    steps of random reorders (batched with another session), each row's output equals the blocks run on that
    row's whole history, a step copies at most 2 pages (3 rows), whatever the length, and the budget counts
    each page once."""
    model = _model("llama")
    span = span_from_model(model, 0, 4)
    pool = PagePool(span, bytes_per_token(span) * 400, page_tokens=4)
    memory = CacheMemory(pool.capacity, queue_timeout=1.0)
    beams, other = SessionKV(pool, span, 3, limit=40), SessionKV(pool, span, 1, limit=40)
    sessions = [Session(span, 3, 40, beams, Extras()), Session(span, 1, 40, other, Extras())]
    g = torch.Generator().manual_seed(0)
    width = span.config.hidden_size
    histories = [torch.randn(1, 6, width, generator=g) for _ in range(3)]
    lone = torch.randn(1, 6, width, generator=g)
    loop = asyncio.new_event_loop()

    def step(kv: SessionKV, x: torch.Tensor, hypo_ids: list[int] | None = None) -> StepInput:
        loop.run_until_complete(kv.prepare(memory, kv.length, kv.length + x.shape[1], hypo_ids, "a step"))
        pos = torch.arange(kv.length, kv.length + x.shape[1]).expand(x.shape[0], -1)
        return StepInput(sessions[0] if kv is beams else sessions[1], x, pos, None)

    def want(history: torch.Tensor) -> torch.Tensor:
        return span(history, torch.arange(history.shape[1])[None])[:, -1]

    with torch.no_grad():
        run_batch([step(beams, torch.cat(histories))])
        run_batch([step(other, lone)])
        worst = 0
        for n in range(24):
            hypo = torch.randint(0, 3, (3,), generator=g).tolist()
            x = torch.randn(3, 1, width, generator=g)
            histories = [torch.cat([histories[h], x[r : r + 1]], dim=1) for r, h in enumerate(hypo)]
            y = torch.randn(1, 1, width, generator=g)
            lone = torch.cat([lone, y], dim=1)
            before = beams.copied
            got, got_lone = run_batch([step(beams, x, hypo), step(other, y)])
            worst = max(worst, beams.copied - before)
            for r in range(3):
                torch.testing.assert_close(got[r, -1], want(histories[r])[0], rtol=1e-4, atol=1e-4, msg=f"step {n} row {r}")
            torch.testing.assert_close(got_lone[0, -1], want(lone)[0], rtol=1e-4, atol=1e-4)
            assert memory.used == pool.in_use * pool.page_bytes == beams.held + other.held
    loop.close()
    assert 0 < worst <= 2 * pool.page_bytes and other.copied == 0


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_batched_decode_step_reads_the_past_in_place_where_it_attends_per_session(attention: str) -> None:
    """With sdpa, each session attends over its own cache in place: batched decode steps copy no past keys or
    values. Eager attention gathers every session's past into one padded tensor per block, each step: the
    counter sees exactly those bytes."""
    model = _model("llama", attention)
    span = span_from_model(model, 0, 4)
    seqs = [_Sequence(model, 12, 0, seed) for seed in (1, 2, 3)]
    sessions = [_session(span) for _ in seqs]  # capacity for 64 tokens: nothing regrows
    pos, gathered = [7, 5, 3], 0
    with torch.no_grad():
        for seq, session, n in zip(seqs, sessions, pos):
            run_batch([seq.step(session, 0, n)])
        for _ in range(4):
            outs = run_batch([seq.step(session, p, p + 1) for seq, session, p in zip(seqs, sessions, pos)])
            for i, out in enumerate(outs):
                seqs[i].check(out, pos[i], pos[i] + 1, f"{attention} session {i} at {pos[i]}")
                gathered += (pos[i] + 1) * bytes_per_token(span)
                pos[i] += 1
    assert sum(s.kv.copied for s in sessions) == (0 if attention == "sdpa" else gathered)


def test_blocks_that_change_their_keys_after_the_cache_are_refused_per_session_not_computed_wrong(monkeypatch) -> None:
    """DeepSeek's latent attention expands what it caches before attending: a pass that attended per session
    over the cache would be wrong, so it is not capable of it, and forced to, it fails loudly."""
    model = _model("deepseek_v3")
    span = span_from_model(model, 0, model.config.num_hidden_layers)
    assert not ragged_capable(span)
    seqs = [_Sequence(model, 6, 0, seed) for seed in (1, 2)]
    sessions = [_session(span) for _ in seqs]
    with torch.no_grad():
        for seq, session in zip(seqs, sessions):
            run_batch([seq.step(session, 0, 5)])
        monkeypatch.setattr("swarmllm.server.inference.ragged_capable", lambda span: True)
        with pytest.raises(RuntimeError, match="changed their keys between the cache and attention"):
            run_batch([seq.step(session, 5, 6) for seq, session in zip(seqs, sessions)])


def test_the_wrapped_sdpa_is_transformers_own_outside_a_pass_and_in_other_threads() -> None:
    """The registered sdpa attends per session only in the thread running a ragged pass: a model run by another
    thread meanwhile, or after the pass, computes exactly what transformers does."""
    model = _model("llama")
    seq = _Sequence(model, 9, 0, 4)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model.base_model(inputs_embeds=model.get_input_embeddings()(seq.ids)).last_hidden_state

    span = span_from_model(model, 0, 4)
    other: list[torch.Tensor] = []
    with RaggedPass(span, [], 1).active():
        thread = threading.Thread(target=lambda: other.append(run()))
        thread.start()
        thread.join()
    torch.testing.assert_close(other[0], seq.want, rtol=0, atol=0)
    torch.testing.assert_close(run(), seq.want, rtol=0, atol=0)


def _stepwise(model, embeds: torch.Tensor, steps: list[int]) -> list[torch.Tensor]:
    """The full model's outputs when a client runs `embeds` (1, n, hidden) in passes of `steps` tokens."""
    cache, outs, a = DynamicCache(config=model.config), [], 0
    with torch.no_grad():
        for q in steps:
            out = model.base_model(inputs_embeds=embeds[:, a : a + q], position_ids=torch.arange(a, a + q)[None],
                                   cache=cache, use_cache=True)
            outs.append(out.last_hidden_state)
            a += q
    return outs


def test_longrope_rows_take_the_table_of_their_own_step_in_shared_passes_and_chunks() -> None:
    """Longrope picks its short or long rotary table by the longest position of the client's pass. On a
    server, a prefill of 10 tokens runs in chunks (the first ones all below the limit of 8), and a session
    at 5 tokens shares decode passes with one past the limit: each row must still get its own step's table."""
    model = _model("phi3_longrope")
    span = span_from_model(model, 0, 4)
    norm = final_norm(model)
    g = torch.Generator().manual_seed(3)
    a_in = model.get_input_embeddings()(torch.randint(0, 97, (1, 13), generator=g)).detach()
    b_in = model.get_input_embeddings()(torch.randint(0, 97, (1, 8), generator=g)).detach()
    a_want, b_want = _stepwise(model, a_in, [10, 1, 1, 1]), _stepwise(model, b_in, [5, 1, 1, 1])
    a, b = _session(span), _session(span)
    with torch.no_grad():
        chunks = [run_batch([StepInput(a, a_in[:, i : min(i + 3, 10)], torch.arange(i, min(i + 3, 10))[None], None,
                                       last_position=9)])[0] for i in range(0, 10, 3)]
        torch.testing.assert_close(norm(torch.cat(chunks, 1)), a_want[0], rtol=1e-5, atol=1e-5)
        (b_out,) = run_batch([StepInput(b, b_in[:, :5], torch.arange(5)[None], None)])
        torch.testing.assert_close(norm(b_out), b_want[0], rtol=1e-5, atol=1e-5)
        for k in range(3):  # b's decode positions 5, 6, 7 keep the short table; a's 10, 11, 12 the long one
            outs = run_batch([StepInput(a, a_in[:, 10 + k : 11 + k], torch.tensor([[10 + k]]), None),
                              StepInput(b, b_in[:, 5 + k : 6 + k], torch.tensor([[5 + k]]), None)])
            torch.testing.assert_close(norm(outs[0]), a_want[1 + k], rtol=1e-5, atol=1e-5, msg=f"a at {10 + k}")
            torch.testing.assert_close(norm(outs[1]), b_want[1 + k], rtol=1e-5, atol=1e-5, msg=f"b at {5 + k}")


def test_batched_multi_token_steps_equal_solo_ones() -> None:
    """Steps of 3 tokens from two sessions at different lengths share a pass; so do batch-2 sessions."""
    model = _model("llama")
    span = span_from_model(model, 0, 4)
    seqs = [_Sequence(model, 11, 0, 4), _Sequence(model, 8, 3, 5)]
    sessions = [_session(span) for _ in seqs]
    with torch.no_grad():
        run_batch([seqs[0].step(sessions[0], 0, 5)])
        run_batch([seqs[1].step(sessions[1], 0, 2)])
        outs = run_batch([seqs[0].step(sessions[0], 5, 8), seqs[1].step(sessions[1], 2, 5)])
    seqs[0].check(outs[0], 5, 8, "session 0")
    seqs[1].check(outs[1], 2, 5, "session 1")


def test_chunked_prefill_equals_one_pass_and_lets_decode_steps_in_between() -> None:
    model = _model("llama")
    span = span_from_model(model, 0, 4)
    long, short = _Sequence(model, 30, 0, 6), _Sequence(model, 6, 0, 7)
    scheduler = Scheduler(max_batch_rows=8, prefill_chunk=4)

    async def main():
        a, b = _session(span), _session(span)
        await scheduler.step(b, *_args(short.step(b, 0, 5)))
        passes = scheduler.passes_run
        prefill = asyncio.create_task(scheduler.step(a, *_args(long.step(a, 0, 30))))
        await asyncio.sleep(0)
        decode = await scheduler.step(b, *_args(short.step(b, 5, 6)))
        out = await prefill
        return out, decode, scheduler.passes_run - passes

    try:
        out, decode, passes = asyncio.run(main())
    finally:
        scheduler.shutdown()
    long.check(out, 0, 30, "chunked prefill")
    short.check(decode, 5, 6, "decode between chunks")
    assert passes == 30 // 4 + 1 + 1, "8 prefill chunks and one decode pass"


def _args(step: StepInput):
    return step.hidden, step.position_ids, step.mask


def test_take_batch_groups_compatible_steps_and_keeps_the_rest_in_order() -> None:
    def step(key, rows=1):
        return _Step(StepInput(None, torch.zeros(rows, 1, 1), None, None), key)

    a1, call, b1, a2, solo, a3 = step("a"), _Call(print, ()), step("b"), step("a", 2), step(None), step("a", 4)
    queue = collections.deque([a1, call, b1, a2, solo, a3])
    assert take_batch(queue, max_rows=4) == [a1, a2]  # a3 would exceed 4 rows
    assert list(queue) == [call, b1, solo, a3]
    assert take_batch(queue, max_rows=4) == [call]
    assert take_batch(queue, max_rows=4) == [b1]
    assert take_batch(queue, max_rows=4) == [solo]


def test_a_cancelled_step_is_dropped_and_the_others_in_its_batch_finish() -> None:
    model = _model("llama")
    span = span_from_model(model, 0, 4)
    seqs = [_Sequence(model, 4, 0, s) for s in (8, 9, 10)]
    scheduler = Scheduler()
    gate = scheduler.call(lambda: __import__("time").sleep(0.3))  # holds the thread so the steps queue up

    async def main():
        sessions = [_session(span) for _ in seqs]
        tasks = [asyncio.create_task(scheduler.step(s, *_args(q.step(s, 0, 4)))) for s, q in zip(sessions, seqs)]
        await asyncio.sleep(0.05)
        tasks[1].cancel()  # its client disconnected while the step waited for the batch
        done = await asyncio.gather(*tasks, return_exceptions=True)
        return done, sessions

    try:
        (first, cancelled, third), sessions = asyncio.run(main())
    finally:
        gate.result()
        scheduler.shutdown()
    assert isinstance(cancelled, asyncio.CancelledError)
    assert sessions[1].length == 0, "a dropped step never computes"
    seqs[0].check(first, 0, 4, "first")
    seqs[2].check(third, 0, 4, "third")


def test_memory_queue_serves_in_order_times_out_and_refuses_the_impossible() -> None:
    async def main():
        memory = CacheMemory(100, queue_timeout=0.5)
        with pytest.raises(CacheFullError, match="whole budget is"):
            memory.check_possible(101, "a session")
        await memory.acquire(80, "first")
        big = asyncio.create_task(memory.acquire(50, "big"))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(memory.acquire(10, "small"))  # fits, but waits behind `big`: FIFO
        await asyncio.sleep(0.01)
        assert not small.done() and memory.queued == 2
        memory.release(80)  # both fit now, in order
        await asyncio.gather(big, small)
        assert memory.used == 60
        with pytest.raises(CacheFullError, match="waited 0.5s in the queue"):
            await memory.acquire(50, "late")  # 40 free: times out
        assert memory.used == 60 and memory.queued == 0

    asyncio.run(main())


def test_session_memory_is_counted_in_pages_of_keys_and_values() -> None:
    model = _model("llama")  # 4 blocks, 2 kv heads of 8 dims, float32
    span = span_from_model(model, 0, 4)
    assert bytes_per_token(span) == 2 * 2 * 8 * 4 * 4
    kv = SessionKV(PagePool(span, 10 * bytes_per_token(span, 2) * 8, 8), span, batch=2)
    assert kv.page_bytes == 2 * bytes_per_token(span) * 8
    assert kv.pages_for(1) == 1 and kv.pages_for(17) == 3
    kv.take(16)
    assert kv.pages_for(16) == 0 and kv.pages_for(17) == 1


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_cache_budget_counts_what_the_blocks_store(name: str) -> None:
    """Per token, the budget charges exactly the bytes the family's blocks write into the session's cache:
    Falcon's blocks store one key/value head (multi-query) or every query head (the 40B/180B layout),
    whatever num_key_value_heads would suggest."""
    model = _model(name)
    span = span_from_model(model, 1, 3)
    session = _session(span, capacity=8)
    seq = _Sequence(model, 8, 0, 5)
    with torch.no_grad():
        run_batch([seq.step(session, 0, 8)])
    stored = sum(t.numel() * t.element_size() for block in (1, 2) for t in session.kv.read(block, 8))
    assert session.kv.pool.keys.keys() == {1, 2}
    assert stored == bytes_per_token(span) * 8


def test_a_pass_waits_briefly_for_recently_active_sessions_but_never_for_a_lone_one() -> None:
    model = _model("llama")
    span = span_from_model(model, 0, 4)
    a_seq, b_seq = _Sequence(model, 6, 0, 11), _Sequence(model, 6, 0, 12)
    scheduler = Scheduler(batch_wait=0.2)

    async def main():
        a, b = _session(span), _session(span)
        await scheduler.step(a, *_args(a_seq.step(a, 0, 4)))
        t0 = asyncio.get_running_loop().time()
        await scheduler.step(a, *_args(a_seq.step(a, 4, 5)))
        alone = asyncio.get_running_loop().time() - t0
        await scheduler.step(b, *_args(b_seq.step(b, 0, 4)))  # b is now a recently active session
        passes = scheduler.passes_run
        first = asyncio.create_task(scheduler.step(a, *_args(a_seq.step(a, 5, 6))))
        await asyncio.sleep(0.05)  # a's step waits for b's, which comes within batch_wait
        second = await scheduler.step(b, *_args(b_seq.step(b, 4, 5)))
        outs = (await first, second)
        joined = scheduler.passes_run - passes
        scheduler.forget(b)
        t0 = asyncio.get_running_loop().time()
        await scheduler.step(a, *_args(a_seq.step(a, 0, 1)))  # (recomputes position 0: only timing matters)
        after_forget = asyncio.get_running_loop().time() - t0
        return alone, outs, joined, after_forget

    try:
        alone, (out_a, out_b), joined, after_forget = asyncio.run(main())
    finally:
        scheduler.shutdown()
    assert alone < 0.15 and after_forget < 0.15, "a lone session must not wait for a batch"
    assert joined == 1, "both steps ran in one pass"
    a_seq.check(out_a, 5, 6, "a")
    b_seq.check(out_b, 4, 5, "b")
