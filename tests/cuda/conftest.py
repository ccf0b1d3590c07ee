"""Fixtures of the GPU tests (marked `cuda`). They are collected everywhere and skipped, saying why, where
torch sees no CUDA device; bench/gpu_check.sh runs them on a lent GPU (docs/gpu.md).

The real SmolLM2 cannot travel to the GPU machine (its GGUF alone is 94 MiB; a run carries 64 MiB in all,
see bench/gpu_wheels.sh), so these tests save a random-weight Llama of SmolLM2's exact geometry there and
compare the swarm with local transformers running the same weights on the same GPU in the same dtype.
"""

from __future__ import annotations

import gc
import math
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from swarmllm.launcher import LocalSwarm, ServerSpec

HERE = Path(__file__).parent

# SmolLM2-135M's config (30 blocks, GQA 9/3 heads, tied embeddings), as the converted GGUF has it.
SMOLLM2_GEOMETRY = dict(
    hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    num_hidden_layers=30, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)

# Servers of the session swarm: name -> (blocks, extra flags). Three bfloat16 servers form the main route
# (the swarm path with two hand-offs); one float32 server, and one int8 and one nf4 server (bitsandbytes'
# kernels on CUDA; int4 is CPU-only and refused there), each holding every block, are reached by clients
# restricted to them (`allowed_servers`).
SERVERS = {
    "bf16-a": ("0:10", ("--dtype", "bfloat16")),
    "bf16-b": ("10:20", ("--dtype", "bfloat16")),
    "bf16-c": ("20:30", ("--dtype", "bfloat16")),
    "fp32": ("0:30", ("--dtype", "float32")),
    "int8": ("0:30", ("--dtype", "bfloat16", "--quant", "int8")),
    "nf4": ("0:30", ("--dtype", "bfloat16", "--quant", "nf4")),
}


def pytest_collection_modifyitems(config, items) -> None:
    """Skip this folder's tests where there is no GPU, with the reason (hooks see every item: filter)."""
    if torch.cuda.is_available():
        return
    reason = (f"no CUDA device: torch {torch.__version__} sees none here; bench/gpu_check.sh runs these on a "
              "lent GPU (docs/gpu.md)")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def random_smollm2_dir(tmp_path_factory) -> Path:
    """A random-weight Llama of SmolLM2's geometry, saved in float32 (so each dtype rounds from one source)."""
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_GEOMETRY)
    path = tmp_path_factory.mktemp("random-smollm2")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


@dataclass(frozen=True)
class GpuSwarm:
    swarm: LocalSwarm
    peers: dict[str, str]  # server name (SERVERS) -> peer id
    weights: dict[str, tuple[int, int, float]]  # server name -> (start, end, MiB its weights hold, as it logged)


@pytest.fixture(scope="session")
def cuda_swarm(random_smollm2_dir):
    """A bootstrap peer and the servers of SERVERS on loopback, every one on cuda:0; stopped whatever happens."""
    specs = [ServerSpec(blocks, ("--device", "cuda", *extra)) for blocks, extra in SERVERS.values()]
    # bench/gpu_check.sh stops a phase past its limit with SIGTERM, which would end pytest at once and orphan
    # the servers (each in its own session, holding the GPU for the benchmark after it). As an interrupt
    # instead, pytest tears its fixtures down, and the swarm stops its servers.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with LocalSwarm(str(random_smollm2_dir), specs, threads=1) as swarm:
            # LocalSwarm names its servers server0, server1, ... in the order given.
            children = {name: f"server{i}" for i, name in enumerate(SERVERS)}
            yield GpuSwarm(
                swarm=swarm,
                peers={name: swarm.server_lines[c].split(" peer ")[1].split()[0] for name, c in children.items()},
                weights={name: _weight_mib(swarm.servers[c].log) for name, c in children.items()},
            )
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _weight_mib(log: list[str]) -> tuple[int, int, float]:
    """(start, end, MiB) from the server's line 'blocks A:B hold X MiB of weights', logged before it is ready."""
    for line in log:
        m = re.search(r"blocks (\d+):(\d+) hold ([\d.]+) MiB of weights", line)
        if m:
            return int(m[1]), int(m[2]), float(m[3])
    raise AssertionError("the server never logged the memory its weights hold:\n" + "".join(log[-20:]))


