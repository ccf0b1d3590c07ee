"""LoRA on spans of blocks: the spec, applying weights to a span, content hashes, and the peft file format.

One representation is used everywhere: `LoraWeights`, a mapping `block index -> module path -> (A, B)`,
with A (rank, in_features) and B (out_features, rank) as in peft. Servers apply it with forward hooks
for the duration of one request, so base weights are never modified and concurrent clients never see
each other's adapters. The math is peft's, operation for operation (`B(A(dropout(x))) * scaling` added to
the base output), so a saved adapter loaded with peft reproduces the swarm's outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

LoraWeights = dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]

_PEFT_KEY = re.compile(r"(?:^|\.)(?:layers|h)\.(?P<block>\d+)\.(?P<path>.+)\.lora_(?P<ab>[AB])\.weight$")


class LoraSpec(BaseModel):
    """A peft-style LoRA configuration. `target_modules` are module names inside a block, matched by
    their last path component (as peft does), e.g. ("q_proj", "v_proj")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(default=8, ge=1, description="rank r of the low-rank update")
    alpha: float = Field(default=16.0, gt=0, description="scaling numerator: the update is scaled by alpha / r")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the LoRA input during training")
    target_modules: tuple[str, ...] = Field(default=("q_proj", "v_proj"), min_length=1)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraShapeError(ValueError):
    """LoRA weights that do not fit the blocks they are meant for."""


