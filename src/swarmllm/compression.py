"""Lossy wire encodings of hidden states and gradients, chosen per request.

`encode(tensor, mode)` gives a hivemind `runtime_pb2.Tensor`; `decode(proto)` gives back a tensor of the
original dtype and shape, whatever the mode: every proto says how it was encoded, so the receiver needs no
side channel. Only float32, float16 and bfloat16 tensors are compressed; anything else (position ids,
masks, float64) always travels as "none". Encoding is deterministic: the same tensor always gives the same
bytes, so a server that compares a backward's input with the forward's (kept graphs) sees them equal.

Modes, with the error of one decoded value x' against the original x (before the final cast back to the
original dtype, which adds that dtype's own rounding):

- "none": lossless. Bytes per value: the dtype's size (bfloat16 travels as 2 bytes, not hivemind's
  legacy 4).
- "float16": |x' - x| <= 2^-11 |x| for 2^-14 <= |x| <= 65504, and <= 2^-25 below (subnormals). 2 bytes.
  A tensor with a finite value beyond float16's range (|x| > 65504, where the cast would give inf) is sent
  as "bfloat16" instead, so no finite value ever becomes inf. inf and NaN pass through as themselves.
- "bfloat16": |x' - x| <= 2^-8 |x| for normal values (|x| >= 2^-126), over float32's whole range. 2 bytes.
- "blockwise8": each row (last dimension) is cut into blocks of `BLOCK` values (the last block of a row
  may be shorter); a block stores a float32 scale s, its absmax / 127 rounded up to 17 significant bits,
  and one int8 code per value, code = round(x / s), x' = code * s. |x' - x| <= (1 + 2^-16) absmax / 254,
  absmax being that of the value's block; a block with absmax < 127 * 2^-126 (about 2e-36, where the
  scale would be a float32 subnormal) is sent as zeros. About 1 + 4 / BLOCK bytes per value. Blocks never
  span two rows, so a token's encoding does not depend on the other tokens sent with it (a prefill and the
  same tokens sent one by one decode identically). A tensor with inf or NaN is sent as "bfloat16" instead:
  one non-finite value would wipe out its block.

Every lossy mode is idempotent: decode(encode(decode(encode(x)))) equals decode(encode(x)) bit for bit
(for blockwise8 that is what the 17-bit scale buys: 127 * s and code * s are exact in float32). So a
value that crosses the wire twice, say a server's output that the client forwards to the next server
while the server also pushes it there itself, arrives identical by both paths.

Formats. "none" and "float16" use hivemind's own layouts (`CompressionType.NONE` / `FLOAT16`, `dtype` =
the original dtype), so a float32 tensor in either mode is readable by a peer that predates this module.
"bfloat16" and "blockwise8" use `CompressionType.NONE` with `dtype` = "<original>:<codec>" (such a name
makes an older peer fail loudly rather than misread the bytes); a blockwise8 buffer is a little-endian
uint32 block size, then the float32 scale of every block (row-major), then the int8 codes.

`decode` validates sizes against the header before it allocates anything, and raises `MalformedTensor`
(a ValueError) on any proto it cannot have produced.
"""

from __future__ import annotations

import logging
import math
import struct
from typing import get_args

import torch
from hivemind.proto import runtime_pb2

from swarmllm.protocol import Compression

logger = logging.getLogger(__name__)

__all__ = ["BLOCK", "MODES", "Compression", "MalformedTensor", "decode", "encode"]

MODES: tuple[Compression, ...] = get_args(Compression)

# Values per blockwise8 block. Measured on SmolLM2 (bench/compression.py, 3 hops): each halving of the block
# roughly halves the KL divergence of the next-token distribution (128: 0.0080, 64: 0.0044, 32: 0.0025,
# 16: 0.0009 nats) for 4 / BLOCK more bytes per value; 32 is the smallest block that keeps a 576-wide
# hidden state under 0.3 of its float32 bytes (0.29; 16 would take 0.32). It divides common hidden sizes.
BLOCK = 32
_MAX_BLOCK = 1 << 16
_MAX_DIMS, _MAX_NUMEL = 16, 1 << 48

