"""Code written for transformers and Petals runs unchanged through the swarm (issue 16), on the real SmolLM2:
generate with no input_ids or with inputs_embeds, `generate(session=...)`, steps and blocks called with
the hidden states alone, a step of no tokens, `torch_dtype`, the backbone alone (AutoDistributedModel) and
a prompt-tuned classifier. Each result equals local transformers."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from swarmllm import (
    AutoDistributedModel,
    AutoDistributedModelForCausalLM,
    AutoDistributedModelForSequenceClassification,
    AutoDistributedSpeculativeModel,
)
from swarmllm.models.span import span_from_model
from tests.counters import CountForwards

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_torch_thread")]

GREEDY = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6)


def _ids(tokenizer, text: str = "The capital of France is") -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


def test_generate_without_input_ids_starts_from_bos_as_local(smollm2_client, smollm2_local) -> None:
    assert smollm2_client.generation_config.bos_token_id is not None
    assert torch.equal(smollm2_client.generate(**GREEDY), smollm2_local.generate(**GREEDY))


def test_generate_from_inputs_embeds_equals_local_and_its_session_continues(smollm2_client, smollm2_local,
                                                                          smollm2_tokenizer) -> None:
    ids = _ids(smollm2_tokenizer)
    embeds = smollm2_local.get_input_embeddings()(ids).detach()
    want = smollm2_local.generate(inputs_embeds=embeds, **GREEDY)
    assert torch.equal(smollm2_client.generate(inputs_embeds=embeds, **GREEDY), want)

    more = _ids(smollm2_tokenizer, " and the capital of Spain is")
    with smollm2_client.inference_session(max_length=64) as session:
        first = smollm2_client.generate(inputs_embeds=embeds, **GREEDY)
        assert torch.equal(first, want)
        assert session.position == embeds.shape[1] + first.shape[1] - 1  # the last token is not fed yet
        second = smollm2_client.generate(more, **GREEDY)
    # Locally: one embedded prompt holding everything the session has seen, then the new tokens.
    seen = torch.cat([embeds, smollm2_local.get_input_embeddings()(torch.cat([first, more], 1)).detach()], 1)
    assert torch.equal(second[:, -6:], smollm2_local.generate(inputs_embeds=seen, **GREEDY))


def test_generate_with_session_continues_it(smollm2_client, smollm2_local, smollm2_tokenizer) -> None:
    """Petals' `generate(..., session=sess)`: the second call picks up where the first ended."""
    ids = _ids(smollm2_tokenizer)
    with smollm2_client.inference_session(max_length=32) as session:
        smollm2_client.generate(ids, session=session, max_new_tokens=3, do_sample=False)
        out = smollm2_client.generate(None, session=session, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, smollm2_local.generate(ids, max_new_tokens=6, do_sample=False))


def test_steps_and_blocks_take_the_hidden_states_alone(smollm2_client, smollm2_local, smollm2_tokenizer) -> None:
    """Without position ids, positions follow the session's position (or start at 0), as in Petals and
    nn.Sequential; a step of no tokens is a no-op, not an error that ends the session."""
    ids = _ids(smollm2_tokenizer)
    hidden = smollm2_local.get_input_embeddings()(ids).detach()
    blocks = smollm2_client.backbone.layers
    with torch.no_grad():
        stateless = blocks(hidden)
        torch.testing.assert_close(stateless, blocks(hidden, torch.arange(ids.shape[1])[None]), rtol=0, atol=0)
        with blocks.inference_session(max_length=16) as session:
            empty = session.step(hidden[:, :0])
            assert empty.shape == (1, 0, hidden.shape[2]) and session.position == 0
            a = session.step(hidden[:, :3])
            b = session.step(hidden[:, 3:])
            assert session.position == ids.shape[1]
    # Two steps and one pass add in other orders: last-bit differences, as in test_real_model's logits.
    torch.testing.assert_close(torch.cat([a, b], 1), stateless, rtol=1e-4, atol=5e-4)