def target_paths(block: nn.Module, targets: Sequence[str]) -> list[str]:
    """Paths of the Linear modules in `block` named by `targets` (last component match), in block order."""
    found = [
        name for name, module in block.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not found:
        raise LoraShapeError(f"no Linear module named {list(targets)} in the block")
    return found


def init_weights(block: nn.Module, paths: Sequence[str], rank: int, generator: torch.Generator | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fresh LoRA weights for one block, initialised as peft does: A ~ kaiming-uniform, B = 0 (so the
    adapter starts as the identity and the first step's output equals the base model's)."""
    out = {}
    for path in paths:
        linear = block.get_submodule(path)
        assert isinstance(linear.in_features, int) and isinstance(linear.out_features, int)  # an nn.Linear's
        a = torch.empty(rank, linear.in_features)
        nn.init.kaiming_uniform_(a, a=5**0.5, generator=generator)
        out[path] = (a, torch.zeros(linear.out_features, rank))
    return out


def check_fits(block: nn.Module, block_idx: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Raise LoraShapeError unless every (A, B) pair fits its target Linear and is finite float."""
    for path, (a, b) in weights.items():
        try:
            linear = block.get_submodule(path)
        except AttributeError:
            raise LoraShapeError(f"block {block_idx} has no module {path!r}") from None
        if not isinstance(linear, nn.Linear):
            raise LoraShapeError(f"block {block_idx}: {path!r} is not a Linear layer")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraShapeError(f"block {block_idx} {path}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a rank-r pair")
        if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
            raise LoraShapeError(
                f"block {block_idx} {path}: LoRA maps {a.shape[1]} -> {b.shape[0]} features, the layer maps "
                f"{linear.in_features} -> {linear.out_features}"
            )
        if not (a.is_floating_point() and b.is_floating_point()) or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoraShapeError(f"block {block_idx} {path}: LoRA weights must be finite floating point")


def flatten(weights: LoraWeights, start: int, end: int, paths: Sequence[str]) -> list[torch.Tensor]:
    """The wire order of `LoraRef`: for each block in [start, end), for each path, A then B."""
    return [t for b in range(start, end) for p in paths for t in weights[b][p]]


def unflatten(tensors: Sequence[torch.Tensor], blocks: Sequence[int], paths: Sequence[str]) -> LoraWeights:
    expected = 2 * len(blocks) * len(paths)
    if len(tensors) != expected:
        raise LoraShapeError(f"expected {expected} LoRA tensors ({len(blocks)} blocks x {len(paths)} modules x A,B), got {len(tensors)}")
    it = iter(tensors)
    return {b: {p: (next(it), next(it)) for p in paths} for b in blocks}


def content_hash(start: int, end: int, paths: Sequence[str], rank: int, tensors: Sequence[torch.Tensor]) -> str:
    """sha256 of the weights for blocks [start, end) in wire order, with their layout."""
    h = hashlib.sha256(json.dumps([start, end, list(paths), rank]).encode())
    for t in tensors:
        t = t.detach().to(torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _dropout_mask(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty_like(x).bernoulli_(1 - p, generator=generator) / (1 - p)


@contextlib.contextmanager
def applied(
    layers: Sequence[nn.Module] | nn.ModuleList, first_block: int, weights: LoraWeights, scaling: float,
    dropout: float = 0.0, seed: int = 0,
) -> Iterator[None]:
    """Apply `weights` to `layers` (blocks first_block, first_block+1, ...) while the context is open.

    Dropout masks come from one generator per block seeded from (seed, block), so recomputing any block
    for backward, on any server and in any split of the route, draws the same masks as the forward pass.
    """
    handles = []
    try:
        for offset, layer in enumerate(layers):
            block = first_block + offset
            if block not in weights:
                continue
            generator = torch.Generator().manual_seed(seed * 1_000_003 + block) if dropout > 0 else None
            for path, (a, b) in weights[block].items():
                handles.append(layer.get_submodule(path).register_forward_hook(
                    _hook(a, b, scaling, dropout, generator)
                ))
        yield
    finally:
        for h in handles:
            h.remove()


def _hook(a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float, generator: torch.Generator | None):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0].to(a.dtype)
        if generator is not None:
            x = x * _dropout_mask(x, dropout, generator)
        # Same ops in the same order as peft's LoRA Linear, so results match it exactly.
        return out + (F.linear(F.linear(x, a), b) * scaling).to(out.dtype)

    return hook


# --- the peft file format ---

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def save_peft(
    path: Path, weights: LoraWeights, spec: LoraSpec, stack: str, base_model: str | None = None,
) -> None:
    """Write `weights` as a standard peft LoRA adapter folder (adapter_config.json + safetensors). `stack` is
    where the causal LM keeps its blocks (`model.layers`, BLOOM's `transformer.h`), as peft names them."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for block, modules in weights.items():
        for module_path, (a, b) in modules.items():
            key = f"base_model.model.{stack}.{block}.{module_path}"
            tensors[f"{key}.lora_A.weight"] = a.detach().contiguous().clone()
            tensors[f"{key}.lora_B.weight"] = b.detach().contiguous().clone()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.target_modules),
        # Blocks trained as whole layers (or not adapted at all) carry no LoRA.
        "layers_to_transform": sorted(weights),
        "layers_pattern": stack.rsplit(".", 1)[-1],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
    }
    save_file(tensors, str(path / PEFT_WEIGHTS))
    (path / PEFT_CONFIG).write_text(json.dumps(config, indent=2))


def load_peft(path: Path) -> tuple[LoraSpec, LoraWeights]:
    """Read a peft LoRA folder into a spec and per-block weights. Raises LoraShapeError if unsupported."""
    config_path, weights_path = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not config_path.exists() or not weights_path.exists():
        raise LoraShapeError(f"{path} is not a peft adapter: it needs {PEFT_CONFIG} and {PEFT_WEIGHTS}")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise LoraShapeError(f"{path}: only LoRA adapters can be served, this is {config.get('peft_type')}")
    if config.get("use_rslora") or config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoraShapeError(f"{path}: rsLoRA, DoRA and per-module ranks are not supported")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    spec = LoraSpec(rank=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                    target_modules=tuple(targets))
    pairs: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in load_file(str(weights_path)).items():
        m = _PEFT_KEY.search(key)
        if m is None:
            raise LoraShapeError(f"{path}: unexpected tensor {key!r} (only LoRA A/B of blocks are supported)")
        pairs.setdefault(int(m["block"]), {}).setdefault(m["path"], {})[m["ab"]] = tensor.to(torch.float32)
    weights: LoraWeights = {}
    for block, modules in pairs.items():
        for module_path, ab in modules.items():
            if set(ab) != {"A", "B"}:
                raise LoraShapeError(f"{path}: block {block} {module_path} lacks its lora_A or lora_B")
            weights.setdefault(block, {})[module_path] = (ab["A"], ab["B"])
    return spec, weights
