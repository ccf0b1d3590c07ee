"""Server pieces without a network: input validation, sub-spans, config and CLI options."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest
import torch

from swarmllm.cli.options import add_config_args, config_from_args
from swarmllm.server import compute
from swarmllm.server.cache import CacheFullError, CacheMemory, PagePool, SessionKV, bytes_per_token
from swarmllm.server.config import ServerConfig
from swarmllm.server.inference import Session, StepInput, run_batch
from tests.unit.tiny import tiny_span


@pytest.fixture(scope="module")
def span():
    return tiny_span(4)


@pytest.mark.parametrize(
    "hidden, pos, mask, match",
    [
        (torch.randn(1, 3, 31), torch.zeros(1, 3, dtype=torch.long), None, "hidden states must be"),
        (torch.randn(1, 0, 32), torch.zeros(1, 0, dtype=torch.long), None, "hidden states must be"),
        (torch.full((1, 3, 32), float("nan")), torch.zeros(1, 3, dtype=torch.long), None, "NaN"),
        (torch.randn(1, 3, 32), torch.zeros(1, 3, dtype=torch.int32), None, "position_ids"),
        (torch.randn(1, 3, 32), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5), "attention_mask"),
        (torch.ones(1, 3, 32, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), None, "floating"),
    ],
)
def test_bad_inputs_are_rejected_before_compute(span, hidden, pos, mask, match) -> None:
    with pytest.raises(compute.BadRequest, match=match):
        compute.forward(span, hidden, pos, mask)


def test_session_refuses_more_than_max_length_and_keeps_its_state(span) -> None:
    kv = SessionKV(PagePool(span, 2**20, 4), span, batch=1)
    kv.take(4)
    session = Session(span, 1, 4, kv, compute.Extras())
    run_batch([StepInput(session, torch.randn(1, 3, 32), torch.arange(3)[None], None)])
    with pytest.raises(compute.TooLong, match="max_length=4"):
        session.check(torch.randn(1, 2, 32), torch.arange(3, 5)[None], None)
    with pytest.raises(compute.BadRequest, match="opened for batch 1"):
        session.check(torch.randn(2, 1, 32), torch.tensor([[3], [3]]), None)
    assert session.length == 3
    run_batch([StepInput(session, torch.randn(1, 1, 32), torch.tensor([[3]]), None)])
    assert session.length == 4


def test_sub_span_outside_the_server_is_refused(span) -> None:
    with pytest.raises(compute.BadRequest, match="not within"):
        compute.sub_span(span, 2, 6)
    assert compute.sub_span(span, 1, 3).start == 1


def test_backward_matches_local_autograd(span) -> None:
    hidden = torch.randn(2, 5, 32, requires_grad=True)
    pos = torch.arange(5).expand(2, -1)
    out = span(hidden, pos)
    grad_out = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, hidden, grad_out)
    (got,) = compute.backward(span, hidden.detach(), pos, grad_out, None)  # no tuning: only the input gradient
    torch.testing.assert_close(got, want)
    assert all(p.grad is None for p in span.parameters()), "base weights never receive gradients"


def test_server_config_cli_is_built_from_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser, ServerConfig, positional=("model",))
    ns = parser.parse_args(["m", "--blocks", "0:3", "--dtype", "bfloat16", "--initial-peers", "/ip4/1.2.3.4/tcp/1"])
    config = config_from_args(ServerConfig, ns)
    assert (config.blocks, config.dtype, config.initial_peers) == ("0:3", "bfloat16", ["/ip4/1.2.3.4/tcp/1"])
    assert config.max_cache_bytes == ServerConfig.model_fields["max_cache_bytes"].default
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--dtype", "float64"])
    with pytest.raises(SystemExit, match="exactly one of"):
        config_from_args(ServerConfig, parser.parse_args(["m"]))


def test_device_dtype_and_auto_sizes_come_from_the_cli() -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser, ServerConfig, positional=("model",))
    config = config_from_args(ServerConfig, parser.parse_args(["m", "--num-blocks", "auto", "--max-cache-bytes", "auto",
                                                               "--device", "cuda:1", "--dtype", "float16"]))
    assert (config.num_blocks, config.max_cache_bytes, config.device, config.dtype) == ("auto", "auto", "cuda:1", "float16")
    config = config_from_args(ServerConfig, parser.parse_args(["m", "--num-blocks", "5", "--quant", "int4"]))
    assert (config.num_blocks, config.quant, config.device, config.dtype) == (5, "int4", "auto", "auto")
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--num-blocks", "many"])
    with pytest.raises(SystemExit, match="at least 1 or auto"):
        config_from_args(ServerConfig, parser.parse_args(["m", "--num-blocks", "0"]))
    help_text = parser.format_help()
    assert "bfloat16 on CUDA GPUs that support it" in help_text and "float32 on CPU" in help_text


def test_a_server_between_spans_refuses_with_not_serving(span) -> None:
    with pytest.raises(compute.NotServing, match="moving to other blocks"):
        compute.sub_span(None, 0, 2)


def test_running_out_of_device_memory_is_a_typed_busy_reply() -> None:
    from swarmllm.protocol import ErrorCode
    from swarmllm.server.replies import error_code

    assert error_code(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")) == ErrorCode.CACHE_FULL
    assert error_code(RuntimeError("something else")) == ErrorCode.INTERNAL


async def _decode(kv: SessionKV, memory: CacheMemory, tokens: int, start: int = 0) -> None:
    """Grow `kv` one token at a time as a server does, writing each token's keys and values (the token's
    position, in every element) into the tiny span's 4 blocks."""
    for t in range(start + 1, tokens + 1):
        await kv.reserve(memory, t, "a step")
        for layer in range(4):  # (batch, kv_heads, q, head_dim)
            kv.write(layer, torch.full((1, 2, 1, 8), float(t - 1)), torch.full((1, 2, 1, 8), -float(t - 1)), t - 1)
        kv.commit(1)


