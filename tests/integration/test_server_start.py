"""How a server starts: it sizes itself to the machine's memory (`--num-blocks auto`, `--max-cache-bytes
auto`) and reuses its cached speed measurement on a restart; asked for a device it cannot have, or a span
that cannot fit, it stops at start with a clear error, before it joins the swarm, and nothing is left running."""

from __future__ import annotations

import subprocess

import psutil
import pytest
import torch

from swarmllm.launcher import run, spawn

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")


def _p2pd() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "p2pd"}


def _serve(model_dir, *args: str) -> subprocess.CompletedProcess:
    before = _p2pd()
    done = run(["serve", str(model_dir), *args])
    assert _p2pd() - before == set(), "a refused server left a p2p daemon behind"
    return done


@no_cuda
def test_cuda_without_a_gpu_is_refused_naming_the_devices_here(tiny_llama_dir) -> None:
    done = _serve(tiny_llama_dir, "--blocks", "0:2", "--device", "cuda:3")
    assert done.returncode == 1
    assert "device 'cuda:3' does not exist here (no CUDA device); devices here: cpu" in done.stderr


@no_cuda
def test_a_span_that_cannot_fit_is_refused_with_its_sizes(tiny_llama_dir) -> None:
    # No machine has a petabyte: with that much kept for the attention cache, no block can fit.
    done = _serve(tiny_llama_dir, "--blocks", "0:2", "--max-cache-bytes", str(2**50))
    assert done.returncode == 1
    assert "DoesNotFit: 2 blocks need 0.00 GiB" in done.stderr and "1048576.00 GiB is kept for the attention cache" in done.stderr
    done = _serve(tiny_llama_dir, "--num-blocks", "auto", "--max-cache-bytes", str(2**50))
    assert done.returncode == 1 and "not even one block fits" in done.stderr


def _start(model_dir, cache_dir) -> list[str]:
    """Start a server alone (its own one-node DHT), wait until it is ready, stop it; its log lines."""
    child = spawn("auto-server", ["serve", str(model_dir), "--num-blocks", "auto", "--max-cache-bytes", "auto",
                                  "--num-threads", "1"], env={"SWARMLLM_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"})
    try:
        child.wait_for("server ready:", 180)
    finally:
        child.stop()
    return child.log


def test_auto_sizing_takes_what_fits_and_a_restart_reuses_the_speed_measurement(tiny_llama_dir, tmp_path) -> None:
    first = _start(tiny_llama_dir, tmp_path)
    text = "".join(first)
    assert "--num-blocks auto: 4 blocks of 0.00 GiB fit" in text  # the tiny model fits whole anywhere
    assert "server ready: " in text and " blocks 0:4 " in text
    assert "(--max-cache-bytes auto)" in text and "speed for" not in text
    again = "".join(_start(tiny_llama_dir, tmp_path))
    assert f"speed for {tiny_llama_dir.name}|0:4|cpu:" in again and "taken from" in again