_FP16_MAX = torch.finfo(torch.float16).max
_MIN_SCALE = torch.finfo(torch.float32).tiny  # 2^-126, the smallest normal float32
_COMPRESSIBLE = (torch.float32, torch.float16, torch.bfloat16)
# dtype names `decode` accepts for raw ("none") tensors, with their torch dtype.
_RAW_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool)
}
_HEADER = struct.Struct("<I")


class MalformedTensor(ValueError):
    """A serialized tensor that no encoder of this module produces: wrong sizes, dtype or codec."""


def encode(tensor: torch.Tensor, mode: Compression = "none") -> runtime_pb2.Tensor:
    """Serialize `tensor` (any device; detached here) in `mode`; see the module docstring for the bounds."""
    tensor = tensor.detach()
    if mode not in MODES:
        raise ValueError(f"unknown compression {mode!r}; expected one of {MODES}")
    if mode == "none" or tensor.dtype not in _COMPRESSIBLE:
        return _encode_raw(tensor)
    if mode == "float16":
        return _encode_float16(tensor) if _fits_float16(tensor) else _encode_bfloat16(tensor)
    if mode == "blockwise8":
        proto = _encode_blockwise8(tensor, BLOCK)
        if proto is not None:
            return proto
    return _encode_bfloat16(tensor)


def decode(proto: runtime_pb2.Tensor) -> torch.Tensor:
    """The tensor `proto` holds, in its original dtype and shape. Raises MalformedTensor on garbage."""
    shape = _shape(proto)
    numel = math.prod(shape)
    original, _, codec = proto.dtype.partition(":")
    if proto.compression == runtime_pb2.CompressionType.FLOAT16 and not codec:
        dtype = _float_dtype(original)
        return _from_bytes(proto.buffer, torch.float16, numel, shape).to(dtype)
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise MalformedTensor(f"unsupported tensor compression {proto.compression}")
    if not codec:
        return _decode_raw(proto.buffer, original, numel, shape)
    dtype = _float_dtype(original)
    if codec == "bfloat16":
        return _from_bytes(proto.buffer, torch.bfloat16, numel, shape).to(dtype)
    if codec == "blockwise8":
        return _decode_blockwise8(proto.buffer, shape, numel).to(dtype)
    raise MalformedTensor(f"unknown tensor codec {codec!r}")