def test_blocks_and_steps_take_per_call_deep_prompts(smollm2_swarm, smollm2_dir, smollm2_local,
                                                    smollm2_tokenizer) -> None:
    """Petals' `blocks(x, prompts=...)` and `session.step(x, prompts=...)`: deep prompts, one per row here,
    added to the first positions before each block, with gradients as locally. One row per request
    (max_chunk_tokens), so each request carries its own row's prompts."""
    ids = _ids(smollm2_tokenizer).expand(2, -1)
    hidden = smollm2_local.get_input_embeddings()(ids).detach()
    torch.manual_seed(0)
    prompts = (0.1 * torch.randn(30, 2, 2, hidden.shape[2])).requires_grad_(True)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers,
                                                            max_chunk_tokens=ids.shape[1])
    try:
        blocks = model.backbone.layers
        out = blocks(hidden, prompts=prompts)
        (grad,) = torch.autograd.grad(out.square().mean(), [prompts])
        with torch.no_grad(), blocks.inference_session(max_length=16) as session:
            with pytest.raises(ValueError, match="prompts must be"):
                session.step(hidden[:, :1], prompts=prompts[:, :, :2])  # a prefix longer than the step
            a = session.step(hidden[:, :3], prompts=prompts.detach())
            with pytest.raises(ValueError, match="first step"):
                session.step(hidden[:, 3:4], prompts=prompts.detach())
            b = session.step(hidden[:, 3:])
        with pytest.raises(ValueError, match="prompts must be"):
            blocks[:10](hidden, prompts=prompts)
    finally:
        model.sequence_manager.shutdown()
    span = span_from_model(smollm2_local, 0, 30)
    want = span(hidden, torch.arange(ids.shape[1]).expand(2, -1), prompts=prompts)
    (want_grad,) = torch.autograd.grad(want.square().mean(), [prompts])
    assert not torch.allclose(want[0], want[1], atol=1e-3)  # each row got its own prompts
    torch.testing.assert_close(out, want, rtol=1e-4, atol=5e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(torch.cat([a, b], 1), want.detach(), rtol=1e-4, atol=5e-4)


def test_torch_dtype_is_dtypes_older_name(smollm2_swarm, smollm2_dir) -> None:
    model = AutoDistributedModelForCausalLM.from_pretrained(str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers,
                                                            torch_dtype=torch.bfloat16)
    try:
        assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    finally:
        model.sequence_manager.shutdown()
    with pytest.raises(ValueError, match="disagree"):
        AutoDistributedModelForCausalLM.from_pretrained(str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers,
                                                        dtype=torch.float32, torch_dtype=torch.bfloat16)


def test_auto_distributed_model_returns_the_backbones_hidden_states(smollm2_swarm, smollm2_dir, smollm2_local,
                                                                   smollm2_tokenizer) -> None:
    ids = _ids(smollm2_tokenizer)
    model = AutoDistributedModel.from_pretrained(str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers)
    try:
        with torch.no_grad():
            want = smollm2_local.model(ids).last_hidden_state
            torch.testing.assert_close(model(ids).last_hidden_state, want, rtol=1e-4, atol=1e-4)
            with model.inference_session(max_length=16):  # Petals' DistributedModel: calls continue the session
                parts = [model(ids[:, :3]).last_hidden_state, model(ids[:, 3:]).last_hidden_state]
    finally:
        model.sequence_manager.shutdown()
    torch.testing.assert_close(torch.cat(parts, 1), want, rtol=1e-4, atol=1e-4)


def test_a_prompt_tuned_classifier_trains_its_prompts_and_head(smollm2_swarm, smollm2_dir, smollm2_tokenizer) -> None:
    """Petals fine-tunes classifiers with prompt tuning through the swarm: the head is new, so it trains too."""
    local = AutoModelForSequenceClassification.from_pretrained(smollm2_dir).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(local.score.weight, std=0.02)  # the checkpoint has no head: its memory is left as found
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers, tuning_mode="ptune", pre_seq_len=2)
    try:
        model.score.weight.data.copy_(local.score.weight)
        ids = _ids(smollm2_tokenizer)
        with torch.no_grad():  # locally: the same prompts before the tokens' embeddings
            embeds = torch.cat([model.tuning.prompts, local.get_input_embeddings()(ids)], 1)
            want = local(inputs_embeds=embeds).logits
        model.train()
        logits = model(ids).logits
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
        torch.nn.functional.cross_entropy(logits, torch.tensor([1])).backward()
    finally:
        model.sequence_manager.shutdown()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"score.weight", "tuning.prompts"}
    assert model.score.weight.grad.abs().sum() > 0 and model.tuning.prompts.grad.abs().sum() > 0


@pytest.mark.parametrize("beams, returned", [(2, 2), (4, 2), (8, 3)])
def test_beam_search_equals_local(smollm2_client, smollm2_local, smollm2_tokenizer, beams, returned) -> None:
    """Every server reorders its cache rows as the beams are reordered (the prompt that diverged at the 8th
    token and then repeated "role" before servers could)."""
    ids = _ids(smollm2_tokenizer, "The history of the city begins")
    kwargs = dict(num_beams=beams, num_return_sequences=returned, max_new_tokens=20, do_sample=False,
                  output_scores=True, return_dict_in_generate=True)
    got, want = smollm2_client.generate(ids, **kwargs), smollm2_local.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=0, atol=1e-4)


