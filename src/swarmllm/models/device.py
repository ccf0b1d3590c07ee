"""Every device and dtype decision, in one place: which device a `--device` value names, which dtype a
component computes in when none is given, and whether that device can run it.

Servers, clients and the API host all resolve their settings here, so a unit test with `device="meta"`
(or a fake CUDA inventory) covers every placement decision without a GPU.

Defaults: on CUDA, bfloat16 where the GPU supports it (compute capability 8.0 and up: A100, H100, RTX 30xx
and later) and float16 on older GPUs (V100, T4, RTX 20xx); float32 on CPU, where bfloat16 is exact-match
safe only on CPUs with native support and float16 matmuls are slow; float16 on Apple `mps`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Literal

import torch

DTypeName = Literal["float32", "float16", "bfloat16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_HELP = "auto (CUDA when present, else cpu), cpu, cuda, cuda:N, or mps"
DTYPE_HELP = "auto: bfloat16 on CUDA GPUs that support it (float16 on older ones), float32 on CPU, float16 on mps"


class DeviceError(ValueError):
    """A device or dtype this machine cannot provide; the message names what it has."""


@dataclass(frozen=True)
class Inventory:
    """What this machine offers: CUDA devices (name and whether each runs bfloat16), and mps."""

    cuda: tuple[tuple[str, bool], ...] = ()
    mps: bool = False

    @classmethod
    def probe(cls) -> Inventory:
        cuda: tuple[tuple[str, bool], ...] = ()
        if torch.cuda.is_available():
            cuda = tuple(
                (torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i) >= (8, 0))
                for i in range(torch.cuda.device_count())
            )
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        return cls(cuda=cuda, mps=mps)

    def names(self) -> list[str]:
        """The devices that exist here, as `--device` accepts them."""
        return ["cpu", *(f"cuda:{i} ({name})" for i, (name, _) in enumerate(self.cuda)), *(["mps"] if self.mps else [])]


def resolve_device(spec: str | torch.device, inventory: Inventory | None = None) -> torch.device:
    """The torch device that `spec` names on this machine. `auto` is the first GPU if any, else the CPU
    (mps is taken only when named: its kernels are not all there). `meta` is accepted for tests.

    Raises DeviceError, naming the devices that exist, for a device this machine lacks."""
    text = str(spec).strip().lower()
    if text == "meta":
        return torch.device("meta")
    inv = inventory if inventory is not None else Inventory.probe()
    if text == "auto":
        return torch.device("cuda:0") if inv.cuda else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DeviceError(f"unknown device {spec!r}: expected {DEVICE_HELP}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        if index >= len(inv.cuda):
            have = "no CUDA device" if not inv.cuda else f"{len(inv.cuda)} CUDA device(s)"
            raise DeviceError(f"device {spec!r} does not exist here ({have}); devices here: {', '.join(inv.names())}")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not inv.mps:
            raise DeviceError(f"device 'mps' is not available here; devices here: {', '.join(inv.names())}")
        return device
    raise DeviceError(f"unsupported device {spec!r}: expected {DEVICE_HELP}")


def resolve_dtype(name: str | torch.dtype, device: torch.device, inventory: Inventory | None = None) -> torch.dtype:
    """The compute dtype for `name` ("auto" or one of DTYPES, or a torch dtype) on `device`.

    Raises DeviceError for a dtype the device cannot run: bfloat16 on a GPU older than compute capability
    8.0 (it would be emulated at a fraction of the speed, or fail in some kernels); use float16 there."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise DeviceError(f"unsupported dtype {name}: expected one of {', '.join(DTYPES)}")
        dtype = name
    elif name == "auto":
        return default_dtype(device, inventory)
    elif name in DTYPES:
        dtype = DTYPES[name]
    else:
        raise DeviceError(f"unknown dtype {name!r}: expected auto or one of {', '.join(DTYPES)}")
    if device.type == "cuda" and dtype == torch.bfloat16 and not _cuda_bf16(device, inventory):
        raise DeviceError(f"{device} does not support bfloat16 (needs compute capability 8.0+); use --dtype float16")
    return dtype


def default_dtype(device: torch.device, inventory: Inventory | None = None) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if _cuda_bf16(device, inventory) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'float16' or 'bfloat16': how dtypes are named in configs, records and metrics."""
    return str(dtype).removeprefix("torch.")


def _cuda_bf16(device: torch.device, inventory: Inventory | None) -> bool:
    inv = inventory if inventory is not None else Inventory.probe()
    index = device.index or 0
    return index < len(inv.cuda) and inv.cuda[index][1]


def free_memory(device: torch.device) -> int:
    """Bytes this process could still allocate on `device`: free GPU memory (as the driver reports it,
    so other processes on the same GPU count), or available RAM on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return _available_ram()


def _available_ram() -> int:
    """MemAvailable from /proc/meminfo: what the kernel says can be allocated without swapping."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not on Linux: fall back to psutil, which hivemind already depends on

    return int(psutil.virtual_memory().available)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an accelerator running out of memory (torch.OutOfMemoryError on CUDA, a
    RuntimeError saying so on other backends)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim`), so that memory freed by dropping
    weights shows up as free memory (RSS) at once; a no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
