"""Which safetensors files hold which tensors: the one owner of checkpoint-layout knowledge.

A sharded checkpoint ships `model.safetensors.index.json`, whose `weight_map` maps every tensor key to the
shard file holding it. That map is enough to choose the files a peer needs before downloading any weights:
a server of blocks 10:20 of Llama-3.1-70B needs 4 of its 30 shards, the client only the 3 shards with
the embeddings, final norm and LM head. So the rules here work on key names and weight maps and are pure;
only `weight_files`, `read_tensors` and `block_weight_bytes` touch the disk, and they open only the shards
they need (`safe_open` reads a shard's header, not its tensors, until a tensor is asked for).

A folder may therefore hold only some of the shards its index names (a partial download): every reader
here works on such a folder as long as the tensors it is asked for are present, and names the missing
files otherwise.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

if TYPE_CHECKING:  # not at run time: `source` imports this module, and naming a model must not load torch
    import torch

__all__ = [
    "INDEX_NAME",
    "LAYER_KEY",
    "KeyFilter",
    "MissingShardError",
    "block_key_filter",
    "block_of",
    "block_weight_bytes",
    "client_key_filter",
    "read_index",
    "read_tensors",
    "shards_for",
    "weight_files",
]

INDEX_NAME = "model.safetensors.index.json"
LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*?\.)?)(?:layers|h)\.(?P<idx>\d+)\.(?P<rest>.+)$")
"""A block's tensor: `<prefix>layers.<idx>.<rest>`, e.g. `model.layers.3.mlp.up_proj.weight`, or `<prefix>h.<idx>.<rest>`
where BLOOM and Falcon keep their blocks (`transformer.h.3.mlp.dense_4h_to_h.weight`); the stack's name is a
whole component of the key."""

# Bytes per element of the safetensors dtypes (quantized checkpoints store integer and fp8 tensors too).
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
             "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

KeyFilter = Callable[[str], bool]
"""A predicate on checkpoint tensor keys: True for the tensors a peer needs."""


class MissingShardError(FileNotFoundError):
    """Shard files that hold wanted tensors are absent from a folder whose index names them."""


def block_of(key: str) -> int | None:
    """The block index of checkpoint key `key`, or None for a tensor outside the blocks.

    Any `...layers.N.` key counts, whatever its prefix. In multimodal checkpoints (gemma3) this includes the
    vision tower's `encoder.layers.N` besides the decoder's layers, so a server fetches the few vision
    tensors of its block indices too, and block sizes include them; `load_span` then keeps only the stack
    whose tensors make a decoder block.
    """
    m = LAYER_KEY.match(key)
    return int(m["idx"]) if m else None


def block_key_filter(start: int, end: int) -> KeyFilter:
    """Keys of blocks `[start, end)`: what a server of that span reads (see `block_of` for multimodal)."""

    def want(key: str) -> bool:
        idx = block_of(key)
        return idx is not None and start <= idx < end

    return want


def no_tensors(key: str) -> bool:
    """Metadata only (config, tokenizer, index): what a tokenizer or a config reader needs."""
    return False


def client_key_filter(key: str) -> bool:
    """Every key outside the blocks: embeddings, final norm, LM head, and whatever else a checkpoint keeps
    outside `layers.N` (in multimodal checkpoints: the vision projector and the vision tower's embeddings,
    though not its `layers.N`; the client never runs them, and they are small)."""
    return block_of(key) is None


def shards_for(weight_map: dict[str, str], want: KeyFilter) -> list[str]:
    """The shard files (sorted, each once) that hold at least one key selected by `want`."""
    return sorted({shard for key, shard in weight_map.items() if want(key)})


def read_index(model_dir: Path) -> dict[str, str] | None:
    """The index's `weight_map` (tensor key -> shard file name), or None for an unsharded checkpoint."""
    index = model_dir / INDEX_NAME
    if not index.is_file():
        return None
    return json.loads(index.read_text())["weight_map"]


def weight_files(model_dir: Path) -> list[Path]:
    """Every weight file of the checkpoint: those its index names (present or not), else the folder's
    `*.safetensors`. Raises FileNotFoundError for a folder with neither."""
    weight_map = read_index(model_dir)
    if weight_map is not None:
        return [model_dir / name for name in shards_for(weight_map, lambda _: True)]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    return files


def _files_holding(model_dir: Path, want: KeyFilter) -> list[Path]:
    """The files that may hold keys selected by `want`; with an index, exactly those, and they must exist."""
    weight_map = read_index(model_dir)
    if weight_map is None:
        return weight_files(model_dir)
    files = [model_dir / name for name in shards_for(weight_map, want)]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise MissingShardError(
            f"{model_dir} lacks {', '.join(missing)}, which hold tensors this peer needs (a partial download?"
            " resolve_model(name, tensors=...) fetches the shards for a set of tensors)"
        )
    return files


def read_tensors(model_dir: Path, want: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """Read only the tensors whose checkpoint key `want` maps to a local name (None skips it).

    With an index, only the shards holding such keys are opened, so the others may be absent; a needed
    shard that is absent raises MissingShardError naming it. Without an index every `*.safetensors` file
    of the folder is opened.
    """
    out: dict[str, torch.Tensor] = {}
    for path in _files_holding(model_dir, lambda key: want(key) is not None):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = want(key)
                if name is not None:
                    out[name] = f.get_tensor(key)
    return out


def block_weight_bytes(model_dir: Path) -> dict[int, int]:
    """Bytes of each block's weights as stored, read from safetensors headers only.

    In a partial download only the blocks whose shards are all present are reported (a block split over a
    present and an absent shard is left out rather than undercounted), so every size given is complete.
    """
    files = weight_files(model_dir)
    absent = {path.name for path in files if not path.is_file()}  # only an index names absent files
    incomplete = {block_of(key) for key, shard in (read_index(model_dir) or {}).items() if shard in absent}
    sizes: dict[int, int] = {}
    for path in files:
        if path.name in absent:
            continue
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                idx = block_of(key)
                if idx is not None:
                    sl = f.get_slice(key)
                    sizes[idx] = sizes.get(idx, 0) + math.prod(sl.get_shape()) * _ITEMSIZE[sl.get_dtype()]
    return {idx: size for idx, size in sizes.items() if idx not in incomplete}