def test_a_rewound_session_continues_from_the_kept_tokens(smollm2_client, smollm2_local, smollm2_tokenizer) -> None:
    """`session.position = n` (Petals' cache invalidation): the servers drop what follows n as the next step
    begins, and the session's outputs are those of a session that never held the dropped tokens."""
    ids = _ids(smollm2_tokenizer)
    other = _ids(smollm2_tokenizer, "A quite different continuation")
    hidden = smollm2_local.get_input_embeddings()(ids).detach()
    detour = smollm2_local.get_input_embeddings()(other).detach()
    blocks = smollm2_client.backbone.layers
    with torch.no_grad():
        want = blocks(hidden)
        with blocks.inference_session(max_length=32) as session:
            session.step(hidden[:, :3])
            session.step(detour)  # tokens that are then taken back
            session.position = 3
            got = session.step(hidden[:, 3:])
            assert session.position == ids.shape[1]
    torch.testing.assert_close(got, want[:, 3:], rtol=1e-4, atol=1e-4)


def test_prompt_lookup_decoding_equals_plain_greedy(smollm2_client, smollm2_tokenizer) -> None:
    """transformers' own assisted generation, which rewinds the cache past rejected draft tokens."""
    ids = _ids(smollm2_tokenizer, "one two three four five one two three four five one two")
    plain = smollm2_client.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(smollm2_client.generate(ids, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3), plain)
    stats = smollm2_client.generation_stats
    assert stats.new_tokens == 12 and stats.drafted > 0 and stats.steps < 12  # drafts were accepted: fewer steps


def _assistant(local) -> torch.nn.Module:
    """A smaller model with the same tokenizer: SmolLM2's first 24 blocks under its head. Its drafts are
    sometimes right (accepted) and sometimes wrong (rewound); with 18 blocks or fewer none is accepted."""
    small = copy.deepcopy(local)
    small.model.layers = small.model.layers[:24]
    small.config.num_hidden_layers = 24
    small.config.layer_types = small.config.layer_types[:24] if getattr(small.config, "layer_types", None) else None
    return small


def test_assisted_generation_equals_local_and_reports_its_drafts(smollm2_client, smollm2_local, smollm2_tokenizer,
                                                                 caplog) -> None:
    """transformers' assisted generation with a small local assistant: greedy equals plain greedy, the
    steps through the swarm are the local main model's forward calls, and the stats are logged."""
    ids = _ids(smollm2_tokenizer, "The history of the city begins")
    assistant = _assistant(smollm2_local)
    plain = smollm2_local.generate(ids, max_new_tokens=16, do_sample=False)
    counter = CountForwards(smollm2_local)
    try:
        local = smollm2_local.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=assistant)
    finally:
        counter.handle.remove()
    with caplog.at_level(logging.INFO, logger="swarmllm.client.model"):
        got = smollm2_client.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=assistant)
    assert torch.equal(got, plain) and torch.equal(local, plain)
    stats = smollm2_client.generation_stats
    assert stats.new_tokens == 16 and stats.steps == counter.calls
    assert 0 < stats.accepted < stats.drafted  # some drafts accepted, some rejected (rewound)
    assert f"draft tokens accepted ({stats.acceptance_rate:.0%})" in caplog.text


def test_assisted_sampling_equals_local_with_the_same_seed(smollm2_client, smollm2_local, smollm2_tokenizer) -> None:
    ids = _ids(smollm2_tokenizer, "The history of the city begins")
    assistant = _assistant(smollm2_local)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=20, assistant_model=assistant)
    torch.manual_seed(5)
    want = smollm2_local.generate(ids, **kwargs)
    torch.manual_seed(5)
    got = smollm2_client.generate(ids, **kwargs)
    assert torch.equal(got, want)


def test_speculative_model_drafts_with_its_small_model(smollm2_swarm, smollm2_dir, smollm2_local,
                                                       smollm2_tokenizer) -> None:
    """Petals' AutoDistributedSpeculativeModel: the same generation, drafted by `small_model`."""
    ids = _ids(smollm2_tokenizer, "The history of the city begins")
    model = AutoDistributedSpeculativeModel.from_pretrained(str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers,
                                                            small_model=_assistant(smollm2_local))
    try:
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
    finally:
        model.sequence_manager.shutdown()
    assert torch.equal(got, smollm2_local.generate(ids, max_new_tokens=8, do_sample=False))
    assert model.generation_stats.drafted > 0
