"""Fine-tuning through a real swarm of a tiny random Llama: every tuning mode's gradients equal a local run.

The local reference is the same client model with its remote segments swapped for local spans of the
full model that apply the same tuning (deep prompts, LoRA hooks): embeddings, prompt prefix and loss are
then computed by identical code, and only the remote part differs.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM, LoraSpec
from swarmllm.adapters import lora
from swarmllm.client.pipeline import Pipeline
from swarmllm.client.remote_sequential import RemoteSequential
from swarmllm.launcher import LocalSwarm, ServerSpec
from swarmllm.models.span import span_from_model

pytestmark = pytest.mark.swarm


class LocalReference(nn.Module):
    """Blocks [start, end) of a local model with the client's tuning applied, as servers would apply it."""

    def __init__(self, span, tuning):
        super().__init__()
        self.span = span
        self.__dict__["tuning"] = tuning

    def forward(self, hidden, position_ids, attention_mask=None):
        t, s = self.tuning, self.span
        prompts = t.deep_prompts[s.start : s.end] if t.deep_prompts is not None else None
        if t.lora_spec is None:
            return s(hidden, position_ids, attention_mask, prompts=prompts)
        weights = {b: w for b, w in t.lora_weights().items() if s.start <= b < s.end}
        with lora.applied(s.layers, s.start, weights, t.lora_spec.scaling):
            return s(hidden, position_ids, attention_mask, prompts=prompts)


def run_locally(model, local_model):
    """Swap every remote segment of `model` for a LocalReference; returns a function restoring it."""
    backbone = model.backbone
    original = backbone.layers
    if isinstance(original, Pipeline):
        segments = [
            LocalReference(span_from_model(local_model, s.start, s.end), model.tuning) if isinstance(s, RemoteSequential) else s
            for s in original.segments
        ]
        backbone.layers = Pipeline(segments)
    else:
        backbone.layers = LocalReference(span_from_model(local_model, 0, original.end), model.tuning)
    return lambda: setattr(backbone, "layers", original)


@pytest.fixture(scope="module")
def tiny_swarm(tiny_llama_dir):
    with LocalSwarm(str(tiny_llama_dir), [ServerSpec("0:2"), ServerSpec("2:4")]) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def tiny_local(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval().requires_grad_(False)


def batch(seed=0, n=3, seq=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    return ids, mask


def loss_and_grads(model, ids, mask):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads


def client(tiny_llama_dir, swarm, **kw):
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_llama_dir), initial_peers=swarm.initial_peers, request_timeout=30, **kw
    )


MODES = {
    "ptune": dict(tuning_mode="ptune", pre_seq_len=3),
    "deep_ptune": dict(tuning_mode="deep_ptune", pre_seq_len=2),
    "lora": dict(tuning_mode="lora", lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))),
    "lora+trainable_block": dict(tuning_mode="lora", lora=LoraSpec(rank=2), trainable_blocks=[1]),
    "deep_ptune+trainable_blocks": dict(tuning_mode="deep_ptune", pre_seq_len=2, trainable_blocks=[0, 3]),
    "trainable_blocks_only": dict(trainable_blocks=[2]),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_gradients_through_the_swarm_equal_local(mode, tiny_llama_dir, tiny_swarm, tiny_local):
    torch.manual_seed(0)
    model = client(tiny_llama_dir, tiny_swarm, **MODES[mode])
    try:
        model.train()
        if model.tuning.deep_prompts is not None:
            nn.init.normal_(model.tuning.deep_prompts, std=0.1)  # zeros would hide a dropped gradient path
        for name, p in model.tuning.lora.items():
            if name.endswith("B"):
                nn.init.normal_(p, std=0.1)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("embed" not in n and "lm_head" not in n for n in trainable)
        ids, mask = batch()
        loss, grads = loss_and_grads(model, ids, mask)
        restore = run_locally(model, tiny_local)
        ref_loss, ref_grads = loss_and_grads(model, ids, mask)
        restore()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
            assert grads[name].abs().sum() > 0, f"{name} got no gradient"
    finally:
        model.sequence_manager.shutdown()


def test_large_batches_are_split_into_chunks_with_the_same_gradients(tiny_llama_dir, tiny_swarm):
    torch.manual_seed(1)
    spec = dict(tuning_mode="lora", lora=LoraSpec(rank=2))
    whole = client(tiny_llama_dir, tiny_swarm, **spec)
    chunked = client(tiny_llama_dir, tiny_swarm, max_chunk_tokens=10, **spec)  # one row of 10 tokens per chunk
    try:
        chunked.tuning.load_state_dict(whole.tuning.state_dict())
        for p in whole.tuning.lora.values():
            nn.init.normal_(p, std=0.1)
        chunked.tuning.load_state_dict(whole.tuning.state_dict())
        ids, mask = batch(n=5)
        loss_a, grads_a = loss_and_grads(whole, ids, mask)
        loss_b, grads_b = loss_and_grads(chunked, ids, mask)
        torch.testing.assert_close(loss_a, loss_b)
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)
    finally:
        whole.sequence_manager.shutdown()
        chunked.sequence_manager.shutdown()