def _positions(kv: SessionKV) -> list[float]:
    """What each stored token says its position is, read back through `views` (block 2's keys)."""
    return [p for keys, _ in kv.views(2, kv.length) for p in keys[0, 1, :, 3].tolist()]


def test_a_growing_cache_takes_one_page_at_a_time_moves_nothing_and_stays_one_run(span) -> None:
    """Decoding 400 tokens one at a time takes exactly the pages they fill, copies no token ever written, and
    (its declared max_length set aside in the pool) reads its whole past as one view."""
    per_page = bytes_per_token(span) * 4
    pool = PagePool(span, 1000 * per_page, 4)
    memory = CacheMemory(budget=pool.capacity, queue_timeout=0.1)
    kv = SessionKV(pool, span, batch=1, limit=410)
    asyncio.run(_decode(kv, memory, 400))
    assert kv.copied == 0 and kv.capacity == 400 and memory.used == kv.held == 100 * per_page == pool.in_use * per_page
    assert kv.in_place(400) and _positions(kv) == list(range(400))

    tight = CacheMemory(budget=3 * per_page, queue_timeout=0.1)  # room for 12 tokens, no more
    kv = SessionKV(PagePool(span, 3 * per_page, 4), span, batch=1)
    asyncio.run(_decode(kv, tight, 12))
    assert kv.capacity == 12 and tight.used == tight.budget


def test_room_set_aside_is_used_by_others_only_when_nothing_else_is_free(span) -> None:
    """Two sessions that declare 20 tokens each set aside 5 pages in a pool of 12: they grow side by side and
    each stays one run. A third, with nothing unclaimed left but 2 pages, takes those, then the room set aside
    for the first; the first then continues in the rest of its room, as a second run, and every token reads back."""
    per_page = bytes_per_token(span) * 4
    pool = PagePool(span, 12 * per_page, 4)
    memory = CacheMemory(budget=pool.capacity, queue_timeout=0.1)
    a, b = (SessionKV(pool, span, batch=1, limit=20) for _ in range(2))

    async def main():
        for n in (4, 8):
            await _decode(a, memory, n, n - 4)
            await _decode(b, memory, n, n - 4)
        assert a.tables == [[0, 1]] and b.tables == [[5, 6]]  # each in its own room
        c = SessionKV(pool, span, batch=1)
        await _decode(c, memory, 12)  # pages 10, 11, then the first free one of a's room
        assert c.tables == [[10, 11, 2]]
        await _decode(a, memory, 16, 8)  # a's next page is c's now: it goes on after it, in its own room
        assert a.tables == [[0, 1, 3, 4]] and len(a.segments(0, 16)) == 2 and not a.in_place(16)
        assert _positions(a) == list(range(16)) and _positions(c) == list(range(12))
        for kv in (a, b, c):
            kv.release(memory)
        assert pool.in_use == 0 and memory.used == 0 and not any(pool._claimed) and not any(pool._blocked)

    asyncio.run(main())


