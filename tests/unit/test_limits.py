"""Per-peer limits, on a fake clock: each limit refuses with RateLimited, changes nothing when it does, and
never lets one peer's use count against another's. Also the LoRA cache's bounds on unfinished uploads."""

from __future__ import annotations

import pytest
import torch

from swarmllm.adapters import lora
from swarmllm.protocol import LoraRef
from swarmllm.server.config import ServerConfig
from swarmllm.server.limits import Limits, PeerLimits, RateLimited
from swarmllm.server.lora_cache import LoraCache, NotCached, UploadsFull


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limits(clock: Clock | None = None, **kw) -> PeerLimits:
    return PeerLimits(Limits(**kw), clock=clock or Clock())


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    limits = _limits(clock, rate=10.0, burst=5)
    for _ in range(5):
        limits.admit("a")
    with pytest.raises(RateLimited, match=r"retry in 0\.10s"):
        limits.admit("a")
    limits.admit("b")  # another peer has its own bucket
    clock.now += 0.1  # one request's worth
    limits.admit("a")
    with pytest.raises(RateLimited):
        limits.admit("a")
    clock.now += 100  # a long pause refills up to the burst, not beyond
    for _ in range(5):
        limits.admit("a")
    with pytest.raises(RateLimited):
        limits.admit("a")


def test_a_clock_that_steps_back_refills_nothing() -> None:
    clock = Clock()
    limits = _limits(clock, rate=1.0, burst=1)
    limits.admit("a")
    clock.now -= 50
    with pytest.raises(RateLimited):
        limits.admit("a")


def test_sessions_are_counted_per_peer_and_released() -> None:
    limits = _limits(max_sessions=2)
    limits.open_session("a")
    limits.open_session("a")
    with pytest.raises(RateLimited, match="2 sessions open"):
        limits.open_session("a")
    limits.open_session("b")
    limits.close_session("a")
    limits.open_session("a")
    assert limits.held("a") == (2, 0, 0) and limits.held("b") == (1, 0, 0)


def test_tokens_in_flight_are_held_while_the_block_runs() -> None:
    limits = _limits(max_tokens_in_flight=100)
    with limits.tokens("a", 60):
        with pytest.raises(RateLimited, match="60 tokens in flight"):
            with limits.tokens("a", 50):
                pass
        assert limits.held("a") == (0, 60, 0), "a refusal holds nothing"
        with limits.tokens("b", 100):
            pass
    assert limits.held("a") == (0, 0, 0)
    with pytest.raises(RateLimited, match="request of 101 tokens exceeds"):
        limits.hold_tokens("a", 101)


def test_tokens_are_released_when_the_request_fails() -> None:
    limits = _limits(max_tokens_in_flight=10)
    with pytest.raises(ZeroDivisionError):
        with limits.tokens("a", 10):
            1 / 0  # noqa: B018
    assert limits.held("a") == (0, 0, 0)


def test_request_bytes_are_counted_as_parts_arrive() -> None:
    limits = _limits(max_request_bytes=1000)
    limits.hold_bytes("a", 600)
    with pytest.raises(RateLimited, match="1200 bytes of requests in flight"):
        limits.hold_bytes("a", 600)
    limits.hold_bytes("b", 1000)
    limits.release_bytes("a", 600)
    limits.hold_bytes("a", 1000)
    with pytest.raises(RateLimited, match="request of 1001 bytes exceeds"):
        limits.hold_bytes("c", 1001)


def test_attention_size_is_capped_per_request() -> None:
    limits = _limits(max_attention=1000)
    limits.check_attention(1, 10, 100)
    with pytest.raises(RateLimited, match="batch 2 x 10 x 100"):
        limits.check_attention(2, 10, 100)


def test_releases_never_make_counts_negative() -> None:
    limits = _limits()
    limits.release_tokens("ghost", 5)
    limits.close_session("ghost")
    limits.hold_bytes("a", 10)
    limits.release_bytes("a", 50)
    assert limits.held("a") == (0, 0, 0) and limits.held("ghost") == (0, 0, 0)


def test_idle_peers_are_forgotten_so_memory_stays_bounded() -> None:
    clock = Clock()
    limits = _limits(clock, rate=100.0, burst=10)
    limits.open_session("busy")
    limits.admit("recent")
    for i in range(PeerLimits.PRUNE_AT * 3):
        limits.admit(f"sybil{i}")
        clock.now += 0.001
    assert limits.tracked < 2 * PeerLimits.PRUNE_AT
    assert limits.held("busy") == (1, 0, 0), "a peer that holds something is never forgotten"
    # A forgotten peer is indistinguishable from a new one: a full bucket.
    for _ in range(10):
        limits.admit("recent")


def test_limits_come_from_the_server_config() -> None:
    config = ServerConfig(model="m", blocks="0:1", max_sessions_per_peer=1, requests_per_second_per_peer=2.5,
                          request_burst_per_peer=3, max_attention_per_request=7)
    limits = Limits.from_config(config)
    assert (limits.max_sessions, limits.rate, limits.burst, limits.max_attention) == (1, 2.5, 3, 7)
    defaults = Limits.from_config(ServerConfig(model="m", blocks="0:1"))
    assert defaults == Limits(), "one set of defaults: the config's and the record's agree"
    with pytest.raises(ValueError):
        Limits(rate=0)


# --- the LoRA cache's own limits: unfinished uploads, and the layout a request names ---


def _part(ref_sha: str, targets=("a.x",)) -> LoraRef:
    return LoraRef(sha256=ref_sha, rank=2, alpha=4, targets=targets)


def test_unfinished_lora_uploads_are_bounded_per_peer_and_in_all() -> None:
    cache = LoraCache(max_bytes=100)
    half = [torch.zeros(2, 3), torch.zeros(3, 2)]  # 48 bytes: block 0 of a 2-block upload
    assert cache.put("a", _part("1"), 0, 2, (0,), half) is False
    assert cache.put("a", _part("2"), 0, 2, (0,), half) is False
    whole = _part(lora.content_hash(0, 2, ("a.x",), 2, half + half))
    assert cache.put("a", whole, 0, 2, (0,), half) is False  # a's oldest unfinished upload made room
    assert cache._pending_bytes("a") <= cache.max_bytes
    cache.put("b", _part("1"), 0, 2, (0,), half)
    cache.put("b", _part("2"), 0, 2, (0,), half)
    with pytest.raises(UploadsFull):  # a: 96, b: 96, c: 48 more would pass twice the budget
        cache.put("c", _part("1"), 0, 2, (0,), half)
    assert cache.put("a", whole, 0, 2, (1,), half) is True, "a may still finish its own upload"
    with pytest.raises(lora.LoraShapeError, match="exceed"):  # one upload that could never be stored
        cache.put("e", _part("1"), 0, 3, (0, 1, 2), [torch.zeros(2, 3), torch.zeros(3, 2)] * 3)


def test_cached_lora_weights_are_not_applied_to_other_modules() -> None:
    tensors = [torch.randn(2, 4), torch.randn(4, 2)]
    ref = _part(lora.content_hash(0, 1, ("a.x",), 2, tensors))
    cache = LoraCache(max_bytes=10_000)
    assert cache.put("a", ref, 0, 1, (0,), tensors) is True
    assert len(cache.get("a", ref, 0, 1)) == 2
    with pytest.raises(NotCached):
        cache.get("a", ref.model_copy(update={"targets": ("a.y",)}), 0, 1)
    with pytest.raises(NotCached):
        cache.get("a", ref.model_copy(update={"rank": 1}), 0, 1)
