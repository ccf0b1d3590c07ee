"""Wire compression: each mode within its documented error, original dtypes and shapes back, garbage refused."""

from __future__ import annotations

import struct

import pytest
import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from swarmllm import compression, wire
from swarmllm.compression import BLOCK, MODES, MalformedTensor, decode, encode
from swarmllm.protocol import OpenSession, SpanRequest, Step, StepDone

SHAPES = [(1, 1, 576), (2, 7, 576), (3, 5, 100), (4, 33), (1, 1, 1), (129,), ()]


def _hidden(shape: tuple[int, ...], outliers: bool, seed: int = 0) -> torch.Tensor:
    """Random activations; with `outliers`, a few channels are hundreds of times larger, as in real LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if outliers and x.numel() > 4:
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 200),), generator=g)
        flat[idx] = torch.randn(idx.shape, generator=g) * 3000
    return x


def _assert_within_bound(mode: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """The module docstring's bound for `mode`, computed in float32 against the original values."""
    x32, y32 = x.float(), y.float()
    err = (y32 - x32).abs()
    if mode == "none":
        assert torch.equal(x32, y32)
        return
    if mode in ("float16", "bfloat16"):
        rel = 2.0**-11 if mode == "float16" else 2.0**-8
        bound = rel * x32.abs() + 2.0**-25
    else:
        width = x.shape[-1] if x.dim() else 1
        rows = x32.reshape(-1, width)
        blocks = -(-width // BLOCK)
        padded = torch.nn.functional.pad(rows.abs(), (0, blocks * BLOCK - width)).view(-1, blocks, BLOCK)
        absmax = padded.amax(-1).repeat_interleave(BLOCK, dim=1)[:, :width].reshape(x.shape)
        bound = absmax / 254 * (1 + 2.0**-16) + 1e-30  # (the test data has no vanishing blocks)
    if x.dtype != torch.float32:  # the decoded value is rounded to the original dtype once more
        bound = bound + torch.finfo(x.dtype).eps / 2 * y32.abs() + 2.0**-25
    assert bool((err <= bound).all()), f"{mode}: max error {(err - bound).max().item():.3g} over the bound"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("outliers", [False, True])
def test_round_trip_is_within_the_documented_bound(mode, shape, outliers) -> None:
    x = _hidden(shape, outliers)
    y = decode(encode(x, mode))
    assert y.dtype == x.dtype and y.shape == x.shape
    _assert_within_bound(mode, x, y)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_come_back_in_their_dtype(mode, dtype) -> None:
    x = _hidden((2, 3, 576), outliers=dtype == torch.bfloat16).to(dtype)
    y = decode(encode(x, mode))
    assert y.dtype == dtype and y.shape == x.shape
    _assert_within_bound(mode, x, y)


@pytest.mark.parametrize("mode", MODES)
def test_integer_and_bool_tensors_travel_untouched(mode) -> None:
    for x in (torch.arange(7).view(1, 7), torch.ones(2, 5, dtype=torch.int32), torch.tensor([[True, False]])):
        proto = encode(x, mode)
        assert proto.compression == runtime_pb2.CompressionType.NONE and ":" not in proto.dtype
        assert torch.equal(decode(proto), x) and decode(proto).dtype == x.dtype


@pytest.mark.parametrize("mode", MODES)
def test_empty_tensors_round_trip(mode) -> None:
    for shape in [(0,), (1, 0, 576), (2, 3, 0)]:
        y = decode(encode(torch.empty(shape), mode))
        assert y.shape == shape and y.dtype == torch.float32


def test_encoding_is_deterministic_and_a_tokens_encoding_ignores_its_neighbours() -> None:
    # A prefill and the same tokens sent one by one must leave the same values in a server's cache.
    x = _hidden((1, 6, 576), outliers=True)
    whole = decode(encode(x, "blockwise8"))
    parts = torch.cat([decode(encode(x[:, i : i + 1], "blockwise8")) for i in range(6)], dim=1)
    assert torch.equal(whole, parts)
    assert encode(x, "blockwise8") == encode(x.clone(), "blockwise8")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(4))
def test_crossing_the_wire_twice_changes_nothing_more(mode, seed) -> None:
    # A server's output reaches the next server both pushed (decoded once) and via the client (decoded,
    # then encoded again): the two copies must be identical, whichever arrives first.
    x = _hidden((3, 4, 576), outliers=seed % 2 == 1, seed=seed) * 10.0 ** (seed - 2)
    if seed == 3:
        x[0, 0, 0] = 1e6  # float16's fallback path
    once = decode(encode(x, mode))
    assert torch.equal(decode(encode(once, mode)), once)


def test_float16_falls_back_to_bfloat16_instead_of_overflowing() -> None:
    x = _hidden((1, 2, 576), outliers=False)
    x[0, 0, 3] = 1e6
    proto = encode(x, "float16")
    assert proto.dtype == "float32:bfloat16"
    y = decode(proto)
    assert torch.isfinite(y).all()
    _assert_within_bound("bfloat16", x, y)


def test_non_finite_values_pass_through_every_lossy_mode() -> None:
    x = _hidden((1, 2, 576), outliers=False)
    x[0, 0, 0], x[0, 1, 5], x[0, 1, 6] = float("inf"), float("-inf"), float("nan")
    for mode in ("float16", "bfloat16", "blockwise8"):
        y = decode(encode(x, mode))
        assert y[0, 0, 0] == float("inf") and y[0, 1, 5] == float("-inf") and y[0, 1, 6].isnan()
        finite = torch.isfinite(x)
        _assert_within_bound("bfloat16" if mode == "blockwise8" else mode, x[finite], y[finite])


