"""Every device and dtype decision (swarmllm.models.device), driven with fake GPU inventories and the meta device."""

from __future__ import annotations

import pytest
import torch

from swarmllm.models.device import (
    DeviceError,
    Inventory,
    default_dtype,
    dtype_name,
    free_memory,
    is_out_of_memory,
    resolve_device,
    resolve_dtype,
)

NO_GPU = Inventory()
TWO_GPUS = Inventory(cuda=(("NVIDIA H100", True), ("Tesla V100", False)))


def test_auto_picks_the_first_gpu_when_there_is_one_else_the_cpu():
    assert resolve_device("auto", TWO_GPUS) == torch.device("cuda:0")
    assert resolve_device("auto", NO_GPU) == torch.device("cpu")
    assert resolve_device("auto", Inventory(mps=True)) == torch.device("cpu")  # mps only when named


def test_named_devices_resolve_to_themselves():
    assert resolve_device("cpu", TWO_GPUS) == torch.device("cpu")
    assert resolve_device("cuda", TWO_GPUS) == torch.device("cuda:0")
    assert resolve_device("CUDA:1", TWO_GPUS) == torch.device("cuda:1")
    assert resolve_device("mps", Inventory(mps=True)) == torch.device("mps")
    assert resolve_device("meta", NO_GPU) == torch.device("meta")


def test_a_missing_device_is_refused_naming_the_devices_that_exist():
    with pytest.raises(DeviceError, match=r"'cuda' does not exist here \(no CUDA device\); devices here: cpu"):
        resolve_device("cuda", NO_GPU)
    with pytest.raises(DeviceError, match=r"'cuda:3' does not exist.*2 CUDA device.*cuda:0 \(NVIDIA H100\), cuda:1 \(Tesla V100\)"):
        resolve_device("cuda:3", TWO_GPUS)
    with pytest.raises(DeviceError, match="'mps' is not available"):
        resolve_device("mps", NO_GPU)
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        resolve_device("gpu", TWO_GPUS)


def test_default_dtype_follows_the_device():
    assert default_dtype(torch.device("cpu"), TWO_GPUS) == torch.float32
    assert default_dtype(torch.device("cuda:0"), TWO_GPUS) == torch.bfloat16  # compute capability 8.0+
    assert default_dtype(torch.device("cuda:1"), TWO_GPUS) == torch.float16  # older GPU: no native bfloat16
    assert default_dtype(torch.device("mps"), TWO_GPUS) == torch.float16
    assert resolve_dtype("auto", torch.device("cuda:1"), TWO_GPUS) == torch.float16


def test_explicit_dtypes_and_what_a_device_cannot_run():
    cpu = torch.device("cpu")
    assert resolve_dtype("float16", cpu, NO_GPU) == torch.float16
    assert resolve_dtype(torch.bfloat16, cpu, NO_GPU) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cuda:0"), TWO_GPUS) == torch.bfloat16
    with pytest.raises(DeviceError, match="cuda:1 does not support bfloat16.*--dtype float16"):
        resolve_dtype("bfloat16", torch.device("cuda:1"), TWO_GPUS)
    with pytest.raises(DeviceError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", cpu, NO_GPU)
    with pytest.raises(DeviceError, match="unsupported dtype"):
        resolve_dtype(torch.float64, cpu, NO_GPU)
    assert [dtype_name(d) for d in (torch.float32, torch.float16, torch.bfloat16)] == ["float32", "float16", "bfloat16"]


def test_free_memory_on_the_cpu_is_the_available_ram():
    free = free_memory(torch.device("cpu"))
    assert 0 < free < 2**50


def test_out_of_memory_is_recognised_on_every_backend():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
