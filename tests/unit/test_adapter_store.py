"""Adapter packing, the local content-addressed store, hub folders and DHT records: no network."""

from __future__ import annotations

import asyncio
import hashlib
import json
import types
from pathlib import Path

import pytest
import torch
from hivemind.utils import ValueWithExpiration
from safetensors.torch import save_file

from swarmllm import wire
from swarmllm.adapters.hub import fetch_from_hub, publish_to_hub
from swarmllm.adapters.package import (
    MAGIC,
    AdapterError,
    AdapterNotFoundError,
    AdapterTooLargeError,
    AdapterVerificationError,
    adapter_kind,
    content_hash,
    pack,
    unpack,
)
from swarmllm.adapters.records import parse_names, parse_providers
from swarmllm.adapters.resolve import resolve_adapter
from swarmllm.adapters.store import AdapterStore
from swarmllm.adapters.swarm_hub import CHUNK_BYTES, SwarmHub
from swarmllm.protocol import AdapterChunk, AdapterGet, AdapterRecord, ErrorCode


def make_lora(path: Path, seed: int = 0, numel: int = 64) -> Path:
    """A tiny peft-style LoRA folder (the files, not a loadable model), plus a nested file and a hidden one."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "base_model_name_or_path": "tiny"}))
    save_file({"base_model.layers.0.q_proj.lora_A.weight": torch.randn(2, numel // 2, generator=gen)},
              path / "adapter_model.safetensors")
    (path / "docs").mkdir()
    (path / "docs" / "README.md").write_text("trained on nothing")
    (path / ".gitattributes").write_text("*.safetensors filter=lfs")  # hub metadata: never packed
    return path


def files_of(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def craft(files: list[tuple[str, bytes]]) -> bytes:
    """Packed bytes with arbitrary (possibly hostile) names, bypassing `pack`'s checks."""
    header = json.dumps({"files": [[n, len(d)] for n, d in files]}).encode()
    return MAGIC + len(header).to_bytes(8, "big") + header + b"".join(d for _, d in files)


# --- packing ---

def test_pack_is_deterministic_and_round_trips(tmp_path) -> None:
    src = make_lora(tmp_path / "a")
    data = pack(src)
    assert pack(src) == data
    # Same files written in another order, later: same bytes, same hash.
    copy = tmp_path / "b"
    for name, content in reversed(list(files_of(src).items())):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(content)
    assert pack(copy) == data and content_hash(copy) == hashlib.sha256(data).hexdigest()

    out = unpack(data, tmp_path / "out")
    assert files_of(out) == files_of(src)
    assert not (out / ".gitattributes").exists()
    assert pack(out) == data


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", "docs/../../evil", "a\\..\\evil", ".hidden", "a//b", ""])
def test_unpack_refuses_names_outside_the_folder(tmp_path, name) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(AdapterError, match="refusing file name"):
        unpack(craft([("adapter_config.json", b"{}"), (name, b"x")]), dest)
    assert not dest.exists() and not (tmp_path / "evil").exists()


def test_unpack_refuses_malformed_bytes(tmp_path) -> None:
    good = craft([("a", b"1"), ("b", b"22")])
    with pytest.raises(AdapterError, match="do not add up"):
        unpack(good[:-1], tmp_path / "x")
    with pytest.raises(AdapterError, match="out of order"):
        unpack(craft([("b", b"1"), ("a", b"2")]), tmp_path / "x")
    with pytest.raises(AdapterError, match="magic"):
        unpack(b"PK\x03\x04 a zip file", tmp_path / "x")
    with pytest.raises(AdapterError, match="not an empty folder"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "f").write_text("x")
        unpack(good, tmp_path / "full")


def test_adapter_kind_from_marker_files(tmp_path) -> None:
    assert adapter_kind(make_lora(tmp_path / "lora")) == "lora"
    blocks = tmp_path / "blocks"
    blocks.mkdir()
    (blocks / "swarmllm_blocks.json").write_text("{}")
    (blocks / "blocks.safetensors").write_bytes(b"")
    assert adapter_kind(blocks) == "blocks"

    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        adapter_kind(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="not an adapter folder"):
        adapter_kind(tmp_path / "empty")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="lacks adapter_model.safetensors"):
        adapter_kind(tmp_path / "half")
    (blocks / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="both"):
        adapter_kind(blocks)


# --- the store ---