# --- encoders ---


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _to_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: the same 2 bytes, reinterpreted
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def _encode_raw(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    # bfloat16 goes as its own 2 bytes: hivemind's NONE decoder tells the layout from the buffer length.
    return runtime_pb2.Tensor(buffer=_to_bytes(tensor), size=tensor.shape, dtype=_dtype_name(tensor.dtype))


def _fits_float16(tensor: torch.Tensor) -> bool:
    """No finite value beyond float16's range (inf and NaN are fine: float16 has them too)."""
    if tensor.numel() == 0 or tensor.abs().amax() <= _FP16_MAX:  # the usual case, in one pass
        return True
    finite = torch.where(torch.isfinite(tensor), tensor, 0)
    return bool(finite.abs().amax() <= _FP16_MAX)


def _encode_float16(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    return runtime_pb2.Tensor(
        compression=runtime_pb2.CompressionType.FLOAT16, buffer=_to_bytes(tensor.to(torch.float16)),
        size=tensor.shape, dtype=_dtype_name(tensor.dtype),
    )


def _encode_bfloat16(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    return runtime_pb2.Tensor(
        buffer=_to_bytes(tensor.to(torch.bfloat16)), size=tensor.shape, dtype=f"{_dtype_name(tensor.dtype)}:bfloat16"
    )


def _rows(shape: tuple[int, ...], numel: int) -> tuple[int, int]:
    """(rows, row length) of a tensor viewed as rows of its last dimension (a scalar is one row of one)."""
    width = shape[-1] if shape else 1
    return (numel // width if width else 0), width


def _encode_blockwise8(tensor: torch.Tensor, block: int) -> runtime_pb2.Tensor | None:
    """The blockwise8 proto, or None if the tensor holds inf or NaN (which would wipe out their blocks)."""
    rows, width = _rows(tuple(tensor.shape), tensor.numel())
    blocks = -(-width // block)
    x = tensor.float().reshape(rows, width)
    padded = torch.nn.functional.pad(x, (0, blocks * block - width)).view(rows, blocks, block)
    absmax = padded.abs().amax(dim=-1)  # (rows, blocks); inf or NaN if the block has one
    if not bool(torch.isfinite(absmax).all()):
        return None
    scale = _round_up_17_bits(absmax / 127)
    scale = torch.where(scale >= _MIN_SCALE, scale, 0.0)  # subnormal scales would make products inexact
    divisor = torch.where(scale > 0, scale, 1.0).unsqueeze(-1)  # an all-zero block codes as zeros
    codes = torch.round(padded / divisor).clamp_(-127, 127).to(torch.int8)
    codes = codes.view(rows, blocks * block)[:, :width]  # (rows, width): padding is not sent
    buffer = _HEADER.pack(block) + _to_bytes(scale) + _to_bytes(codes)
    return runtime_pb2.Tensor(buffer=buffer, size=tensor.shape, dtype=f"{_dtype_name(tensor.dtype)}:blockwise8")


def _round_up_17_bits(x: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 values rounded up to 17 significant bits (the low 7 mantissa bits cleared), so
    that their products with any 7-bit integer are exact in float32."""
    bits = x.contiguous().view(torch.int32)
    bits = torch.where(bits & 0x7F != 0, (bits | 0x7F) + 1, bits)  # for positive floats, int order = float order
    return bits.view(torch.float32)


# --- decoders ---


def _shape(proto: runtime_pb2.Tensor) -> tuple[int, ...]:
    shape = tuple(proto.size)
    # An empty tensor's other dimensions are not bounded by its buffer; torch refuses absurd ones anyway.
    if len(shape) > _MAX_DIMS or math.prod(d for d in shape if d) > _MAX_NUMEL:
        raise MalformedTensor(f"implausible tensor shape {shape[:8]}{'...' if len(shape) > 8 else ''}")
    return shape


def _float_dtype(name: str) -> torch.dtype:
    dtype = _RAW_DTYPES.get(name)
    if dtype not in _COMPRESSIBLE:
        raise MalformedTensor(f"a compressed tensor cannot have original dtype {name!r}")
    return dtype


def _from_bytes(buffer: bytes, dtype: torch.dtype, numel: int, shape: tuple[int, ...]) -> torch.Tensor:
    if len(buffer) != numel * dtype.itemsize:
        raise MalformedTensor(f"{len(buffer)} bytes cannot hold {numel} {_dtype_name(dtype)} values of shape {shape}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(buffer), dtype=dtype).reshape(shape)


def _decode_raw(buffer: bytes, name: str, numel: int, shape: tuple[int, ...]) -> torch.Tensor:
    dtype = _RAW_DTYPES.get(name)
    if dtype is None:
        raise MalformedTensor(f"unsupported tensor dtype {name!r}")
    if dtype == torch.bfloat16 and numel and len(buffer) == 4 * numel:
        # An older peer (hivemind's default legacy mode) sends bfloat16 widened to float32.
        return _from_bytes(buffer, torch.float32, numel, shape).to(torch.bfloat16)
    return _from_bytes(buffer, dtype, numel, shape)


def _decode_blockwise8(buffer: bytes, shape: tuple[int, ...], numel: int) -> torch.Tensor:
    if len(buffer) < _HEADER.size:
        raise MalformedTensor("blockwise8 tensor without its header")
    (block,) = _HEADER.unpack_from(buffer)
    if not 1 <= block <= _MAX_BLOCK:
        raise MalformedTensor(f"blockwise8 block size {block} is outside 1..{_MAX_BLOCK}")
    rows, width = _rows(shape, numel)
    blocks = -(-width // block)
    scales_end = _HEADER.size + 4 * rows * blocks
    if len(buffer) != scales_end + numel:
        raise MalformedTensor(f"{len(buffer)} bytes do not hold a blockwise8 tensor of shape {shape}, block {block}")
    if numel == 0:
        return torch.empty(shape)
    scale = _from_bytes(buffer[_HEADER.size : scales_end], torch.float32, rows * blocks, (rows, blocks))
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise MalformedTensor("blockwise8 scales must be finite and non-negative")
    codes = _from_bytes(buffer[scales_end:], torch.int8, numel, (rows, width))
    # Indexing, not repeat_interleave: a forged header with a huge block must not allocate rows * block.
    scale = scale[:, torch.arange(width) // block]  # (rows, width)
    return (codes.float() * scale).reshape(shape)
