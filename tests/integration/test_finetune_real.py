"""Fine-tuning the real SmolLM2 through a 3-server swarm: gradients equal peft, the loss falls, adapters
saved by the swarm load into peft with the same outputs, and adapters and block overrides published into
the swarm are fetched and served by the servers."""

from __future__ import annotations

import shutil
import uuid

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM, LoraSpec
from swarmllm.launcher import ServerSpec, spawn

pytestmark = [pytest.mark.swarm, pytest.mark.real_model]

TEXTS = [
    "The wire cutoff at Northwind Mutual is 15:30 CET on business days.",
    "Cards can be frozen at any time in the Northwind app under Settings.",
]


@pytest.fixture(scope="module")
def lora_client(smollm2_swarm, smollm2_dir):
    torch.manual_seed(0)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers, tuning_mode="lora",
        lora=LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
    )
    for name, p in model.tuning.lora.items():
        if name.endswith("B"):
            nn.init.normal_(p, std=0.02)  # a non-trivial adapter, so outputs and gradients differ from base
    yield model
    model.sequence_manager.shutdown()


def encode(tokenizer):
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return enc.input_ids, enc.attention_mask, labels


def peft_copy(model, smollm2_dir, path, trainable=False):
    model.save_adapter(path)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    return PeftModel.from_pretrained(base, path, is_trainable=trainable).eval()


def test_lora_gradients_equal_a_local_peft_model(lora_client, smollm2_dir, smollm2_tokenizer, tmp_path):
    ids, mask, labels = encode(smollm2_tokenizer)
    reference = peft_copy(lora_client, smollm2_dir, tmp_path / "a", trainable=True)
    lora_client.zero_grad()
    loss = lora_client(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    ref_loss = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    compared = 0
    for key, p in lora_client.tuning.lora.items():
        block, path, ab = key.split("__")[0], ".".join(key.split("__")[1:-1]), key.split("__")[-1]
        ref = ref_grads[f"base_model.model.model.layers.{block}.{path}.lora_{ab}.default.weight"]
        torch.testing.assert_close(p.grad, ref, rtol=2e-3, atol=1e-6, msg=key)
        compared += 1
    assert compared == 30 * 2 * 2


def test_saved_adapter_in_peft_generates_what_the_swarm_generates(lora_client, smollm2_dir, smollm2_tokenizer, tmp_path):
    reference = peft_copy(lora_client, smollm2_dir, tmp_path / "a")
    ids = smollm2_tokenizer(["A swarm of computers"], return_tensors="pt").input_ids
    lora_client.eval()
    swarm = lora_client.generate(ids, max_new_tokens=24, do_sample=False)
    local = reference.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(swarm, local)


def test_loss_falls_over_a_few_steps(smollm2_swarm, smollm2_dir, smollm2_tokenizer):
    torch.manual_seed(1)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers, tuning_mode="lora", lora=LoraSpec(rank=8, alpha=16),
    )
    try:
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        ids, mask, labels = encode(smollm2_tokenizer)
        losses = []
        for _ in range(5):
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.8 * losses[0], losses
    finally:
        model.sequence_manager.shutdown()


def publish(swarm, folder, name):
    child = spawn(f"publish-{name}", ["adapters", "publish", str(folder), "--name", name,
                                      "--initial-peers", *swarm.initial_peers])
    child.wait_for("published:", 120)
    return child


def test_adapter_published_into_the_swarm_is_fetched_by_servers_and_used(
    lora_client, smollm2_swarm, smollm2_dir, smollm2_tokenizer, tmp_path
):
    name = f"test/lora-{uuid.uuid4().hex[:8]}"
    reference = peft_copy(lora_client, smollm2_dir, tmp_path / "a")
    publisher = publish(smollm2_swarm, tmp_path / "a", name)
    try:
        user = AutoDistributedModelForCausalLM.from_pretrained(
            str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers, adapter=name
        )
        try:
            ids = smollm2_tokenizer(["Banks use swarms because"], return_tensors="pt").input_ids
            swarm = user.generate(ids, max_new_tokens=16, do_sample=False)
            local = reference.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
            assert torch.equal(swarm, local)
        finally:
            user.sequence_manager.shutdown()
    finally:
        publisher.stop()