def test_two_clients_train_different_adapters_on_the_same_servers_in_isolation(tiny_llama_dir, tiny_swarm, tiny_local):
    models = [client(tiny_llama_dir, tiny_swarm, tuning_mode="lora", lora=LoraSpec(rank=2)) for _ in range(2)]
    try:
        for i, m in enumerate(models):
            torch.manual_seed(10 + i)
            for p in m.tuning.lora.values():
                nn.init.normal_(p, std=0.2)
        ids, mask = batch(seed=3)
        solo = []
        for m in models:
            restore = run_locally(m, tiny_local)
            solo.append(loss_and_grads(m, ids, mask))
            restore()
        results: dict[int, list] = {0: [], 1: []}
        errors = []

        def train(i):
            try:
                for _ in range(4):
                    results[i].append(loss_and_grads(models[i], ids, mask))
            except Exception as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert not torch.allclose(solo[0][0], solo[1][0])  # different adapters give different losses
        for i in range(2):
            for loss, grads in results[i]:
                torch.testing.assert_close(loss, solo[i][0], rtol=1e-5, atol=1e-6)
                for name in grads:
                    torch.testing.assert_close(grads[name], solo[i][1][name], rtol=1e-4, atol=1e-6)
    finally:
        for m in models:
            m.sequence_manager.shutdown()


def test_bad_lora_weights_get_a_clear_error_and_the_server_keeps_serving(tiny_llama_dir, tiny_swarm):
    model = client(tiny_llama_dir, tiny_swarm, tuning_mode="lora", lora=LoraSpec(rank=2))
    try:
        key = next(k for k in model.tuning.lora if k.endswith("__A"))
        good = model.tuning.lora[key]
        model.tuning.lora[key] = nn.Parameter(torch.zeros(2, good.shape[1] + 1))
        ids, mask = batch()
        with pytest.raises(Exception, match="LoRA maps 33 -> "):
            model(input_ids=ids, attention_mask=mask)
        model.tuning.lora[key] = good
        out = model(input_ids=ids, attention_mask=mask)
        assert torch.isfinite(out.logits).all()
    finally:
        model.sequence_manager.shutdown()


def test_server_killed_between_forward_and_backward_is_recomputed_elsewhere(tiny_llama_dir, tiny_local):
    # server0 holds every block, so the forward goes through it alone; the others hold halves.
    specs = [ServerSpec("0:4"), ServerSpec("0:2"), ServerSpec("2:4")]
    with LocalSwarm(str(tiny_llama_dir), specs) as swarm:
        model = client(tiny_llama_dir, swarm, tuning_mode="lora", lora=LoraSpec(rank=2), update_period=0.5)
        try:
            torch.manual_seed(5)
            for p in model.tuning.lora.values():
                nn.init.normal_(p, std=0.1)
            model.train()
            ids, mask = batch(seed=7)
            restore = run_locally(model, tiny_local)
            ref_loss, ref_grads = loss_and_grads(model, ids, mask)
            restore()

            model.zero_grad()
            out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
            os.killpg(swarm.servers["server0"].proc.pid, signal.SIGKILL)
            out.loss.backward()
            torch.testing.assert_close(out.loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
            for name, p in model.named_parameters():
                if p.requires_grad:
                    torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6)
        finally:
            model.sequence_manager.shutdown()


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune", "lora", "lora+trainable_block"])
def test_generation_with_tuning_equals_greedy_decoding_without_a_cache(mode, tiny_llama_dir, tiny_swarm):
    """Sessions apply prompts and LoRA like stateless forward does: generate() (server caches) must pick
    the same tokens as re-running the whole sequence each step."""
    torch.manual_seed(4)
    model = client(tiny_llama_dir, tiny_swarm, **MODES[mode])
    try:
        with torch.no_grad():
            if model.tuning.deep_prompts is not None:
                nn.init.normal_(model.tuning.deep_prompts, std=0.5)
            for p in model.tuning.lora.values():
                nn.init.normal_(p, std=0.3)
        ids, _ = batch(n=1, seq=6)
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        seq = ids
        with torch.no_grad():
            for _ in range(6):
                nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
        assert torch.equal(out, seq)
    finally:
        model.sequence_manager.shutdown()
