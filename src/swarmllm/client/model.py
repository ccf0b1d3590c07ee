"""The distributed causal LM: a transformers model whose blocks live in the swarm.

`AutoDistributedModelForCausalLM.from_pretrained(name, initial_peers=...)` builds a subclass of the model's
own transformers class (e.g. LlamaForCausalLM) with only the embeddings, final norm and LM head loaded
locally. Its backbone sends hidden states through a `RemoteSequential`, so `generate()`, training loops and
peft work as they do on the local model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DynamicCache,
    PretrainedConfig,
)
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.modeling_outputs import MoeModelOutputWithPast

from swarmllm.adapters import blocks as block_ckpt
from swarmllm.adapters import lora as lora_lib
from swarmllm.client.config import ClientConfig
from swarmllm.client.inference_session import InferenceSession
from swarmllm.client.pipeline import LocalBlocks, Pipeline, split_segments
from swarmllm.client.positions import default_positions
from swarmllm.client.remote_sequential import RemoteSequential
from swarmllm.client.sequence_manager import SequenceManager
from swarmllm.client.session_base import GenerationSession, GenerationStats
from swarmllm.client.tuning import ClientTuning, TuningMode
from swarmllm.models.device import resolve_device, resolve_dtype
from swarmllm.models.ends import client_paths, enter, leave, submodule
from swarmllm.models.family import family_of, longrope_limit, root_of, stack_path
from swarmllm.models.shards import client_key_filter
from swarmllm.models.source import model_display_name, resolve_model
from swarmllm.models.span import load_span, meta_block, refuse_prequantized, text_config

logger = logging.getLogger(__name__)


class RemoteCache(DynamicCache):
    """Stands in for the KV cache inside `generate()`: the real caches live on the servers of `session`.

    Only the length matters to generate (it slices the new tokens from it), so that is all it reports.
    """

    def __init__(self, session: GenerationSession):
        super().__init__()
        self.session = session

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.session.position - self.session.prefix  # prompt-tuning tokens are invisible to generate

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: every server reorders the session's rows as its next step begins."""
        self.session.reorder(beam_idx)

    def crop(self, n: int) -> None:
        """As DynamicCache.crop: drop `-n` tokens from the end for `n <= 0` (0: none), or keep the first `n`
        (the older meaning of a positive `n`). Assisted generation drops rejected draft tokens this way; the
        servers drop them too."""
        held = self.get_seq_length()
        keep = held + n if n <= 0 else min(n, held)
        self.session.rewind(self.session.prefix + max(0, keep))

    @property
    def is_linear(self) -> list[bool]:
        # generate() slices new tokens only if `not all(cache.is_linear)`; an empty cache would say all([]).
        return [False]

    @property
    def is_compileable(self) -> bool:
        return False