def test_store_adds_by_content_and_name(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SWARMLLM_CACHE", str(tmp_path / "cache"))
    store = AdapterStore()
    assert store.root == tmp_path / "cache" / "adapters"
    src = make_lora(tmp_path / "src")
    sha = store.add(src, name="tiny-lora")
    assert sha == content_hash(src)
    assert files_of(store.path(sha)) == files_of(src)
    assert store.sha_of("tiny-lora") == sha and store.sha_of("other") is None
    assert store.packed(sha) == pack(src) and store.shas() == [sha]
    assert store.add(src) == sha  # idempotent
    assert store.path("../" + sha) is None and store.path("0" * 64) is None
    with pytest.raises(AdapterNotFoundError):
        store.packed("0" * 64)


def test_store_rejects_tampered_bytes_and_leaves_nothing(tmp_path) -> None:
    store = AdapterStore(tmp_path / "store")
    data = pack(make_lora(tmp_path / "src"))
    sha = hashlib.sha256(data).hexdigest()
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(AdapterVerificationError, match=sha):
        store.add_packed(tampered, sha, max_bytes=1 << 20, name="tiny")
    with pytest.raises(AdapterTooLargeError, match=f"{len(data)} bytes.*limit of {len(data) - 1} bytes"):
        store.add_packed(data, sha, max_bytes=len(data) - 1)
    assert store.path(sha) is None and store.sha_of("tiny") is None
    assert not (tmp_path / "store").exists() or list((tmp_path / "store").iterdir()) == []

    # Bytes that verify but do not unpack to an adapter: refused, and no temporary folder stays behind.
    junk = craft([("notes.txt", b"hello")])
    with pytest.raises(AdapterError, match="not an adapter folder"):
        store.add_packed(junk, hashlib.sha256(junk).hexdigest(), max_bytes=1 << 20)
    assert list((tmp_path / "store").iterdir()) == []

    assert store.add_packed(data, sha, max_bytes=len(data), name="tiny") == store.path(sha)
    assert store.sha_of("tiny") == sha


# --- hubs ---

def test_hub_folder_publish_and_fetch(tmp_path) -> None:
    hub = tmp_path / "hub"
    src = make_lora(tmp_path / "src")
    sha = publish_to_hub(src, "org/tiny-lora", hub_dir=hub)
    assert sha == content_hash(src)
    fetched = fetch_from_hub("org/tiny-lora", hub_dir=hub)
    assert fetched == hub / "org" / "tiny-lora" and content_hash(fetched) == sha
    assert not (fetched / ".gitattributes").exists()

    # A new version replaces the old one as a whole.
    src2 = make_lora(tmp_path / "src2", seed=1)
    (src.parent / "src2" / "docs" / "README.md").unlink()
    assert publish_to_hub(src2, "org/tiny-lora", hub_dir=hub) == content_hash(src2) != sha
    assert content_hash(fetch_from_hub("org/tiny-lora", hub_dir=hub)) == content_hash(src2)
    assert sorted(p.name for p in (hub / "org").iterdir()) == ["tiny-lora"]  # no temporary folders left

    with pytest.raises(AdapterNotFoundError, match="no adapter repo org/missing"):
        fetch_from_hub("org/missing", hub_dir=hub)
    for bad in ("../escape", "org/..", "just-a-name"):
        with pytest.raises(AdapterError, match="not a hub repo id"):
            publish_to_hub(src, bad, hub_dir=hub)
    with pytest.raises(AdapterError, match="revisions"):
        fetch_from_hub("org/tiny-lora", hub_dir=hub, revision="main")
    with pytest.raises(AdapterError, match="not an adapter folder"):
        publish_to_hub(tmp_path / "hub", "org/x", hub_dir=tmp_path / "hub2")


def test_resolve_adapter_prefers_the_local_store_then_the_hub(tmp_path) -> None:
    hub, store = tmp_path / "hub", AdapterStore(tmp_path / "store")
    src = make_lora(tmp_path / "src")
    sha = publish_to_hub(src, "org/tiny-lora", hub_dir=hub)
    path = asyncio.run(resolve_adapter("org/tiny-lora", hub_dir=hub, store=store))
    assert path == store.path(sha) and store.sha_of("org/tiny-lora") == sha
    (hub / "org" / "tiny-lora" / "adapter_model.safetensors").unlink()  # the hub no longer matters
    assert asyncio.run(resolve_adapter("org/tiny-lora", hub_dir=hub, store=store)) == path
    with pytest.raises(AdapterNotFoundError, match="not found; looked in the local store"):
        asyncio.run(resolve_adapter("plain-name", hub_dir=hub, store=store))


# --- DHT records and the adapter_get stream ---

def _item(value: dict) -> ValueWithExpiration:
    return ValueWithExpiration(value, 1e12)


def test_dht_records_skip_garbage() -> None:
    good = AdapterRecord(name="tiny", sha256="a" * 64, size=10, kind="lora", model="m", publisher="QmPeer")
    raw = {
        "tiny": _item(good.model_dump(mode="json")),
        "other": _item(good.model_dump(mode="json")),  # stored under another name's subkey
        "future": _item({**good.model_dump(mode="json"), "name": "future", "version": 2}),
        "junk": _item({"name": "junk"}),
        "bad-hash": _item({**good.model_dump(mode="json"), "name": "bad-hash", "sha256": "../x"}),
        "new": _item({**good.model_dump(mode="json"), "name": "new", "signature": "from a newer peer"}),
    }
    assert sorted(parse_names(raw)) == ["new", "tiny"] and parse_names(raw)["tiny"] == good
    assert parse_names(None) == {} and parse_names("not a dict") == {}
    providers = {"QmA": _item({"peer_id": "QmA"}), "QmB": _item({"peer_id": "QmC"}), "QmD": _item([1, 2])}
    assert parse_providers(providers) == ["QmA"]


async def _collect(hub: SwarmHub, request) -> list:
    return [msg async for msg in hub.rpc_get(request, types.SimpleNamespace(remote_id="QmCaller"))]


def test_adapter_get_streams_chunks_under_the_message_limit(tmp_path) -> None:
    store = AdapterStore(tmp_path / "store")
    sha = store.add(make_lora(tmp_path / "src", numel=700_000))  # ~2.7 MiB: three chunks
    hub = SwarmHub(types.SimpleNamespace(peer_id="QmSelf"), store)
    data = store.packed(sha)

    msgs = asyncio.run(_collect(hub, wire.request(AdapterGet(sha256=sha))))
    parsed = [wire.parse(m, AdapterChunk) for m in msgs]
    assert len(parsed) == 3 and all(m.ByteSize() < 2 * CHUNK_BYTES for m in msgs)
    assert [meta.offset for meta, _ in parsed] == [0, CHUNK_BYTES, 2 * CHUNK_BYTES]
    assert b"".join(t.numpy().tobytes() for _, (t,) in parsed) == data

    resumed = asyncio.run(_collect(hub, wire.request(AdapterGet(sha256=sha, offset=CHUNK_BYTES + 5))))
    assert b"".join(wire.parse(m, AdapterChunk)[1][0].numpy().tobytes() for m in resumed) == data[CHUNK_BYTES + 5:]

    (unknown,) = asyncio.run(_collect(hub, wire.request(AdapterGet(sha256="0" * 64))))
    with pytest.raises(wire.RemoteError) as info:
        wire.parse(unknown, AdapterChunk)
    assert info.value.code == ErrorCode.ADAPTER


PROVIDER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # any valid base58 peer id


def test_fetch_stops_a_provider_that_streams_more_than_announced(tmp_path) -> None:
    record = AdapterRecord(name="x", sha256="a" * 64, size=10, kind="lora", model="m", publisher=PROVIDER)
    sent = []

    async def endless():
        for i in range(100):
            sent.append(i)
            chunk = torch.zeros(8, dtype=torch.uint8)
            yield wire.response(AdapterChunk(sha256=record.sha256, offset=8 * i, total=10), chunk)

    async def iterate_protobuf_handler(*args):
        return endless()

    async def providers(sha256):
        return [PROVIDER]

    hub = SwarmHub(types.SimpleNamespace(peer_id="QmSelf"), AdapterStore(tmp_path / "store"))
    hub._p2p = types.SimpleNamespace(iterate_protobuf_handler=iterate_protobuf_handler)
    hub.providers = providers
    with pytest.raises(AdapterVerificationError, match="more than the announced 10 bytes"):
        asyncio.run(hub._download_any(record))
    assert len(sent) == 2  # stopped at the first chunk past the size, not at the end of the stream


def test_cli_publishes_to_and_fetches_from_a_hub_folder(tmp_path, monkeypatch, capsys) -> None:
    from swarmllm.cli.main import build_parser

    def run(*argv: str) -> str:
        args = build_parser().parse_args(["adapters", *argv])
        args.func(args)
        return capsys.readouterr().out

    monkeypatch.setenv("SWARMLLM_CACHE", str(tmp_path / "cache"))
    src, hub = make_lora(tmp_path / "src"), tmp_path / "hub"
    sha = content_hash(src)
    out = run("publish", str(src), "--name", "org/tiny-lora", "--hub-dir", str(hub))
    assert out.startswith(f"published: org/tiny-lora sha256={sha} size={len(pack(src))} to {hub}/org/tiny-lora")
    out = run("fetch", "org/tiny-lora", "--hub-dir", str(hub), "--out", str(tmp_path / "out"))
    assert out.strip() == f"fetched: org/tiny-lora sha256={sha} -> {tmp_path / 'out'}"
    assert files_of(tmp_path / "out") == files_of(src)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        run("publish", str(src), "--name", "no spaces allowed")
    with pytest.raises(AdapterNotFoundError, match="not found"):
        run("fetch", "org/missing", "--hub-dir", str(hub))
