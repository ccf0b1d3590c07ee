"""What only a GPU host shows about device choice: `auto` takes the GPU and its best dtype; a server asked for
a GPU that does not exist, or for a quantization CUDA does not run (int4), stops at once, saying what would
work, and leaves no process behind."""

from __future__ import annotations

import os

import pytest
import torch

from swarmllm.launcher import spawn
from swarmllm.models.device import default_dtype, resolve_device

pytestmark = pytest.mark.cuda


def test_auto_is_the_gpu_with_its_best_dtype() -> None:
    device = resolve_device("auto")
    assert device == torch.device("cuda:0")
    # bfloat16 from compute capability 8.0 on (an H200 is 9.0); float16 below.
    want = torch.bfloat16 if torch.cuda.get_device_capability(0) >= (8, 0) else torch.float16
    assert default_dtype(device) == want


def test_a_missing_gpu_stops_the_server_naming_the_devices(random_smollm2_dir) -> None:
    missing = f"cuda:{torch.cuda.device_count() + 6}"  # cuda:7 on a one-GPU host
    child = spawn("bad-device", ["serve", str(random_smollm2_dir), "--blocks", "0:1", "--device", missing])
    try:
        line = child.wait_for("error:", 120)
        assert child.proc.wait(60) == 1
    finally:
        child.stop()
    assert f"'{missing}' does not exist here" in line, line
    assert f"cuda:0 ({torch.cuda.get_device_name(0)})" in line, line
    # The server runs in its own process group (with its libp2p daemon, had it started one): none is left.
    with pytest.raises(ProcessLookupError):
        os.killpg(child.proc.pid, 0)


def test_int4_on_cuda_stops_the_server_naming_int8_and_nf4(random_smollm2_dir) -> None:
    child = spawn("int4-on-cuda", ["serve", str(random_smollm2_dir), "--blocks", "0:1", "--device", "cuda",
                                   "--quant", "int4"])
    try:
        line = child.wait_for("error:", 120)
        assert child.proc.wait(60) == 1
    finally:
        child.stop()
    # Refused before anything loads (swarmllm.models.quant.check_supported), with the modes that run here.
    assert "--quant int4 runs on CPUs only" in line, line
    assert "--quant int8 or nf4" in line, line
    with pytest.raises(ProcessLookupError):
        os.killpg(child.proc.pid, 0)
