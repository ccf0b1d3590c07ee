"""Server-side tuning math on tiny random models: LoRA hooks equal peft, gradients equal local autograd."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig

from swarmllm.adapters import lora
from swarmllm.models.family import family_of, root_of, stack_path
from swarmllm.models.span import span_from_model, text_config
from swarmllm.protocol import LoraRef
from swarmllm.server import compute
from swarmllm.server.lora_cache import LoraCache, NotCached
from tests.unit.test_span_exact import CONFIGS, _model

CONFIG = LlamaConfig(
    num_hidden_layers=3, vocab_size=61, hidden_size=32, intermediate_size=48, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIG).eval().requires_grad_(False)  # as servers load blocks


def random_lora(model, rank=4, targets=("q_proj", "v_proj"), seed=1) -> lora.LoraWeights:
    g = torch.Generator().manual_seed(seed)
    paths = lora.target_paths(model.model.layers[0], targets)
    weights = {}
    for b, layer in enumerate(model.model.layers):
        weights[b] = {}
        for p in paths:
            lin = layer.get_submodule(p)
            weights[b][p] = (torch.randn(rank, lin.in_features, generator=g) * 0.3,
                             torch.randn(lin.out_features, rank, generator=g) * 0.3)
    return weights


def test_lora_hooks_equal_peft_and_survive_save_and_reload(model, tmp_path):
    spec = lora.LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
    weights = random_lora(model)
    lora.save_peft(tmp_path / "a", weights, spec, "model.layers")
    model.save_pretrained(tmp_path / "base")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "a").eval()
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        expected = peft_model(ids).logits
        with lora.applied(model.model.layers, 0, weights, spec.scaling):
            got = model(ids).logits
        base = model(ids).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert not torch.allclose(base, expected)  # the adapter matters, and the hooks are gone afterwards
    spec2, weights2 = lora.load_peft(tmp_path / "a")
    assert spec2 == spec.model_copy(update={"target_modules": ("q_proj", "v_proj")})
    assert all(torch.equal(weights[b][p][i], weights2[b][p][i]) for b in weights for p in weights[b] for i in (0, 1))


# LoRA on each family's attention projections, by their names in transformers' blocks.
ATTENTION_TARGETS = {"bloom": ("query_key_value",), "falcon": ("query_key_value", "dense"),
                     "falcon_new": ("query_key_value",), "gpt_neox": ("query_key_value",), "phi3": ("qkv_proj",),
                     "phi3_longrope": ("qkv_proj",), "deepseek_v3": ("q_b_proj", "kv_b_proj")}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_familys_lora_file_loads_in_peft_and_the_hooks_equal_it(name, tmp_path):
    """The adapter file names each family's blocks where its model keeps them (BLOOM's `transformer.h`, OPT's
    `model.decoder.layers`), so peft loads it, and LoRA on the attention projections (MoE families too)
    computes what peft does."""
    model = _model(name).requires_grad_(False)
    family = family_of(text_config(model.config))
    layers = root_of(model, family).get_submodule(family.layers)
    targets = ATTENTION_TARGETS.get(name, ("q_proj", "v_proj"))
    spec = lora.LoraSpec(rank=2, alpha=4, target_modules=targets)
    g = torch.Generator().manual_seed(1)
    paths = lora.target_paths(layers[0], targets)
    weights = {b: {p: (torch.randn(2, layer.get_submodule(p).in_features, generator=g) * 0.3,
                       torch.randn(layer.get_submodule(p).out_features, 2, generator=g) * 0.3) for p in paths}
               for b, layer in enumerate(layers)}
    lora.save_peft(tmp_path / "a", weights, spec, stack_path(model, family))
    model.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation=model.config._attn_implementation)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    ids = torch.randint(1, 90, (2, 6))
    with torch.no_grad():
        expected = peft_model(ids).logits
        with lora.applied(layers, 0, weights, spec.scaling):
            got = model(ids).logits
        assert not torch.allclose(model(ids).logits, expected)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_backward_returns_gradients_of_input_prompts_and_lora(model):
    span = span_from_model(model, 1, 3)
    weights = {b: w for b, w in random_lora(model).items() if b >= 1}
    paths = list(weights[1])
    flat = lora.flatten(weights, 1, 3, paths)
    hidden = torch.randn(2, 7, 32)
    pos = torch.arange(7).expand(2, -1)
    prompts = torch.randn(2, 1, 3, 32) * 0.1
    grad_out = torch.randn(2, 7, 32)

    extras = compute.Extras(prompts, lora.unflatten(flat, [1, 2], paths), 2.0, 0.0, 0, flat)
    grads = compute.backward(span, hidden, pos, grad_out, None, extras)

    x = hidden.clone().requires_grad_(True)
    p = prompts.clone().requires_grad_(True)
    leaves = [t.clone().requires_grad_(True) for t in flat]
    with torch.enable_grad(), lora.applied(span.layers, 1, lora.unflatten(leaves, [1, 2], paths), 2.0):
        out = span(x, pos, None, prompts=p)
    expected = torch.autograd.grad(out, [x, p, *leaves], grad_out)
    assert len(grads) == 2 + len(flat)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    assert all(not t.requires_grad for t in flat)  # cached weights are left as they were
    assert all(w.grad is None and not w.requires_grad for w in span.parameters())  # base weights never train


def test_lora_dropout_masks_repeat_for_the_same_seed(model):
    span = span_from_model(model, 0, 3)
    weights = random_lora(model)
    hidden, pos = torch.randn(1, 5, 32), torch.arange(5)[None]
    run = lambda seed: compute.forward(span, hidden, pos, None, compute.Extras(None, weights, 2.0, 0.5, seed))  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_bad_lora_shapes_are_refused_with_the_layer_sizes(model):
    layer = model.model.layers[0]
    with pytest.raises(lora.LoraShapeError, match="32 -> 32"):
        lora.check_fits(layer, 0, {"self_attn.q_proj": (torch.zeros(4, 16), torch.zeros(32, 4))})
    with pytest.raises(lora.LoraShapeError, match="no module"):
        lora.check_fits(layer, 0, {"self_attn.nope": (torch.zeros(4, 32), torch.zeros(32, 4))})
    with pytest.raises(lora.LoraShapeError, match="finite"):
        lora.check_fits(layer, 0, {"self_attn.q_proj": (torch.full((4, 32), float("nan")), torch.zeros(32, 4))})


def _ref(tensors, start=0, end=2, paths=("a.x",)):
    return LoraRef(sha256=lora.content_hash(start, end, paths, 2, tensors), rank=2, alpha=4, targets=paths)


def test_lora_cache_assembles_parts_verifies_hash_and_isolates_peers():
    tensors = [torch.randn(2, 4), torch.randn(4, 2), torch.randn(2, 4), torch.randn(4, 2)]
    ref = _ref(tensors)
    cache = LoraCache(max_bytes=10_000)
    assert cache.put("alice", ref, 0, 2, (0,), tensors[:2]) is False
    assert cache.put("alice", ref, 0, 2, (1,), tensors[2:]) is True
    assert all(torch.equal(a, b) for a, b in zip(cache.get("alice", ref, 0, 2), tensors))
    assert all(torch.equal(a, b) for a, b in zip(cache.get("alice", ref, 1, 2), tensors[2:]))
    with pytest.raises(NotCached):
        cache.get("mallory", ref, 0, 2)  # another client cannot use alice's weights, even knowing the hash
    tampered = [tensors[0] + 1, *tensors[1:]]
    with pytest.raises(lora.LoraShapeError, match="sha256"):
        cache.put("bob", ref, 0, 2, (0, 1), tampered)
    with pytest.raises(NotCached):
        cache.get("bob", ref, 0, 2)


def test_lora_cache_evicts_least_recently_used_within_its_budget():
    cache = LoraCache(max_bytes=3 * 64)  # room for 3 entries of two 2x4 float tensors
    refs = []
    for i in range(4):
        ts = [torch.full((2, 4), float(i)), torch.full((4, 2), float(i))]
        refs.append(_ref(ts, 0, 1))
        cache.put("p", refs[-1], 0, 1, (0,), ts)
    assert cache.used <= cache.max_bytes
    with pytest.raises(NotCached):
        cache.get("p", refs[0], 0, 1)
    assert len(cache.get("p", refs[3], 0, 1)) == 2


def test_kept_graph_gives_the_same_gradients_as_recomputation(model):
    span = span_from_model(model, 0, 2)
    weights = {b: w for b, w in random_lora(model).items() if b < 2}
    paths = list(weights[0])
    flat = lora.flatten(weights, 0, 2, paths)
    extras = compute.Extras(torch.randn(2, 1, 2, 32) * 0.1, lora.unflatten(flat, [0, 1], paths), 2.0, 0.0, 0, flat)
    hidden, pos, grad_out = torch.randn(1, 6, 32), torch.arange(6)[None], torch.randn(1, 6, 32)
    out, graph = compute.forward_with_graph(span, hidden, pos, None, extras)
    torch.testing.assert_close(out, compute.forward(span, hidden, pos, None, extras))
    kept = compute.backward_from_graph(graph, grad_out)
    recomputed = compute.backward(span, hidden, pos, grad_out, None, extras)
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b)
    assert all(not t.requires_grad for t in flat)


def test_kept_graphs_are_bounded_per_count_and_time(monkeypatch):
    from swarmllm.server import kept_graphs

    store = kept_graphs.KeptGraphs(max_graphs=2, ttl=10)
    for i in range(3):
        store.put("p", str(i), f"graph{i}")
    assert len(store) == 2 and store.pop("p", "0") is None
    assert store.pop("q", "1") is None  # graphs belong to the peer that made them
    assert store.pop("p", "1") == "graph1" and store.pop("p", "1") is None
    now = kept_graphs.time.monotonic()
    monkeypatch.setattr(kept_graphs.time, "monotonic", lambda: now + 11)
    assert store.pop("p", "2") is None
