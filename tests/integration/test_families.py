"""Every supported family through a swarm: greedy generation equals the local model (tokens and logits), so
do the OpenAI API's completions, and deep prompt tuning's gradients through the remote blocks equal a
local run.

Each family gets its own two servers (blocks 0:3 and 3:4), their spans loaded from the saved model as a
server loads them. Two families (`IN_PROCESSES`) run as real server processes joined to one bootstrap peer:
what only processes show (the CLI, the DHT, p2p, the zygote's imports) does not depend on the family. The
others run their servers' real handlers in this process over the loopback transport
(`tests/unit/loopback_swarm.py`): the same client, server and wire code, in about a fifth of the time.
Servers for every family at once were tried and were slower: 24 servers starting together took 3 minutes,
and then slowed every call."""

from __future__ import annotations

import pytest
import torch
from starlette.testclient import TestClient
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.api.app import create_app
from swarmllm.api.config import ApiConfig
from swarmllm.api.engine import Engine
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.launcher import LocalSwarm, ServerSpec
from swarmllm.models.source import model_display_name
from tests.integration.test_finetune import loss_and_grads, run_locally
from tests.unit.loopback_swarm import LoopbackSwarm
from tests.unit.test_span_exact import CONFIGS, _model

# The plainest family, and the one whose blocks differ most (latent attention, grouped experts, a dense first
# block): served by real processes.
IN_PROCESSES = ("llama", "deepseek_v3")
# Fixed speeds: the servers announce at once instead of each measuring itself on a loaded machine.
SPEED = ("--step-time", "0.01", "--forward-tps", "1000")


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary: token i is the word `t<i>`."""
    vocab = {f"t{i}": i for i in range(97)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t2"))
    tok.pre_tokenizer = WhitespaceSplit()
    # The end of sequence is its only special token: the API's text leaves special tokens out.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t96")


def _check_api(model, local, prompt: list[int]) -> None:
    """The OpenAI API's completions over the family's swarm give local greedy's tokens. `model` has already
    generated through the swarm: a client that has just joined may not see the servers yet, and the API
    refuses at once (503) while blocks are missing."""
    engine = Engine(model, _tokenizer(), "tiny", ApiConfig(model="tiny", max_context=64))
    try:
        with TestClient(create_app(engine)) as client:
            reply = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 6,
                                                        "temperature": 0})
    finally:
        engine.shutdown()
    assert reply.status_code == 200, reply.text
    want = local.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    stop = next((i for i, t in enumerate(want) if t in engine.eos), len(want))
    want = want[:stop]  # the API stops at an end-of-sequence token, and leaves it out of the text
    assert want, "the prompt's first greedy token is the end of sequence: nothing would be compared"
    assert [int(t[1:]) for t in reply.json()["choices"][0]["text"].split()] == want


@pytest.fixture(scope="module")
def bootstrap():
    """One bootstrap peer for every family's servers: each family's model has its own DHT keys."""
    with LocalSwarm("", []) as swarm:
        yield swarm.initial_peers


@pytest.fixture
def family_swarm(request, tmp_path, monkeypatch):
    """The family's tiny model saved by transformers, two servers serving it, and the client options that
    reach them (the bootstrap peer for processes; nothing in process, where clients join the loopback)."""
    model = _model(request.param)
    model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id = 0, 96, 1
    model.save_pretrained(tmp_path)
    if request.param in IN_PROCESSES:
        servers = [ServerSpec("0:3", SPEED), ServerSpec("3:4", SPEED)]
        bootstrap = request.getfixturevalue("bootstrap")
        with LocalSwarm(str(tmp_path), servers, initial_peers=bootstrap) as swarm:
            yield str(tmp_path), {"initial_peers": swarm.initial_peers}
        return
    swarm = LoopbackSwarm([(0, 3), (3, 4)], model_dir=tmp_path, name=model_display_name(tmp_path))
    # Every client that from_pretrained makes joins this network instead of a DHT.
    monkeypatch.setattr(SequenceManager, "join", lambda config, *args, **kwargs: swarm.join(config))
    try:
        yield str(tmp_path), {}
    finally:
        swarm.close()


FAMILIES = [pytest.param(name, marks=pytest.mark.swarm) if name in IN_PROCESSES else name for name in sorted(CONFIGS)]


@pytest.mark.parametrize("family_swarm", FAMILIES, indirect=True)
def test_generate_and_gradients_through_swarm_equal_local(family_swarm) -> None:
    path, peers = family_swarm
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(0)
    ids = torch.randint(2, 90, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    # Logits too, not only tokens: a tiny random model's argmax hides small errors (Phi-3 longrope's recomputed
    # cache past its limit changes the logits well within one token's margin).
    kwargs = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, **peers)
    try:
        got = model.generate(ids, **kwargs)
        want = local.generate(ids, **kwargs)
        assert torch.equal(got.sequences, want.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-4)
        _check_api(model, local, ids[0].tolist())
    finally:
        model.sequence_manager.shutdown()

    tuned = AutoDistributedModelForCausalLM.from_pretrained(path, **peers,
                                                            tuning_mode="deep_ptune", pre_seq_len=2)
    try:
        tuned.train()
        nn.init.normal_(tuned.tuning.deep_prompts, std=0.1)  # zeros would hide a dropped gradient path
        loss, grads = loss_and_grads(tuned, ids, mask)
        restore = run_locally(tuned, local.requires_grad_(False))
        ref_loss, ref_grads = loss_and_grads(tuned, ids, mask)
        restore()
    finally:
        tuned.sequence_manager.shutdown()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
        assert grads[name].abs().sum() > 0, f"{name} got no gradient"
