"""Run the HTTP app: `swarmllm api` (until Ctrl-C) and `swarmllm local` (in a background thread)."""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn

from swarmllm.api.app import create_app
from swarmllm.api.config import ApiConfig
from swarmllm.api.engine import Engine
from swarmllm.client.config import ClientConfig
from swarmllm.client.transport import HivemindTransport
from swarmllm.observe.snapshot import collect

logger = logging.getLogger(__name__)


def swarm_engine(config: ApiConfig, client: ClientConfig, model=None) -> Engine:
    """An engine over the distributed model (built here unless given, e.g. by `swarmllm local`)."""
    from transformers import AutoTokenizer

    from swarmllm.client.model import AutoDistributedModelForCausalLM
    from swarmllm.models.shards import no_tensors
    from swarmllm.models.source import model_display_name, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model, tensors=no_tensors))
    model = model or AutoDistributedModelForCausalLM.from_pretrained(config.model, config=client)
    return Engine(model, tokenizer, model_display_name(config.model), config)


class ApiServer:
    """The app on a socket bound at construction, so the URL (and a port chosen by the OS) is known before
    it serves. `run()` blocks; `start()` serves from a thread and returns once it accepts connections."""

    def __init__(self, engine: Engine, port: int | None = None):
        """`port`: instead of the config's (e.g. 0 when the configured one is taken)."""
        self.engine = engine
        config = engine.config
        manager = getattr(engine.model, "sequence_manager", None)
        snapshot = None
        # The monitor pings servers over libp2p and reads the DHT itself: only a hivemind client has one.
        if manager is not None and isinstance(manager.transport, HivemindTransport):
            transport, name = manager.transport, manager.model_name

            def snapshot():
                return collect(transport.peer, transport.p2p, models=[name])
        app = create_app(engine, snapshot, config.monitor_refresh)
        self.socket = socket.create_server((config.host, config.port if port is None else port))
        host, port = self.socket.getsockname()[:2]
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                                    timeout_graceful_shutdown=3))
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self.run, name="swarmllm-http", daemon=True)
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the API server failed to start")
            self._thread.join(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.engine.shutdown()


def ready_line(url: str, model_id: str) -> str:
    """The line launchers and tests wait for."""
    return f"api ready: {url} serves {model_id} (chat {url}/, monitor {url}/monitor, OpenAI API {url}/v1)"
