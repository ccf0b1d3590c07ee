"""Client-owned trainable parameters for remote blocks, and how they travel with each request.

Tuning modes (`from_pretrained(..., tuning_mode=...)`):
- `ptune`: `prompts` (1, prefix, hidden) are prepended to the input embeddings on the client.
- `deep_ptune`: as ptune, plus `deep_prompts` (blocks, 1, prefix, hidden) that each server adds to the
  prefix positions before each block; the servers return their gradients.
- `lora`: LoRA weights for every remote block's target modules. They are uploaded once per optimizer
  step (servers cache them by content hash per client) and servers return their gradients.
A named adapter (`adapter=NAME`) and a block override (`block_override=NAME`) are applied by the servers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

import torch
from torch import nn

from swarmllm import wire
from swarmllm.adapters import lora
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.protocol import RPC_LORA_PUT, LoraPut, LoraRef, LoraStored, Tuning

logger = logging.getLogger(__name__)

TuningMode = Literal["ptune", "deep_ptune", "lora"]


class ClientTuning(nn.Module):
    """The trainable state of a distributed model, indexed by absolute block number.

    `block_paths` are the LoRA target modules' paths inside a block (the same for every block);
    `lora_blocks` are the blocks that get LoRA weights (the remote ones).
    """

    def __init__(
        self, mode: TuningMode | None, num_blocks: int, hidden_size: int, pre_seq_len: int = 0,
        lora_spec: lora.LoraSpec | None = None, lora_init: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
        adapter: str | None = None, seed: int = 0, embed_size: int | None = None,
    ):
        super().__init__()
        self.mode, self.num_blocks, self.adapter = mode, num_blocks, adapter
        self.prompts = self.deep_prompts = None
        if mode in ("ptune", "deep_ptune"):
            if pre_seq_len < 1:
                raise ValueError(f"tuning_mode={mode!r} needs pre_seq_len >= 1")
            # Prompts are virtual input embeddings: in the embeddings' width, which differs from the blocks' where
            # a family projects in (OPT-350m).
            self.prompts = nn.Parameter(torch.randn(1, pre_seq_len, embed_size or hidden_size) * 0.02)
        if mode == "deep_ptune":
            # Zeros: training starts from plain prompt tuning and learns per-block corrections.
            self.deep_prompts = nn.Parameter(torch.zeros(num_blocks, 1, pre_seq_len, hidden_size))
        self.lora_spec = lora_spec if mode == "lora" else None
        self.lora = nn.ParameterDict()
        self.paths: list[str] = []
        if mode == "lora":
            if lora_spec is None or not lora_init:
                raise ValueError("tuning_mode='lora' needs a LoraSpec and initial weights")
            self.paths = list(next(iter(lora_init.values())))
            for b, modules in lora_init.items():
                for p, (a, bb) in modules.items():
                    self.lora[_key(b, p, "A")] = nn.Parameter(a)
                    self.lora[_key(b, p, "B")] = nn.Parameter(bb)
        self.seed = seed  # dropout seed of the current step; `next_step` changes it
        self._uploaded: set[tuple[str, str]] = set()  # (peer, sha256) known to be cached there

    @property
    def pre_seq_len(self) -> int:
        return 0 if self.prompts is None else self.prompts.shape[1]

    def lora_tensors(self, start: int, end: int) -> list[nn.Parameter]:
        """LoRA parameters of blocks [start, end) in wire order (empty if not in lora mode)."""
        if self.lora_spec is None:
            return []
        return [self.lora[_key(b, p, ab)] for b in range(start, end) for p in self.paths for ab in "AB"]

    def lora_weights(self) -> lora.LoraWeights:
        return {b: {p: (self.lora[_key(b, p, "A")], self.lora[_key(b, p, "B")]) for p in self.paths}
                for b in sorted({_unkey(key)[0] for key in self.lora})}

    def per_block(self) -> int:
        return 2 * len(self.paths)

    def request(self, start: int, end: int, prompts: torch.Tensor | None, lora_tensors: list[torch.Tensor],
                override: str | None) -> tuple[Tuning, LoraRef | None]:
        ref = None
        if lora_tensors:
            spec = self.lora_spec
            assert spec is not None  # LoRA tensors exist only with a spec
            sha = lora.content_hash(start, end, self.paths, spec.rank, lora_tensors)
            seed = self.seed if spec.dropout > 0 else 0
            ref = LoraRef(sha256=sha, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout if self.training else 0.0,
                          targets=tuple(self.paths), seed=seed)
        tuning = Tuning(adapter=self.adapter, lora=ref, prompts=prompts is not None, override=override)
        return tuning, ref

    async def ensure_uploaded(self, manager: SequenceManager, peer: str, ref: LoraRef, start: int, end: int,
                              tensors: list[torch.Tensor]) -> None:
        """Upload LoRA weights to `peer` unless it is known to have them; parts stay under the frame limit."""
        if (peer, ref.sha256) in self._uploaded:
            return
        per_block = self.per_block()
        block_bytes = sum(t.numel() * 4 for t in tensors[:per_block])
        group = max(1, wire.MAX_PART_BYTES // max(1, block_bytes))
        stored = None
        for first in range(start, end, group):
            blocks = tuple(range(first, min(end, first + group)))
            part = tensors[(first - start) * per_block : (blocks[-1] + 1 - start) * per_block]
            msg = wire.request(LoraPut(lora=ref, start=start, end=end, blocks=blocks), *[t.detach().float() for t in part])
            reply = await asyncio.wait_for(manager.call(peer, RPC_LORA_PUT, msg), manager.config.request_timeout)
            stored, _ = wire.parse(reply, LoraStored, peer)
        if stored is None or not stored.complete:
            raise wire.ProtocolError("server did not confirm the complete LoRA upload")
        self._uploaded.add((peer, ref.sha256))

    def forget(self, peer: str, sha256: str) -> None:
        self._uploaded.discard((peer, sha256))

    def next_step(self) -> None:
        """New dropout masks for the next forward pass (call once per training step; `model()` does)."""
        self.seed += 1


def _key(block: int, path: str, ab: str) -> str:
    return f"{block}__{path.replace('.', '__')}__{ab}"


def _unkey(key: str) -> tuple[int, str, str]:
    block, *path, ab = key.split("__")
    return int(block), ".".join(path), ab
