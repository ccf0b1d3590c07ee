"""resolve_model(name, tensors=...): a hub download of only the shards a peer needs.

No network. `FakeHub` replaces `huggingface_hub.snapshot_download` for one purpose: recording the
`allow_patterns` of each call, so the tests can assert the call sequence (metadata first, then exactly the
needed shards). To let the code under test go on, it copies the files those patterns match (by the hub's own
matcher) from a local folder into a snapshot folder. The tests assert nothing about the hub's behaviour
(which files it reuses, how it caches): only our calls and the folder we build from the snapshot.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoConfig, AutoModelForCausalLM

from swarmllm.models import source
from swarmllm.models.shards import (
    INDEX_NAME,
    block_key_filter,
    client_key_filter,
    read_index,
    shards_for,
)
from swarmllm.models.source import ModelNotFoundError, hub_allow_patterns, resolve_model
from swarmllm.models.span import load_span

METADATA = ["*.json", "tokenizer*", "*.model", "*.jinja", "*.txt"]


class FakeHub:
    """Records each call's allow_patterns and copies the matching files of `remote` into `snapshot`."""

    def __init__(self, remote: Path, snapshot: Path):
        self.remote, self.snapshot, self.calls = remote, snapshot, []
        snapshot.mkdir(parents=True)

    def __call__(self, repo_id: str, *, allow_patterns: list[str], cache_dir: Path | None) -> str:
        self.calls.append(list(allow_patterns))
        names = sorted(path.name for path in self.remote.iterdir())
        for name in filter_repo_objects(names, allow_patterns=allow_patterns):
            if not (self.snapshot / name).exists():
                shutil.copy(self.remote / name, self.snapshot / name)
        return str(self.snapshot)


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 4-block tiny Llama in shards of at most 20 KB (12 files), as a sharded hub repo holds it."""
    path = tmp_path_factory.mktemp("sharded-llama")
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(path, max_shard_size="20KB")
    return path


@pytest.fixture
def hub(sharded_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub(sharded_llama, tmp_path / "hub" / "snapshot")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def _weight_map(folder: Path) -> dict[str, str]:
    weight_map = read_index(folder)
    assert weight_map is not None
    return weight_map


def test_metadata_first_then_exactly_the_span_shards(hub: FakeHub, sharded_llama: Path, tmp_path: Path) -> None:
    folder = resolve_model("org/tiny", cache_dir=tmp_path / "cache", progress=False, tensors=block_key_filter(1, 3))
    shards = shards_for(_weight_map(sharded_llama), block_key_filter(1, 3))
    assert hub.calls == [METADATA, [*METADATA, *shards]]
    assert hub.calls[1] == hub_allow_patterns(_weight_map(sharded_llama), block_key_filter(1, 3))
    assert sorted(path.name for path in folder.glob("*.safetensors")) == shards
    assert sorted(set(_weight_map(folder).values())) == shards
    got, want = load_span(folder, 1, 3).state_dict(), load_span(sharded_llama, 1, 3).state_dict()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_metadata_only_then_a_span_with_a_second_call(hub: FakeHub, sharded_llama: Path, tmp_path: Path) -> None:
    """How a server resolves: metadata to read the config and choose a span, then the span's shards."""
    meta = resolve_model("org/tiny", cache_dir=tmp_path / "cache", progress=False, tensors=lambda key: False)
    assert hub.calls == [METADATA, METADATA]
    assert not list(meta.glob("*.safetensors")) and _weight_map(meta) == {}
    assert AutoConfig.from_pretrained(meta).num_hidden_layers == 4

    span = resolve_model("org/tiny", cache_dir=tmp_path / "cache", progress=False, tensors=block_key_filter(3, 4))
    assert hub.calls[2:] == [METADATA, [*METADATA, *shards_for(_weight_map(sharded_llama), block_key_filter(3, 4))]]
    assert load_span(span, 3, 4).end == 4


def test_tensors_none_or_all_fetch_everything_in_one_folder(hub: FakeHub, tmp_path: Path) -> None:
    folder = resolve_model("org/tiny", cache_dir=tmp_path / "cache", progress=False)
    assert hub.calls == [[*METADATA, "*.safetensors"]] and folder == hub.snapshot
    # Selecting every shard needs no filtered folder: the snapshot itself is complete.
    assert resolve_model("org/tiny", cache_dir=tmp_path / "cache", progress=False, tensors=lambda k: True) == folder


def test_an_unsharded_checkpoint_comes_whole(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub(tiny_llama_dir, tmp_path / "hub" / "snapshot")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    folder = resolve_model("org/tiny", cache_dir=tmp_path / "cache", progress=False, tensors=client_key_filter)
    assert fake.calls == [METADATA, [*METADATA, "*.safetensors"]]
    assert folder == fake.snapshot and (folder / "model.safetensors").is_file()


def test_a_snapshot_missing_a_needed_shard_is_an_error(hub: FakeHub, sharded_llama: Path, tmp_path: Path) -> None:
    """As offline with a cache that never fetched the shard: the hub returns the snapshot as it is."""
    hub.remote = tmp_path / "remote"
    shards = shards_for(_weight_map(sharded_llama), client_key_filter)
    shutil.copytree(sharded_llama, hub.remote, ignore=shutil.ignore_patterns(shards[-1]))
    with pytest.raises(ModelNotFoundError, match=f"lacks {shards[-1]}"):
        resolve_model("org/tiny", cache_dir=tmp_path / "cache", progress=False, tensors=client_key_filter)


def test_local_folders_ignore_tensors(sharded_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(sharded_llama, tmp_path / "unused"))
    assert resolve_model(sharded_llama, tensors=client_key_filter) == sharded_llama


def _without_blocks(folder: Path):
    config = copy.deepcopy(AutoConfig.from_pretrained(folder))
    config.num_hidden_layers = 0
    return config


def test_the_client_loads_with_transformers_from_its_partial_folder(sharded_llama: Path, tmp_path: Path) -> None:
    """No fake: a snapshot holding only the client's shards, as the hub leaves it, and the folder built on it.

    transformers' from_pretrained opens every shard its index names, so it cannot load the snapshot itself;
    that is why resolve_model returns a folder whose index names only the shards present.
    """
    shards = shards_for(_weight_map(sharded_llama), client_key_filter)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(sharded_llama, snapshot, ignore=lambda _, names: [
        name for name in names if name.endswith(".safetensors") and name not in shards
    ])
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(snapshot, config=_without_blocks(snapshot))

    folder = source._partial_view(snapshot, shards, tmp_path / "views" / "tiny")
    assert source._partial_view(snapshot, shards, tmp_path / "views" / "tiny") == folder  # built once
    assert sorted(path.name for path in folder.iterdir()) == sorted([*shards, INDEX_NAME, "config.json", "generation_config.json"])
    client = AutoModelForCausalLM.from_pretrained(folder, config=_without_blocks(folder)).state_dict()
    full = AutoModelForCausalLM.from_pretrained(sharded_llama, config=_without_blocks(sharded_llama)).state_dict()
    assert client.keys() == full.keys() and {"model.embed_tokens.weight", "lm_head.weight"} <= client.keys()
    for name in full:
        torch.testing.assert_close(client[name], full[name], rtol=0, atol=0)