def test_all_zero_and_vanishing_blocks_decode_to_zeros() -> None:
    x = torch.zeros(2, 3, 130)
    x[1, 2, 129], x[0, 0, 0] = 5.0, 1e-37
    y = decode(encode(x, "blockwise8"))
    assert torch.count_nonzero(y) == 1 and y[1, 2, 129] == pytest.approx(5.0, rel=1 / 254)


def test_bytes_per_value_on_the_wire() -> None:
    x = _hidden((1, 1, 576), outliers=True)
    size = {mode: encode(x, mode).ByteSize() for mode in MODES}
    assert size["float16"] / size["none"] == pytest.approx(0.5, abs=0.02)
    assert size["bfloat16"] / size["none"] == pytest.approx(0.5, abs=0.02)
    assert size["blockwise8"] / size["none"] < 0.3
    bf16 = x.to(torch.bfloat16)
    assert encode(bf16, "none").ByteSize() < 2.05 * bf16.numel()  # not widened to float32 as hivemind's default


def test_float32_none_and_float16_stay_readable_by_plain_hivemind() -> None:
    # An older peer decodes with hivemind's deserializer: these two layouts must stay hivemind's.
    x = _hidden((2, 3, 8), outliers=False)
    assert torch.equal(deserialize_torch_tensor(encode(x, "none")), x)
    torch.testing.assert_close(deserialize_torch_tensor(encode(x, "float16")), x, rtol=2**-11, atol=0)
    bf16 = x.to(torch.bfloat16)
    assert torch.equal(deserialize_torch_tensor(encode(bf16, "none")), bf16)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown compression"):
        encode(torch.ones(3), "int4")


def _garbage() -> list[runtime_pb2.Tensor]:
    good = encode(_hidden((1, 2, 100), outliers=False), "blockwise8")
    header = struct.pack("<I", BLOCK)

    def variant(**fields) -> runtime_pb2.Tensor:
        proto = runtime_pb2.Tensor()
        proto.CopyFrom(good)
        for name, value in fields.items():
            if name == "size":
                del proto.size[:]
                proto.size.extend(value)
            else:
                setattr(proto, name, value)
        return proto

    nan_scales = header + struct.pack("<4f", float("nan"), 1, 1, 1) + bytes(200)
    return [
        variant(buffer=good.buffer[:-1]),  # truncated codes
        variant(buffer=good.buffer + b"\0"),  # trailing bytes
        variant(buffer=b"\1\0"),  # shorter than the header
        variant(buffer=struct.pack("<I", 0) + good.buffer[4:]),  # block size 0
        variant(buffer=struct.pack("<I", 1 << 30) + good.buffer[4:]),  # absurd block size
        variant(buffer=nan_scales),  # non-finite scale
        variant(size=[4294967295, 4294967295, 4294967295]),  # sizes that must not be allocated
        runtime_pb2.Tensor(size=[0, 4294967295, 4294967295, 4294967295], dtype="float32"),  # empty, but absurd
        runtime_pb2.Tensor(size=[1] * 40, buffer=b"\0" * 4, dtype="float32"),  # more dimensions than torch takes
        variant(dtype="float32:int3"),  # unknown codec
        variant(dtype="int64:blockwise8"),  # a compressed tensor that was never floating
        variant(dtype="complex128"),
        variant(dtype=""),
        variant(compression=runtime_pb2.CompressionType.BLOCKWISE_8BIT),  # hivemind's, needs bitsandbytes
        variant(compression=runtime_pb2.CompressionType.FLOAT16, dtype="float32", buffer=b"\0" * 3),
        runtime_pb2.Tensor(buffer=b"\0" * 7, size=[2], dtype="float32"),
        runtime_pb2.Tensor(buffer=b"\0" * 6, size=[2], dtype="bfloat16"),
    ]


@pytest.mark.parametrize("proto", _garbage())
def test_malformed_tensors_are_refused_with_a_clear_error(proto) -> None:
    with pytest.raises(MalformedTensor):
        decode(proto)


def test_a_malformed_tensor_is_a_protocol_error_for_the_wire() -> None:
    msg = wire.request(Step(step_id=1), torch.ones(1, 1, 8))
    msg.tensors[0].buffer = b"\0" * 5
    with pytest.raises(wire.ProtocolError, match="Step: 5 bytes"):
        wire.parse(msg, Step)
    assert issubclass(MalformedTensor, ValueError)


@pytest.mark.parametrize("mode", MODES)
def test_wire_messages_carry_any_mode_and_survive_splitting(mode) -> None:
    hidden, positions = _hidden((3, 700, 576), outliers=True), torch.arange(700).expand(3, 700)
    msg = wire.response(StepDone(step_id=2, length=700), hidden, positions, compression=mode)
    joined = wire.join(wire.split(msg, max_part_bytes=1 << 16))
    _, (out, pos) = wire.parse(joined, StepDone)
    assert torch.equal(pos, positions) and out.dtype == hidden.dtype
    _assert_within_bound(mode, hidden, out)


def test_records_default_to_no_compression_so_older_peers_interoperate() -> None:
    old = b'{"version": 1, "session_id": "s", "start": 0, "end": 2, "batch_size": 1, "max_length": 8}'
    assert OpenSession.from_bytes(old).compression == "none"
    assert SpanRequest.from_bytes(b'{"start": 0, "end": 2}').compression == "none"
    assert SpanRequest(start=0, end=1, compression="blockwise8").compression == "blockwise8"
    with pytest.raises(ValueError):
        SpanRequest(start=0, end=1, compression="int4")
    assert compression.Compression is not None