class DistributedBackbone(nn.Module):
    """The embeddings and the family's other client modules (models/ends.py) run here; the blocks run remotely
    (or, for trainable blocks, here too). The client modules are taken from the model's own base model and
    kept at the same paths (`embed_tokens`, OPT's `decoder.embed_tokens`), so that names match transformers'."""

    def __init__(self, config: PretrainedConfig, base: nn.Module, layers: RemoteSequential | Pipeline,
                 tuning: ClientTuning | None = None):
        super().__init__()
        self.config, self.family = config, family_of(config)
        for path in client_paths(self.family):
            module = submodule(base, path)
            if module is not None:
                _place(self, path, module)
        self.layers = layers
        self.__dict__["tuning"] = tuning  # registered on the model, not here

    def get_input_embeddings(self) -> nn.Module:
        return self.get_submodule(self.family.embeddings)

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int | None = None) -> Iterator[GenerationSession]:
        """Calls inside continue one server-side session (AutoDistributedModel, as Petals' DistributedModel:
        one session at a time per backbone). A causal LM's own `inference_session` is per thread instead."""
        if self.__dict__.get("_session") is not None:
            raise RuntimeError("an inference session is already active on this model")
        prefix = self.tuning.pre_seq_len if self.tuning is not None else 0
        session = self.layers.inference_session(max_length + prefix, batch_size)
        self.__dict__["_session"] = session
        try:
            yield session
        finally:
            self.__dict__["_session"] = None
            session.close()

    def set_input_embeddings(self, value: nn.Module) -> None:
        _place(self, self.family.embeddings, value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if output_router_logits:  # an MoE model's auxiliary load-balancing loss needs them
            raise ValueError("output_router_logits is not supported through the swarm: the routers run on the "
                             "servers, which return hidden states only")
        embeds = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds  # (batch, seq, embed)
        if cache is None and self.__dict__.get("_session") is not None:
            cache = RemoteCache(self.__dict__["_session"])
        session = cache.session if isinstance(cache, RemoteCache) else None
        past = session.position if session is not None else 0
        prefix = self.tuning.pre_seq_len if self.tuning is not None else 0
        added = prefix if past == 0 else 0
        if added:
            # Prompt tuning: trainable embeddings before the first token; they are stripped from the output.
            embeds = torch.cat([self.tuning.prompts.expand(embeds.shape[0], -1, -1).to(embeds.dtype), embeds], dim=1)
            if session is not None:
                session.prefix = prefix
        if prefix and attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], prefix), attention_mask], 1)
        batch, seq = embeds.shape[:2]
        if position_ids is None or prefix:
            position_ids = default_positions(embeds, past, attention_mask)
        position_ids = position_ids.expand(batch, -1).contiguous()
        hidden = enter(self, self.family, embeds, position_ids)  # (batch, seq, hidden)
        # An all-ones mask carries no information: leave it out so servers use the fast causal path.
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if mask is not None:
            mask = mask.to(torch.int64)
        if session is not None:
            hidden = session.step(hidden, position_ids, mask)
        else:
            hidden = self.layers(hidden, position_ids, mask)
        # The MoE output type: mixture-of-experts heads read its `router_logits` (None: not returned).
        return MoeModelOutputWithPast(last_hidden_state=leave(self, self.family, hidden[:, added:]), cache=cache)


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` at the dotted `path` under `root`, making empty containers on the way."""
    *parents, name = path.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    root.add_module(name, module)


class DistributedMixin:
    """Mixed into the model's own transformers class. Adds sessions and session-aware `generate`."""

    _keys_to_ignore_on_load_unexpected = [r"(^|\.)(layers|h)\.\d+\."]  # blocks are remote: never loaded here
    sequence_manager: SequenceManager
    _trainable_blocks: list[int] = []

    @property
    def backbone(self) -> DistributedBackbone:
        """Where the blocks and the client's modules live: the base model, or OPT's `model.decoder`."""
        return root_of(self, family_of(text_config(self.config)))

    # Per thread, so that several threads can generate concurrently with one model (an API server does).
    _sessions = threading.local()

    @property
    def _active_session(self) -> GenerationSession | None:
        return getattr(self._sessions, str(id(self)), None)

    @_active_session.setter
    def _active_session(self, session: GenerationSession | None) -> None:
        setattr(self._sessions, str(id(self)), session)

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int | None = None) -> Iterator[GenerationSession]:
        """Keep one server-side session across several `generate` calls (each continues where the last ended)."""
        if self._active_session is not None:
            raise RuntimeError("an inference session is already active on this model in this thread")
        prefix = self.tuning.pre_seq_len if self.tuning is not None else 0
        session = self.backbone.layers.inference_session(max_length + prefix, batch_size)
        limit = longrope_limit(text_config(self.config))
        if limit is not None:
            if not isinstance(session, InferenceSession):
                session.close()
                raise ValueError("a longrope model (Phi-3 128k) cannot run blocks on the client in a session yet "
                                 "(local_blocks, trainable_blocks): their caches would not be recomputed past "
                                 f"{limit} tokens as the servers' are")
            session.longrope_limit = limit
        self._active_session = session
        try:
            yield session
        finally:
            self._active_session = None
            session.close()

    def forward(self, *args, **kwargs):
        """The model's own forward. Inside `inference_session()`, a call without a cache continues the session
        (Petals' form: `with model.inference_session(...): model(next_ids)`): each call's tokens follow the
        session's, instead of starting a sequence of their own."""
        session = self._active_session
        if session is not None and kwargs.get("cache") is None and len(args) < 4:  # cache is forward's 4th argument
            kwargs["cache"] = RemoteCache(session)
        return super().forward(*args, **kwargs)

    @property
    def generation_stats(self) -> GenerationStats | None:
        """What this thread's last `generate` call cost: round trips per token and, with draft tokens (an
        assistant model, prompt lookup), how many were accepted. Also logged at INFO."""
        return getattr(self._sessions, f"stats{id(self)}", None)

    @property
    def active_adapter(self) -> str | None:
        """The named adapter every server applies to this model's requests (None: the base model)."""
        return self.tuning.adapter

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        if name is not None and self.tuning.lora_spec is not None:
            raise ValueError("a model training its own LoRA weights cannot also use a named adapter")
        self.tuning.adapter = name

    def save_adapter(self, path: str | Path) -> Path:
        """Write the trained tuning parameters: LoRA and ptune in the standard peft format, deep_ptune as
        `swarmllm_prompts.safetensors`. Trainable blocks are saved separately with `save_blocks`."""
        path = Path(path)
        t = self.tuning
        if t is None or t.mode is None:
            raise ValueError("this model has no tuning parameters (load it with tuning_mode=...)")
        if t.mode == "lora":
            weights = {b: {p: (a.detach(), bb.detach()) for p, (a, bb) in m.items()} for b, m in t.lora_weights().items()}
            stack = stack_path(self, family_of(text_config(self.config)))
            lora_lib.save_peft(path, weights, t.lora_spec, stack, self._swarm_model_name)
        else:
            save_prompts(path, t, self.config, self._swarm_model_name)
        return path

    def save_blocks(self, path: str | Path) -> Path:
        """Write the blocks trained on the client (`trainable_blocks`) as a block checkpoint."""
        local = {b.start + i: layer for b in self._local_blocks() for i, layer in enumerate(b.span.layers)
                 if b.start + i in self._trainable_blocks}
        if not local:
            raise ValueError("this model trains no whole blocks (load it with trainable_blocks=[...])")
        block_ckpt.save_blocks(Path(path), self._swarm_model_name, local, self._base_hashes)
        return Path(path)

    def _local_blocks(self) -> list[LocalBlocks]:
        layers = self.backbone.layers
        return [s for s in layers.segments if isinstance(s, LocalBlocks)] if isinstance(layers, Pipeline) else []

    def generate(self, inputs: torch.Tensor | None = None, *args, session: GenerationSession | None = None, **kwargs):
        """transformers' generate through the swarm. `session` (Petals' meaning): continue in that inference
        session, as inside `with model.inference_session(...)`."""
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if self.__dict__.get("small_model") is not None:  # AutoDistributedSpeculativeModel
            kwargs.setdefault("assistant_model", self.__dict__["small_model"])
        config = kwargs.get("generation_config") or self.generation_config
        beams = (kwargs.get("num_beams") or config.num_beams or 1) > 1
        session = session if session is not None else self._active_session
        if beams and session is not None:
            # After beam search the servers hold the beams' rows, not the sequences returned: nothing to go on from.
            raise ValueError("beam search runs in a session of its own: call generate(num_beams=...) outside "
                             "inference_session()")
        if session is None:
            embeds = kwargs.get("inputs_embeds")
            max_length = _max_length(self.generation_config, kwargs, inputs if embeds is None else embeds[..., 0])
            with self.inference_session(max_length) as session:
                return self._generate_in(session, inputs, *args, **kwargs)
        return self._generate_in(session, inputs, *args, **kwargs)

    def _generate_in(self, session: GenerationSession, inputs, *args, **kwargs):
        mask = kwargs.pop("attention_mask", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and inputs is None and session.output_ids is not None:
            raise ValueError("inputs_embeds can start a session's generation only: continue it with input_ids")
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
        before = dataclasses.replace(session.counters)
        out = super().generate(inputs, *args, attention_mask=mask, cache=RemoteCache(session), **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        # transformers returns the prompt and the new tokens; an embedded prompt's are new tokens only, and a
        # call without inputs starts from its own BOS token.
        given = 0 if embeds is not None and inputs is None else 1 if inputs is None else inputs.shape[1]
        stats = GenerationStats.between(before, session.counters, sequences.shape[1] - given)
        setattr(self._sessions, f"stats{id(self)}", stats)
        logger.info("generate: %s", stats)
        if embeds is not None and inputs is None:
            # transformers returns only the new tokens; the session also holds the embedded prompt, which
            # placeholders stand for, so that a later call continues at the right position.
            fill = self.generation_config.pad_token_id or 0
            sequences = torch.cat([sequences.new_full((sequences.shape[0], embeds.shape[1]), fill), sequences], 1)
        if mask is None:  # no inputs, or an embedded prompt: no padding anywhere
            mask = torch.ones_like(sequences)
        session.output_ids = sequences
        session.attention_mask = torch.cat([mask, mask.new_ones(mask.shape[0], sequences.shape[1] - mask.shape[1])], 1)
        return out


def _max_length(generation_config, kwargs: dict, inputs: torch.Tensor | None) -> int:
    """The tokens a generate call's session must be able to hold. Prompt lookup may check drafts past the
    requested length (transformers bounds its drafts by the text so far, not by max_length, and cuts the output
    afterwards), so the session has room for one more step of drafts."""
    prompt = 0 if inputs is None else inputs.shape[-1]
    config = kwargs.get("generation_config") or generation_config
    drafts = kwargs.get("prompt_lookup_num_tokens", config.prompt_lookup_num_tokens) or 0
    new = kwargs.get("max_new_tokens", config.max_new_tokens)
    if new is not None:
        return prompt + new + drafts
    return kwargs.get("max_length", config.max_length) + drafts


class AutoDistributedModelForCausalLM:
    """Factory: `from_pretrained(name, initial_peers=[...])` returns a distributed model of the right class."""

    _auto: type = AutoModelForCausalLM  # which of the model's transformers classes the client builds on

    @classmethod
    def from_pretrained(
        cls,
        name: str | Path,
        initial_peers: list[str] | tuple[str, ...] = (),
        *,
        config: ClientConfig | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        tuning_mode: TuningMode | None = None,
        pre_seq_len: int = 0,
        lora: lora_lib.LoraSpec | None = None,
        init_adapter: str | Path | None = None,
        trainable_blocks: list[int] | tuple[int, ...] = (),
        torch_dtype: torch.dtype | str | None = None,
        **client_options,
    ):
        """Build the distributed model. Tuning: `tuning_mode` ("ptune" and "deep_ptune" with `pre_seq_len`,
        "lora" with `lora`, a LoraSpec, or LoRA weights to train further from `init_adapter`, a peft folder);
        `trainable_blocks` run on the client as trainable modules. Client options (initial_peers,
        adapter, block_override, ...) are those of `ClientConfig`; `dtype` and `device`, when given, override
        the config's (default: from the device, see `swarmllm.models.device`). `torch_dtype` is `dtype`'s
        older name, which most transformers code still passes."""
        if torch_dtype is not None:
            if dtype is not None and dtype != torch_dtype:
                raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree: give one")
            dtype = torch_dtype
        client = config or ClientConfig(initial_peers=list(initial_peers), **client_options)
        if client.num_threads:
            torch.set_num_threads(client.num_threads)
        where = resolve_device(device if device is not None else client.device)
        dtype = resolve_dtype(dtype if dtype is not None else client.dtype, where)
        # Only the embeddings, norm and head, unless blocks run here too (their spans are known only later).
        model_dir = resolve_model(name, tensors=None if trainable_blocks or client.local_blocks else client_key_filter)
        hf_config = AutoConfig.from_pretrained(model_dir)
        refuse_prequantized(hf_config)
        family_of(text_config(hf_config))
        mapping = cls._auto._model_mapping
        if type(hf_config) not in mapping:
            raise ValueError(f"{cls._auto.__name__} has no class for model type {hf_config.model_type!r}")
        dist_cls = _distributed_class(mapping[type(hf_config)])
        # Load with zero blocks: transformers then reads only embeddings, norm and head, with its own
        # handling of tied weights and computed buffers.
        local_config = _without_blocks(hf_config)
        model = dist_cls.from_pretrained(model_dir, config=local_config, dtype=dtype)
        model.config = hf_config
        text = text_config(hf_config)
        num_blocks = text.num_hidden_layers
        trainable = sorted(set(trainable_blocks))
        if any(not 0 <= b < num_blocks for b in trainable):
            raise ValueError(f"trainable_blocks must be within 0:{num_blocks}, got {trainable}")
        private = _private_blocks(client, num_blocks)
        if private and (tuning_mode == "lora" or init_adapter is not None):
            raise ValueError("local_blocks cannot be combined with LoRA training yet: the local blocks would get no LoRA")
        local = sorted(set(trainable) | private)
        embed_size = model.get_input_embeddings().embedding_dim
        tuning = _make_tuning(tuning_mode, text, num_blocks, pre_seq_len, lora, init_adapter, local, client, embed_size)
        manager = SequenceManager.join(client, model_display_name(name), num_blocks)
        model.sequence_manager = manager
        model._swarm_model_name = model_display_name(name)
        if tuning_mode is not None or trainable:
            model.requires_grad_(False)  # the base model stays frozen; only tuning parameters train
        model.tuning = tuning
        layers: RemoteSequential | Pipeline = RemoteSequential(manager, tuning=tuning)
        model._trainable_blocks = trainable
        if local:
            layers = _pipeline(manager, tuning, model_dir, dtype, num_blocks, local, set(trainable))
            model._base_hashes = block_ckpt.base_hashes(model_dir, trainable)
        family = family_of(text)
        backbone = DistributedBackbone(text, root_of(model, family), layers, tuning)
        if family.root:  # OPT's head calls `model.decoder`
            setattr(model.base_model, family.root, backbone)
        elif model.base_model is not model:
            setattr(model, model.base_model_prefix, backbone)
        # Embeddings, norm, head, client-side blocks and tuning parameters (registered as `model.tuning`) all
        # move; tuning parameters keep their identity, so optimizers made afterwards see the moved ones.
        return cls._finish(model, backbone, tuning_mode is not None or bool(trainable)).to(where).eval()

    @classmethod
    def _finish(cls, model: nn.Module, backbone: DistributedBackbone, tuned: bool) -> nn.Module:
        return model


class AutoDistributedModelForSequenceClassification(AutoDistributedModelForCausalLM):
    """A classifier over the swarm's blocks (`<Model>ForSequenceClassification`): Petals' way to fine-tune one
    is prompt tuning, which trains the prompts and, here as there, the classification head."""

    _auto = AutoModelForSequenceClassification

    @classmethod
    def _finish(cls, model: nn.Module, backbone: DistributedBackbone, tuned: bool) -> nn.Module:
        if tuned:  # the head is new for the task (its checkpoint rarely has one): it trains with the prompts
            prefix = model.base_model_prefix + "."
            for name, param in model.named_parameters():
                if not name.startswith(prefix) and not name.startswith("tuning."):
                    param.requires_grad_(True)
        return model


class AutoDistributedModel(AutoDistributedModelForCausalLM):
    """The backbone alone (`<Model>Model`): embeddings, the swarm's blocks and the final norm, returning hidden
    states; `inference_session` keeps server caches across calls, as Petals' DistributedModel does."""

    _auto = AutoModel

    @classmethod
    def _finish(cls, model: nn.Module, backbone: DistributedBackbone, tuned: bool) -> nn.Module:
        del backbone.__dict__["tuning"]
        backbone.add_module("tuning", model.tuning)  # registered here, so optimizers see the tuning parameters
        backbone.sequence_manager = model.sequence_manager
        return backbone


class AutoDistributedSpeculativeModel(AutoDistributedModelForCausalLM):
    """Petals' speculative generation, as a name over transformers' assisted generation: `generate` drafts
    with `small_model` (a local model with the same tokenizer) and checks the drafts through the swarm in one
    step, unless the call passes its own `assistant_model`."""

    @classmethod
    def from_pretrained(cls, name: str | Path, *args, small_model: nn.Module, **kwargs) -> nn.Module:
        model = super().from_pretrained(name, *args, **kwargs)
        model.__dict__["small_model"] = small_model  # not a submodule: its weights are not the model's own
        return model


def _distributed_class(base_cls: type) -> type:
    """`Distributed<Base>`: the mixin on the model's own class. transformers finds some checkpoint conversions
    by class name (GPT-NeoX's head is stored as `embed_out` and held as `lm_head`), so the new name gets the
    base class's."""
    name = f"Distributed{base_cls.__name__}"
    own = get_checkpoint_conversion_mapping(base_cls.__name__)
    if own is not None:
        register_checkpoint_conversion_mapping(name, own, overwrite=True)
    return type(name, (DistributedMixin, base_cls), {})


def _make_tuning(mode, text: PretrainedConfig, num_blocks: int, pre_seq_len: int, lora_config, init_adapter,
                 local: list[int], client: ClientConfig, embed_size: int) -> ClientTuning:
    init = None
    if init_adapter is not None:
        if mode not in (None, "lora"):
            raise ValueError("init_adapter continues training a LoRA adapter: use tuning_mode='lora'")
        mode = "lora"
        lora_config, init = lora_lib.load_peft(Path(init_adapter))
    if mode == "lora":
        lora_config = lora_config or lora_lib.LoraSpec()
        block = meta_block(text, 0)
        paths = lora_lib.target_paths(block, lora_config.target_modules)
        remote = [b for b in range(num_blocks) if b not in local]
        fresh = {b: lora_lib.init_weights(block, paths, lora_config.rank) for b in remote}
        if init is not None:
            for b in remote:
                fresh[b].update({p: (a.clone(), bb.clone()) for p, (a, bb) in init.get(b, {}).items() if p in fresh[b]})
        init = fresh
    elif mode is not None and mode not in ("ptune", "deep_ptune"):
        raise ValueError(f"tuning_mode must be one of ptune, deep_ptune, lora; got {mode!r}")
    return ClientTuning(mode, num_blocks, text.hidden_size, pre_seq_len, lora_config, init, adapter=client.adapter,
                        embed_size=embed_size)


def _private_blocks(client: ClientConfig, num_blocks: int) -> set[int]:
    """Blocks run on the client for privacy (`local_blocks`): the first K, and the last K if asked."""
    k = client.local_blocks
    private = set(range(k)) | (set(range(num_blocks - k, num_blocks)) if client.local_last_blocks else set())
    if k and len(private) >= num_blocks:
        raise ValueError(f"local_blocks={k} would run all {num_blocks} blocks on the client: nothing left for the swarm")
    return private


def _pipeline(manager: SequenceManager, tuning: ClientTuning, model_dir: Path, dtype: torch.dtype, num_blocks: int,
              local: list[int], trainable: set[int]) -> Pipeline:
    """Remote spans and client-side blocks in order; only `trainable` client blocks get gradients (the others
    run here for privacy, frozen)."""
    segments: list[nn.Module] = []
    for start, end, is_local in split_segments(num_blocks, set(local)):
        if is_local:
            span = load_span(model_dir, start, end, dtype)
            for i, layer in enumerate(span.layers):
                layer.requires_grad_(start + i in trainable)
            segments.append(LocalBlocks(span, tuning))
        else:
            segments.append(RemoteSequential(manager, start, end, tuning))
    return Pipeline(segments)


def save_prompts(path: Path, tuning: ClientTuning, config: PretrainedConfig, model_name: str) -> None:
    """ptune: peft's PROMPT_TUNING format. deep_ptune has no peft equivalent: swarmllm's own file."""
    path.mkdir(parents=True, exist_ok=True)
    text = text_config(config)
    if tuning.mode == "ptune":
        save_file({"prompt_embeddings": tuning.prompts.detach()[0].contiguous()}, str(path / lora_lib.PEFT_WEIGHTS))
        (path / lora_lib.PEFT_CONFIG).write_text(json.dumps({
            "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": tuning.pre_seq_len,
            "token_dim": tuning.prompts.shape[-1], "num_transformer_submodules": 1,
            "num_attention_heads": text.num_attention_heads, "num_layers": text.num_hidden_layers,
            "prompt_tuning_init": "RANDOM", "inference_mode": True, "base_model_name_or_path": model_name,
        }, indent=2))
    else:
        save_file({"prompts": tuning.prompts.detach().contiguous(), "deep_prompts": tuning.deep_prompts.detach().contiguous()},
                  str(path / "swarmllm_prompts.safetensors"))


def _without_blocks(config: PretrainedConfig) -> PretrainedConfig:
    config = copy.deepcopy(config)
    text = config.get_text_config(decoder=True)
    text.num_hidden_layers = 0
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = []
    return config
