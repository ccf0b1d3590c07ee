"""swarmllm: run large language models across a swarm of peers.

Only the public API is re-exported here, lazily, so that `import swarmllm` stays cheap and has no side
effects (no torch import, no DHT) until a name is actually used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["AutoDistributedModel", "AutoDistributedModelForCausalLM", "AutoDistributedModelForSequenceClassification",
           "AutoDistributedSpeculativeModel", "ClientConfig", "LoraSpec", "ServerConfig", "__version__"]

if TYPE_CHECKING:
    from swarmllm.adapters.lora import LoraSpec
    from swarmllm.client.config import ClientConfig
    from swarmllm.client.model import (
        AutoDistributedModel,
        AutoDistributedModelForCausalLM,
        AutoDistributedModelForSequenceClassification,
        AutoDistributedSpeculativeModel,
    )
    from swarmllm.server.config import ServerConfig

_LAZY = {
    "AutoDistributedModel": "swarmllm.client.model",
    "AutoDistributedModelForCausalLM": "swarmllm.client.model",
    "AutoDistributedModelForSequenceClassification": "swarmllm.client.model",
    "AutoDistributedSpeculativeModel": "swarmllm.client.model",
    "ClientConfig": "swarmllm.client.config",
    "LoraSpec": "swarmllm.adapters.lora",
    "ServerConfig": "swarmllm.server.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'swarmllm' has no attribute {name!r}")
