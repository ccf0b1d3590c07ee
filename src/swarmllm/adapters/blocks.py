"""Block checkpoints: whole transformer blocks fine-tuned on a client, saved to be served by the swarm.

A checkpoint folder holds `blocks.safetensors` (keys `layers.<block>.<param>`, absolute block indices) and
`swarmllm_blocks.json` with the model name, the block indices and, per block, the sha256 of the *base*
weights it was trained from, hashed as stored in the model's safetensors. A server refuses a checkpoint
whose base hashes differ from its own blocks', so an override is never applied to the wrong model.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import nn

from swarmllm.models.shards import LAYER_KEY, read_tensors

BLOCKS_META = "swarmllm_blocks.json"
BLOCKS_WEIGHTS = "blocks.safetensors"
_KEY = re.compile(r"^layers\.(?P<block>\d+)\.(?P<param>.+)$")


class BlockCheckpointError(ValueError):
    pass


class BlockCheckpointMeta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    format_version: int = 1
    model: str
    blocks: tuple[int, ...]
    base_sha256: dict[int, str]


def _hash_tensors(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def base_hashes(model_dir: Path, blocks: list[int] | set[int]) -> dict[int, str]:
    """sha256 of each block's weights exactly as stored in the model folder (independent of runtime dtype)."""
    wanted = set(blocks)

    def want(key: str) -> str | None:
        m = LAYER_KEY.match(key)
        return f"{m['idx']}.{m['rest']}" if m and int(m["idx"]) in wanted else None

    tensors = read_tensors(model_dir, want)
    per_block: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        block, param = key.split(".", 1)
        per_block.setdefault(int(block), {})[param] = t
    return {b: _hash_tensors(per_block.get(b, {})) for b in sorted(wanted)}


def save_blocks(path: Path, model: str, layers: dict[int, nn.Module], base_sha256: dict[int, str]) -> BlockCheckpointMeta:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"layers.{b}.{name}": p.detach().to(torch.float32).contiguous().clone()
        for b, layer in layers.items() for name, p in layer.state_dict().items()
    }
    meta = BlockCheckpointMeta(model=model, blocks=tuple(sorted(layers)), base_sha256={b: base_sha256[b] for b in layers})
    save_file(tensors, str(path / BLOCKS_WEIGHTS))
    (path / BLOCKS_META).write_text(meta.model_dump_json(indent=2))
    return meta


def load_meta(path: Path) -> BlockCheckpointMeta:
    if not (path / BLOCKS_META).exists() or not (path / BLOCKS_WEIGHTS).exists():
        raise BlockCheckpointError(f"{path} is not a block checkpoint: it needs {BLOCKS_META} and {BLOCKS_WEIGHTS}")
    return BlockCheckpointMeta.model_validate_json((path / BLOCKS_META).read_text())


def load_blocks(path: Path, blocks: set[int] | None = None) -> tuple[BlockCheckpointMeta, dict[int, dict[str, torch.Tensor]]]:
    """The checkpoint's metadata and its tensors per block (only `blocks`, if given)."""
    meta = load_meta(path)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path / BLOCKS_WEIGHTS)).items():
        m = _KEY.match(key)
        if m is None:
            raise BlockCheckpointError(f"{path}: unexpected tensor {key!r}")
        b = int(m["block"])
        if b not in meta.blocks:
            raise BlockCheckpointError(f"{path}: tensor for block {b}, which the metadata does not list")
        if blocks is None or b in blocks:
            out.setdefault(b, {})[m["param"]] = t
    return meta, out


def apply_blocks(layers: dict[int, nn.Module], tensors: dict[int, dict[str, torch.Tensor]], expected: dict[int, str],
                 meta: BlockCheckpointMeta) -> None:
    """Overwrite `layers` (block -> module) with the checkpoint's weights, after checking base hashes and
    that every parameter is present with the right shape. Checks all blocks before changing any."""
    for b in tensors:
        if meta.base_sha256.get(b) != expected.get(b):
            raise BlockCheckpointError(
                f"block {b} of this checkpoint was trained from other base weights than this server's "
                f"({str(meta.base_sha256.get(b))[:12]} != {str(expected.get(b))[:12]}): wrong model?"
            )
        own = layers[b].state_dict()
        if set(own) != set(tensors[b]):
            raise BlockCheckpointError(f"block {b}: checkpoint parameters differ from the model's")
        for name, t in tensors[b].items():
            if t.shape != own[name].shape:
                raise BlockCheckpointError(f"block {b} {name}: shape {tuple(t.shape)} != {tuple(own[name].shape)}")
    for b, params in tensors.items():
        dtype = next(layers[b].parameters()).dtype
        layers[b].load_state_dict({k: v.to(dtype) for k, v in params.items()}, strict=True)
