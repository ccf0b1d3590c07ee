"""The distributed causal LM: a transformers model whose blocks live in the swarm.

`AutoDistributedModelForCausalLM.from_pretrained(name, initial_peers=...)` builds a subclass of the model's
own transformers class (e.g. LlamaForCausalLM) with only the embeddings, final norm and LM head loaded
locally. Its backbone sends hidden states through a `RemoteSequential`, so `generate()`, training loops and
peft work as they do on the local model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PretrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPast

from swarmllm.client.config import ClientConfig
from swarmllm.client.inference_session import InferenceSession
from swarmllm.client.remote_sequential import RemoteSequential
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.models.family import family_of
from swarmllm.models.source import model_display_name, resolve_model
from swarmllm.models.span import text_config

logger = logging.getLogger(__name__)


class RemoteCache(DynamicCache):
    """Stands in for the KV cache inside `generate()`: the real caches live on the servers of `session`.

    Only the length matters to generate (it slices the new tokens from it), so that is all it reports.
    """

    def __init__(self, session: InferenceSession):
        super().__init__()
        self.session = session

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.session.position

    @property
    def is_linear(self) -> list[bool]:
        # generate() slices new tokens only if `not all(cache.is_linear)`; an empty cache would say all([]).
        return [False]

    @property
    def is_compileable(self) -> bool:
        return False


class DistributedBackbone(nn.Module):
    """Embeddings and final norm run here; the blocks run remotely. Attribute names match transformers'."""

    def __init__(self, config: PretrainedConfig, embed_tokens: nn.Module, norm: nn.Module, layers: RemoteSequential):
        super().__init__()
        self.config, self.embed_tokens, self.norm, self.layers = config, embed_tokens, norm, layers

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (batch, seq, hidden)
        session = cache.session if isinstance(cache, RemoteCache) else None
        past = session.position if session is not None else 0
        batch, seq = embeds.shape[:2]
        if position_ids is None:
            position_ids = _positions(attention_mask, past, seq, batch)
        position_ids = position_ids.expand(batch, -1).contiguous()
        # An all-ones mask carries no information: leave it out so servers use the fast causal path.
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if mask is not None:
            mask = mask.to(torch.int64)
        if session is not None:
            hidden = session.step(embeds, position_ids, mask)
        else:
            hidden = self.layers(embeds, position_ids, mask)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache)


def _positions(attention_mask: torch.Tensor | None, past: int, seq: int, batch: int) -> torch.Tensor:
    if attention_mask is None:
        return torch.arange(past, past + seq).expand(batch, -1)
    # Same rule as transformers' generate: positions count real tokens, padding sits at position 0.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -seq:]


class DistributedMixin:
    """Mixed into the model's own transformers class. Adds sessions and session-aware `generate`."""

    _keys_to_ignore_on_load_unexpected = [r"(^|\.)layers\.\d+\."]  # blocks are remote: never loaded here
    _active_session: InferenceSession | None = None
    sequence_manager: SequenceManager

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int | None = None) -> Iterator[InferenceSession]:
        """Keep one server-side session across several `generate` calls (each continues where the last ended)."""
        if self._active_session is not None:
            raise RuntimeError("an inference session is already active on this model")
        session = self.model.layers.inference_session(max_length, batch_size)
        self._active_session = session
        try:
            yield session
        finally:
            self._active_session = None
            session.close()

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        session = self._active_session
        if session is None:
            max_length = _max_length(self.generation_config, kwargs, inputs)
            with self.inference_session(max_length) as session:
                return self._generate_in(session, inputs, *args, **kwargs)
        return self._generate_in(session, inputs, *args, **kwargs)

    def _generate_in(self, session: InferenceSession, inputs, *args, **kwargs):
        mask = kwargs.pop("attention_mask", None)
        if inputs is None and session.output_ids is not None:
            inputs = session.output_ids[:, :0]
        if inputs is not None and mask is None:
            mask = torch.ones_like(inputs)
        if session.output_ids is not None:
            # Continue the session: prepend what it has already seen, unless the caller already did.
            hist = session.output_ids
            if inputs.shape[1] < hist.shape[1] or not torch.equal(inputs[:, : hist.shape[1]], hist):
                inputs = torch.cat([hist, inputs], dim=1)
                mask = torch.cat([session.attention_mask, mask], dim=1)
            else:
                mask = torch.cat([session.attention_mask, mask[:, hist.shape[1] :]], dim=1)
        out = super().generate(inputs, *args, attention_mask=mask, cache=RemoteCache(session), **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        session.output_ids = sequences
        session.attention_mask = torch.cat([mask, mask.new_ones(mask.shape[0], sequences.shape[1] - mask.shape[1])], 1)
        return out


def _max_length(generation_config, kwargs: dict, inputs: torch.Tensor | None) -> int:
    prompt = 0 if inputs is None else inputs.shape[-1]
    config = kwargs.get("generation_config") or generation_config
    new = kwargs.get("max_new_tokens", config.max_new_tokens)
    if new is not None:
        return prompt + new
    return kwargs.get("max_length", config.max_length)


class AutoDistributedModelForCausalLM:
    """Factory: `from_pretrained(name, initial_peers=[...])` returns a distributed model of the right class."""

    @classmethod
    def from_pretrained(
        cls,
        name: str | Path,
        initial_peers: list[str] | tuple[str, ...] = (),
        *,
        config: ClientConfig | None = None,
        dtype: torch.dtype = torch.float32,
        **client_options,
    ):
        client = config or ClientConfig(initial_peers=list(initial_peers), **client_options)
        if client.num_threads:
            torch.set_num_threads(client.num_threads)
        model_dir = resolve_model(name)
        hf_config = AutoConfig.from_pretrained(model_dir)
        family_of(text_config(hf_config))
        base_cls = AutoModelForCausalLM._model_mapping[type(hf_config)]
        dist_cls = type(f"Distributed{base_cls.__name__}", (DistributedMixin, base_cls), {})
        # Load with zero blocks: transformers then reads only embeddings, norm and head, with its own
        # handling of tied weights and computed buffers.
        local_config = _without_blocks(hf_config)
        model = dist_cls.from_pretrained(model_dir, config=local_config, dtype=dtype)
        model.config = hf_config
        manager = SequenceManager(client, model_display_name(name), text_config(hf_config).num_hidden_layers)
        backbone = model.base_model
        model.sequence_manager = manager
        setattr(model, model.base_model_prefix, DistributedBackbone(
            text_config(hf_config), backbone.embed_tokens, backbone.norm, RemoteSequential(manager)
        ))
        return model.eval()


def _without_blocks(config: PretrainedConfig) -> PretrainedConfig:
    config = copy.deepcopy(config)
    text = config.get_text_config(decoder=True)
    text.num_hidden_layers = 0
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = []
    return config