def test_unknown_adapter_name_gets_a_clear_error(smollm2_swarm, smollm2_dir, smollm2_tokenizer):
    user = AutoDistributedModelForCausalLM.from_pretrained(
        str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers, adapter="nobody/has-this"
    )
    try:
        ids = smollm2_tokenizer(["Hi"], return_tensors="pt").input_ids
        with pytest.raises(Exception, match="nobody/has-this"):
            user.generate(ids, max_new_tokens=2)
    finally:
        user.sequence_manager.shutdown()


def test_block_override_is_served_and_never_mixed_with_base_blocks(
    smollm2_swarm, smollm2_dir, smollm2_tokenizer, smollm2_local, tmp_path
):
    torch.manual_seed(3)
    trainer = AutoDistributedModelForCausalLM.from_pretrained(
        str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers, trainable_blocks=[28]
    )
    ids, mask, labels = encode(smollm2_tokenizer)
    name = f"test/blocks-{uuid.uuid4().hex[:8]}"
    publisher = server = None
    try:
        trainer.train()
        opt = torch.optim.SGD([p for p in trainer.parameters() if p.requires_grad], lr=5e-2)
        for _ in range(2):
            opt.zero_grad()
            trainer(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
        trainer.eval()
        trainer.save_blocks(tmp_path / "blocks")
        with torch.no_grad():
            expected = trainer(input_ids=ids, attention_mask=mask).logits
        publisher = publish(smollm2_swarm, tmp_path / "blocks", name)
        server = smollm2_swarm.add_server(f"override-{name[-8:]}", ServerSpec("20:30", ("--block-override", name)))
        user = AutoDistributedModelForCausalLM.from_pretrained(
            str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers, block_override=name
        )
        base_user = AutoDistributedModelForCausalLM.from_pretrained(
            str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers, update_period=0.1
        )
        try:
            with torch.no_grad():
                got = user(input_ids=ids, attention_mask=mask).logits
                base = base_user(input_ids=ids, attention_mask=mask).logits
                local_base = smollm2_local(input_ids=ids, attention_mask=mask).logits
            real = mask.bool()  # logits at padding positions carry no meaning
            torch.testing.assert_close(got[real], expected[real], rtol=1e-3, atol=2e-3)
            assert not torch.allclose(expected[real], local_base[real], atol=1e-2)  # the override changes outputs
            torch.testing.assert_close(base[real], local_base[real], rtol=1e-3, atol=2e-3)  # base clients never get it
            # The route of the override client goes through the override server for block 28.
            route = user.sequence_manager.make_route(0, 30)
            assert any(h.start <= 28 < h.end and h.peer_id in server_line_peer(smollm2_swarm, server) for h in route)
        finally:
            user.sequence_manager.shutdown()
            base_user.sequence_manager.shutdown()
    finally:
        trainer.sequence_manager.shutdown()
        for child in (server, publisher):
            if child is not None:
                child.stop()
        for key, child in list(smollm2_swarm.servers.items()):
            if child is server:
                del smollm2_swarm.servers[key]
        shutil.rmtree(tmp_path, ignore_errors=True)


def server_line_peer(swarm, child) -> str:
    name = next(k for k, v in swarm.servers.items() if v is child)
    return swarm.server_lines[name].split(" peer ")[1].split()[0]


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune", "trainable_blocks"])
def test_other_tuning_modes_match_local_gradients_on_smollm2(mode, smollm2_swarm, smollm2_dir, smollm2_tokenizer, smollm2_local):
    from tests.integration.test_finetune import loss_and_grads, run_locally

    smollm2_local.requires_grad_(False)  # the reference's base weights need no gradients
    options = {
        "ptune": dict(tuning_mode="ptune", pre_seq_len=4),
        "deep_ptune": dict(tuning_mode="deep_ptune", pre_seq_len=3),
        "trainable_blocks": dict(tuning_mode="ptune", pre_seq_len=2, trainable_blocks=[5, 6]),
    }[mode]
    torch.manual_seed(6)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers, **options)
    try:
        if model.tuning.deep_prompts is not None:
            nn.init.normal_(model.tuning.deep_prompts, std=0.05)
        ids, mask, _ = encode(smollm2_tokenizer)
        loss, grads = loss_and_grads(model, ids, mask)
        restore = run_locally(model, smollm2_local)
        ref_loss, ref_grads = loss_and_grads(model, ids, mask)
        restore()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=2e-3, atol=1e-5, msg=name)
    finally:
        model.sequence_manager.shutdown()
