"""shards: which files hold which tensors, on the real Llama-3.1-70B index and on a tiny sharded folder.

`tests/data/llama-3.1-70b.model.safetensors.index.json` is the real `model.safetensors.index.json` of the
hub repo meta-llama/Llama-3.1-70B (80 blocks in 30 shards, `metadata.total_size` 141107412992), found
mirrored in a public GitHub repository; it is data, not code. The index gives no per-tensor sizes, so the
byte counts here derive each tensor's shape from the model's config (below) and check that they add up
to the index's `total_size` exactly before trusting them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoModelForCausalLM

from swarmllm.models.shards import (
    INDEX_NAME,
    MissingShardError,
    block_key_filter,
    block_of,
    block_weight_bytes,
    client_key_filter,
    read_index,
    shards_for,
)
from swarmllm.models.source import hub_allow_patterns
from swarmllm.models.span import load_span

LLAMA_70B_INDEX = Path(__file__).parents[1] / "data" / "llama-3.1-70b.model.safetensors.index.json"
GB = 1e9


@pytest.fixture(scope="module")
def llama70b() -> dict:
    return json.loads(LLAMA_70B_INDEX.read_text())


def _llama70b_bytes(key: str) -> int:
    """Bytes of one Llama-3.1-70B tensor in bf16, from its config.json: hidden 8192, MLP 28672, 64 query
    and 8 key/value heads of 128, vocabulary 128256."""
    hidden, mlp, kv, vocab = 8192, 28672, 8 * 128, 128256
    numel = {
        "embed_tokens": vocab * hidden, "lm_head": vocab * hidden,
        "norm": hidden, "input_layernorm": hidden, "post_attention_layernorm": hidden,
        "q_proj": hidden * hidden, "o_proj": hidden * hidden, "k_proj": kv * hidden, "v_proj": kv * hidden,
        "gate_proj": mlp * hidden, "up_proj": mlp * hidden, "down_proj": mlp * hidden,
    }[key.split(".")[-2]]  # the module's name: "model.layers.3.mlp.up_proj.weight" -> "up_proj"
    return 2 * numel


def _shard_bytes(weight_map: dict[str, str], shards: list[str]) -> int:
    return sum(_llama70b_bytes(key) for key, shard in weight_map.items() if shard in shards)


def test_block_of_and_the_filters_on_key_layouts() -> None:
    assert block_of("model.layers.12.mlp.up_proj.weight") == 12
    assert block_of("model.language_model.layers.3.self_attn.q_proj.weight") == 3  # gemma3, transformers 5
    assert block_of("model.embed_tokens.weight") is None
    assert block_of("lm_head.weight") is None
    in_span = block_key_filter(10, 20)
    assert in_span("model.layers.10.input_layernorm.weight") and in_span("model.layers.19.mlp.down_proj.weight")
    assert not in_span("model.layers.9.mlp.down_proj.weight") and not in_span("model.layers.20.mlp.up_proj.weight")
    assert not in_span("model.layers.1.mlp.up_proj.weight")  # "1" is not "10": indices compare as numbers
    assert not in_span("model.norm.weight")
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.rotary_emb.inv_freq"):
        assert client_key_filter(key)
    assert not client_key_filter("model.layers.0.self_attn.q_proj.weight")
    # Documented: a multimodal vision tower's `encoder.layers.N` counts as block N (as load_span reads it);
    # the rest of the tower and the projector go to the client.
    assert block_of("model.vision_tower.vision_model.encoder.layers.4.mlp.fc1.weight") == 4
    assert client_key_filter("model.multi_modal_projector.mm_input_projection_weight")


def test_shards_for_is_sorted_and_deduplicated() -> None:
    weight_map = {"a": "s-2", "b": "s-1", "c": "s-2", "d": "s-3"}
    assert shards_for(weight_map, lambda key: key in "abc") == ["s-1", "s-2"]
    assert shards_for(weight_map, lambda key: False) == []


def test_the_real_70b_index_adds_up(llama70b: dict) -> None:
    weight_map = llama70b["weight_map"]
    assert len(weight_map) == 80 * 9 + 3
    assert len(set(weight_map.values())) == 30
    assert sum(map(_llama70b_bytes, weight_map)) == llama70b["metadata"]["total_size"] == 141_107_412_992


def test_a_server_of_blocks_10_to_20_of_llama_70b_needs_4_of_30_shards(llama70b: dict) -> None:
    weight_map = llama70b["weight_map"]
    # Independently of block_of: split the key text, "model.layers.<N>.<rest>".
    expected = sorted({
        shard for key, shard in weight_map.items()
        if key.startswith("model.layers.") and 10 <= int(key.split(".")[2]) < 20
    })
    shards = shards_for(weight_map, block_key_filter(10, 20))
    assert shards == expected == [f"model-{i:05d}-of-00030.safetensors" for i in (5, 6, 7, 8)]
    # 19.0 GB of 141.1 (13.5%); the 10 blocks alone are 17.1 GB, whole shards add the rest.
    assert _shard_bytes(weight_map, shards) == 18_992_168_960
    assert sum(_llama70b_bytes(key) for key in weight_map if block_key_filter(10, 20)(key)) == 17_113_088_000


def test_every_10_block_span_of_llama_70b_needs_4_or_5_shards(llama70b: dict) -> None:
    weight_map = llama70b["weight_map"]
    spans = [shards_for(weight_map, block_key_filter(s, s + 10)) for s in range(0, 71)]
    assert {len(shards) for shards in spans} == {4, 5}
    assert max(_shard_bytes(weight_map, shards) for shards in spans) < 24.1 * GB  # of 141.1


def test_the_llama_70b_client_needs_only_the_embedding_norm_and_head_shards(llama70b: dict) -> None:
    weight_map = llama70b["weight_map"]
    shards = shards_for(weight_map, client_key_filter)
    ends = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    assert shards == sorted({weight_map[key] for key in ends})
    assert shards == [f"model-{i:05d}-of-00030.safetensors" for i in (1, 29, 30)]
    # Embeddings, norm and head are 4.2 GB of the 141.1; their shards, which hold blocks too, 11.7 GB.
    assert _shard_bytes(weight_map, shards) == 11_651_923_968


def test_hub_allow_patterns_select_metadata_and_exactly_the_needed_shards(llama70b: dict) -> None:
    weight_map = llama70b["weight_map"]
    metadata = ["config.json", "generation_config.json", INDEX_NAME, "special_tokens_map.json", "tokenizer.json",
                "tokenizer_config.json", "LICENSE", "README.md", "original/params.json", "original/tokenizer.model"]
    repo_files = [*metadata, *sorted(set(weight_map.values())), "original/consolidated.00.pth"]
    patterns = hub_allow_patterns(weight_map, block_key_filter(10, 20))
    # The hub's own matcher, as snapshot_download applies allow_patterns.
    fetched = set(filter_repo_objects(repo_files, allow_patterns=patterns))
    wanted_metadata = set(metadata) - {"LICENSE", "README.md"}
    assert fetched == wanted_metadata | {f"model-{i:05d}-of-00030.safetensors" for i in (5, 6, 7, 8)}
    assert set(filter_repo_objects(repo_files, allow_patterns=hub_allow_patterns(weight_map, lambda k: False))) == (
        wanted_metadata
    )


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 4-block tiny Llama saved in shards of at most 20 KB: 12 files, each block over about three."""
    path = tmp_path_factory.mktemp("sharded-llama")
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(path, max_shard_size="20KB")
    return path


