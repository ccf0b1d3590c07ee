"""Wire records: versioned, frozen, tolerant of unknown fields; errors become typed exceptions."""

from __future__ import annotations

import json

import pytest
import torch
from hivemind.utils import ValueWithExpiration
from pydantic import ValidationError

from swarmllm import wire
from swarmllm.dht.records import parse_servers
from swarmllm.protocol import ErrorCode, OpenSession, ServerRecord, ServerState, SpanRequest, Step, StepDone
from swarmllm.wire import Blame, ProtocolError, RemoteError, blame


def test_records_ignore_unknown_fields_from_newer_peers() -> None:
    data = json.dumps({"step_id": 3, "has_mask": False, "speculative": True, "version": 1}).encode()
    assert Step.from_bytes(data) == Step(step_id=3)


def test_servers_with_a_dtype_or_quantization_we_do_not_know_are_kept() -> None:
    # A newer release's server (say quant "fp8") must stay routable for older peers: hidden states are the same.
    data = json.dumps({"peer_id": "A", "start": 0, "end": 5, "dtype": "float8_e4m3", "quant": "fp8",
                       "device": "xpu", "cache_tokens_left": 10, "version": 1}).encode()
    record = ServerRecord.from_bytes(data)
    assert (record.dtype, record.quant, record.device) == ("float8_e4m3", "fp8", "xpu")
    assert ServerRecord(peer_id="B", start=0, end=1, dtype="float16", cache_tokens_left=0).device == "cpu"
    with pytest.raises(ValidationError):
        ServerRecord(peer_id="C", start=0, end=1, dtype="Float 32!", cache_tokens_left=0)


def test_records_are_frozen_and_validated() -> None:
    step = Step(step_id=1)
    with pytest.raises(ValidationError):
        step.step_id = 2
    with pytest.raises(ValidationError):
        OpenSession(session_id="s", start=0, end=2, batch_size=0, max_length=8)


@pytest.mark.parametrize("fields", [
    {"step_id": "7"},  # a string is not an int
    {"step_id": 1, "has_mask": "yes"},  # nor a bool
    {"step_id": 1.5},
])
def test_records_do_not_coerce_types(fields) -> None:
    with pytest.raises(ValidationError):
        Step.from_bytes(json.dumps(fields).encode())


@pytest.mark.parametrize(("start", "end"), [(-1, 2), (3, 3), (4, 2)])
def test_block_ranges_are_bounded_and_not_empty(start, end) -> None:
    with pytest.raises(ValidationError):
        OpenSession(session_id="s", start=start, end=end, batch_size=1, max_length=8)
    with pytest.raises(ValidationError):
        SpanRequest.from_bytes(json.dumps({"start": start, "end": end}).encode())


def test_tensors_round_trip_with_their_record() -> None:
    hidden = torch.randn(2, 3, 8)
    msg = wire.response(StepDone(step_id=7, length=3), hidden)
    record, (out,) = wire.parse(msg, StepDone)
    assert record.step_id == 7 and torch.equal(out, hidden)


def test_error_reply_becomes_a_typed_exception() -> None:
    msg = wire.error_response(ErrorCode.CACHE_FULL, "only 10 tokens free")
    with pytest.raises(wire.RemoteError, match="only 10 tokens free") as info:
        wire.parse(msg, StepDone, peer="peerXYZ")
    assert info.value.code == ErrorCode.CACHE_FULL


def test_garbage_metadata_is_a_protocol_error() -> None:
    msg = wire.response(Step(step_id=1))
    with pytest.raises(wire.ProtocolError):
        wire.parse(msg, OpenSession)


def test_other_protocol_versions_are_refused() -> None:
    msg = wire.response(StepDone(step_id=1, length=1, version=99))
    with pytest.raises(wire.ProtocolError, match="version 99"):
        wire.parse(msg, StepDone)


def _dht_value(record: dict) -> ValueWithExpiration:
    return ValueWithExpiration(value=record, expiration_time=0.0)


def test_dht_parsing_keeps_only_valid_online_records_under_their_own_peer_id() -> None:
    good = ServerRecord(peer_id="A", start=0, end=5, dtype="float32", cache_tokens_left=10)
    offline = good.model_copy(update={"peer_id": "B", "state": ServerState.OFFLINE})
    raw = {
        "A": _dht_value(good.model_dump(mode="json")),
        "B": _dht_value(offline.model_dump(mode="json")),
        "C": _dht_value(good.model_dump(mode="json")),  # claims to be A while stored under C
        "D": _dht_value({"garbage": True}),
        "E": _dht_value({**good.model_dump(mode="json"), "peer_id": "E", "start": 5, "end": 2}),
    }
    assert [r.peer_id for r in parse_servers(raw)] == ["A"]


def test_every_error_code_blames_one_party() -> None:
    """What a client does after a failure follows from whom it blames; every code is decided here."""
    expected = {
        ErrorCode.BAD_REQUEST: Blame.CALLER, ErrorCode.TOO_LONG: Blame.CALLER, ErrorCode.VERSION: Blame.CALLER,
        ErrorCode.ADAPTER: Blame.CALLER, ErrorCode.NOT_MEMBER: Blame.CALLER,
        ErrorCode.CACHE_FULL: Blame.BUSY, ErrorCode.RATE_LIMITED: Blame.BUSY,
        ErrorCode.SESSION_TIMEOUT: Blame.EXPIRED, ErrorCode.NOT_CACHED: Blame.EXPIRED,
        ErrorCode.NOT_SERVING: Blame.SERVER, ErrorCode.INTERNAL: Blame.SERVER,
    }
    assert {code: blame(RemoteError(code, "why")) for code in ErrorCode} == expected
    for error in (TimeoutError(), ConnectionError("reset"), ProtocolError("not a StepDone")):
        assert blame(error) == Blame.SERVER
