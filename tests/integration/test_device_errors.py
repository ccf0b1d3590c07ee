"""A server asked for a device it cannot have, or a span that cannot fit, stops at start with a clear error,
before it joins the swarm: nothing is left running."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")


def _p2pd() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "p2pd"}


def _serve(model_dir, *args: str) -> subprocess.CompletedProcess:
    before = _p2pd()
    done = subprocess.run([sys.executable, "-m", "swarmllm.cli.main", "serve", str(model_dir), *args],
                          capture_output=True, text=True, timeout=120)
    assert _p2pd() - before == set(), "a refused server left a p2p daemon behind"
    return done


def test_cuda_without_a_gpu_is_refused_naming_the_devices_here(tiny_llama_dir) -> None:
    done = _serve(tiny_llama_dir, "--blocks", "0:2", "--device", "cuda:3")
    assert done.returncode == 1
    assert "device 'cuda:3' does not exist here (no CUDA device); devices here: cpu" in done.stderr


def test_a_span_that_cannot_fit_is_refused_with_its_sizes(tiny_llama_dir) -> None:
    # No machine has a petabyte: with that much kept for the attention cache, no block can fit.
    done = _serve(tiny_llama_dir, "--blocks", "0:2", "--max-cache-bytes", str(2**50))
    assert done.returncode == 1
    assert "DoesNotFit: 2 blocks need 0.00 GiB" in done.stderr and "1048576.00 GiB is kept for the attention cache" in done.stderr
    done = _serve(tiny_llama_dir, "--num-blocks", "auto", "--max-cache-bytes", str(2**50))
    assert done.returncode == 1 and "not even one block fits" in done.stderr