def _partial_copy(full: Path, dest: Path, shards: list[str]) -> Path:
    """`full` with only `shards` of its weights, as a hub snapshot after a partial download."""
    dest.mkdir()
    for path in full.iterdir():
        if path.suffix != ".safetensors" or path.name in shards:
            shutil.copy(path, dest / path.name)
    return dest


def test_a_span_loads_from_a_folder_holding_only_its_shards(sharded_llama: Path, tmp_path: Path) -> None:
    weight_map = read_index(sharded_llama)
    assert weight_map is not None and len(set(weight_map.values())) > 8
    shards = shards_for(weight_map, block_key_filter(1, 3))
    assert len(shards) < len(set(weight_map.values()))
    partial = _partial_copy(sharded_llama, tmp_path / "partial", shards)

    got, want = load_span(partial, 1, 3).state_dict(), load_span(sharded_llama, 1, 3).state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)

    absent = sorted(set(shards_for(weight_map, block_key_filter(3, 4))) - set(shards))
    assert absent
    with pytest.raises(MissingShardError, match=absent[0]):
        load_span(partial, 3, 4)


def test_block_weight_bytes_reports_only_blocks_whose_shards_are_all_present(
    sharded_llama: Path, tmp_path: Path
) -> None:
    weight_map = read_index(sharded_llama)
    assert weight_map is not None
    shards = shards_for(weight_map, block_key_filter(1, 3))
    partial = _partial_copy(sharded_llama, tmp_path / "partial", shards)
    whole = block_weight_bytes(sharded_llama)
    assert sorted(whole) == [0, 1, 2, 3]
    complete = [b for b in range(4) if set(shards_for(weight_map, block_key_filter(b, b + 1))) <= set(shards)]
    assert complete == [1, 2]  # the shards of blocks 1 and 2 also hold a part of block 0 or 3
    assert block_weight_bytes(partial) == {b: whole[b] for b in complete}