def test_session_kv_owns_its_pages_length_and_rewinds(span) -> None:
    memory = CacheMemory(budget=10 * bytes_per_token(span) * 4, queue_timeout=0.1)
    kv = SessionKV(PagePool(span, memory.budget, 4), span, batch=1)

    async def grow():
        await kv.reserve(memory, 1, "first page")
        await kv.reserve(memory, 4, "still one page")
        await kv.reserve(memory, 9, "two pages more")
        with pytest.raises(CacheFullError):
            await kv.reserve(memory, 100, "more than the budget")

    asyncio.run(grow())
    assert (kv.capacity, kv.held, memory.used) == (12, 3 * kv.page_bytes, 3 * kv.page_bytes)
    kv.commit(9)
    kv.rewind(5)
    assert kv.length == 5
    with pytest.raises(ValueError, match="holds 5 tokens"):
        kv.rewind(6)  # a rewind never grows the session
    kv.release(memory)
    assert (kv.held, memory.used, kv.pool.in_use) == (0, 0, 0)
    kv.release(memory)  # a second release frees nothing twice
    assert (memory.used, kv.pool.in_use) == (0, 0)
    assert kv.capacity == 12, "the tables stay: a pass still running for the session reads them to its end"


def test_beam_steps_in_a_full_pool_count_what_a_reorder_frees_and_a_refused_one_changes_nothing(span) -> None:
    """Two rows (beams) fill the pool. A reorder that makes row 1 continue row 0 frees row 1's two pages and
    needs one, a copy of the page both rows write next: it fits, and the session holds a page less. A step
    that then needs a new page per row finds one free, not two: it fails with CacheFullError after its queue
    wait, and the session keeps its tables, length and budget."""
    per_page = bytes_per_token(span) * 4
    pool = PagePool(span, 4 * per_page, 4)
    memory = CacheMemory(budget=pool.capacity, queue_timeout=0.1)
    kv = SessionKV(pool, span, batch=2)

    async def main():
        await kv.reserve(memory, 8, "two pages per row")  # the whole pool
        for layer in range(4):
            kv.write(layer, torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8), 0)
        kv.commit(6)
        await kv.prepare(memory, 6, 7, [0, 0], "a beam step")
        assert kv.tables[0][0] == kv.tables[1][0] and kv.tables[0][1] != kv.tables[1][1]  # the first page shared
        assert memory.used == kv.held == 3 * per_page == pool.in_use * per_page and len(kv._copies) == 1
        kv.copy_pages()
        kv.commit(2)
        tables, used = [list(t) for t in kv.tables], memory.used
        with pytest.raises(CacheFullError):
            await kv.prepare(memory, 8, 9, [1, 0], "a step past the pages")
        assert (kv.tables, kv.length, memory.used, kv.held, pool.in_use) == (tables, 8, used, used, 3)

    asyncio.run(main())


def _rss() -> int:
    import resource

    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def test_the_pool_is_allocated_whole_but_a_cpu_holds_only_the_pages_sessions_write(span) -> None:
    """A 1 GiB pool adds next to nothing to the process's resident memory on a CPU (the operating system maps
    its pages when first written), and writing 64 MiB of keys and values adds about that: a server's budget
    costs what its sessions use."""
    tokens = 64 * 2**20 // bytes_per_token(span)
    ones = torch.ones(1, 2, tokens, 8)  # what every block writes as keys and as values, made before measuring
    before = _rss()
    pool = PagePool(span, 2**30, 64)
    allocated = _rss() - before
    kv = SessionKV(pool, span, batch=1)
    kv.take(tokens)
    for layer in range(4):
        kv.write(layer, ones, ones, 0)
    written = _rss() - before - allocated
    assert allocated < 16 * 2**20 and 60 * 2**20 < written < 80 * 2**20, (allocated, written)