@pytest.fixture(scope="session")
def swarm_client(cuda_swarm, random_smollm2_dir):
    """`client(servers, dtype)`: a distributed model on cuda restricted to the named servers; all shut down
    at the end of the session."""
    from swarmllm import AutoDistributedModelForCausalLM

    made = []

    def client(servers: list[str], dtype: torch.dtype):
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(random_smollm2_dir), initial_peers=cuda_swarm.swarm.initial_peers, device="cuda", dtype=dtype,
            allowed_servers=[cuda_swarm.peers[name] for name in servers],
        )
        made.append(model)
        return model

    yield client
    for model in made:
        model.sequence_manager.shutdown()


@pytest.fixture(scope="session")
def local_model(random_smollm2_dir):
    """`local_model(dtype)`: the same weights in plain transformers on cuda:0 (cached per dtype)."""
    made: dict[torch.dtype, torch.nn.Module] = {}

    def get(dtype: torch.dtype) -> torch.nn.Module:
        if dtype not in made:
            made[dtype] = AutoModelForCausalLM.from_pretrained(random_smollm2_dir, dtype=dtype).to("cuda").eval()
        return made[dtype]

    return get


@pytest.fixture(scope="session")
def prompt_ids() -> torch.Tensor:
    """A fixed random prompt of 24 tokens (the model has no tokenizer): (1, 24) on cuda."""
    generator = torch.Generator().manual_seed(7)
    return torch.randint(3, SMOLLM2_GEOMETRY["vocab_size"], (1, 24), generator=generator).to("cuda")


@dataclass(frozen=True)
class Agreement:
    """How a swarm's greedy tokens compare with local transformers' greedy tokens on the same prompt.

    Equal tokens need equal kernels. Servers run attention over their padded, batched cache with an explicit
    mask (server/inference.py), where local transformers runs unmasked kernels, so in 16-bit dtypes the last
    bits may differ, and with random weights the top two logits are often within a few units in the last
    place. So beyond equality this measures whether every swarm token is local's top-1 *on the swarm's own
    prefix* up to rounding: a bug (a wrong position, a lost cache) gives gaps of the logits' own size."""

    equal: bool
    first_divergence: int | None  # index among the new tokens of the first that differs; None if equal
    top1: float  # share of the swarm's tokens that local's argmax picks given the swarm's own prefix
    worst_gap: float  # largest (local top logit - local logit of the swarm's token) over those positions
    tie: float  # gaps up to this are rounding: 8 units in the last place of the dtype at the top logit

    @property
    def explained_by_rounding(self) -> bool:
        return self.equal or self.worst_gap <= self.tie


@torch.inference_mode()
def greedy_agreement(local: torch.nn.Module, prompt: torch.Tensor, swarm_new: list[int],
                     local_new: list[int]) -> Agreement:
    """Compare `swarm_new` with `local_new`, the new tokens each side generated greedily after `prompt` (1, P)."""
    first = next((i for i, (a, b) in enumerate(zip(swarm_new, local_new)) if a != b), None)
    if first is None and len(swarm_new) != len(local_new):
        first = min(len(swarm_new), len(local_new))
    new = torch.tensor([swarm_new], device=prompt.device)  # (1, n)
    logits = local(torch.cat([prompt, new], dim=1)).logits[0, prompt.shape[1] - 1 : -1].float()  # (n, vocab)
    top = logits.max(dim=1).values  # (n,)
    gap = top - logits.gather(1, new[0, :, None])[:, 0]  # (n,) zero where the swarm token is local's top-1
    magnitude = 2.0 ** math.floor(math.log2(top.abs().max().item() or 1.0))
    return Agreement(
        equal=first is None,
        first_divergence=first,
        top1=(gap == 0).float().mean().item(),
        worst_gap=gap.max().item(),
        tie=8 * torch.finfo(local.dtype).eps * magnitude,
    )


@pytest.fixture(scope="session")
def agreement():
    """`agreement(local, prompt, swarm_new, local_new) -> Agreement` (test modules do not import conftest)."""
    return greedy_agreement


def allocated_bytes(load: Callable[[], object]) -> int:
    """Bytes that `load()`'s result holds on cuda:0, by the caching allocator's count of live tensors: all
    of them, bitsandbytes' scales included, which it keeps outside parameters and buffers."""
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(0)
    held = load()
    torch.cuda.synchronize()
    size = torch.cuda.memory_allocated(0) - before
    del held
    gc.collect()
    torch.cuda.empty_cache()
    return size


@pytest.fixture(scope="session")
def allocated():
    """`allocated(load) -> bytes` (`allocated_bytes`; test modules do not import conftest)."""
    return allocated_bytes
