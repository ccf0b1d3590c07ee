"""The model behind the API: prompts to tokens, limits, and completions on worker threads.

Each completion runs on its own worker thread with its own server-side session, so concurrent requests
decode concurrently: the servers batch their steps, and with `batch_heads` this host computes the LM head
of their decode steps in one pass (client/head_batch.py). Admission is bounded: `max_concurrent_requests` decode,
`max_queued_requests` wait, and the rest get 429 at once instead of piling up. A request whose client goes
away sets its cancel flag; its thread stops at the next token and closes the session, freeing the servers'
cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor

from swarmllm.api import tool_calls
from swarmllm.api.config import ApiConfig
from swarmllm.api.constrained import Vocabulary
from swarmllm.api.errors import ApiError
from swarmllm.api.generation import Completion, Piece, Sampling, complete
from swarmllm.api.metrics import ApiMetrics
from swarmllm.client.head_batch import HeadBatcher
from swarmllm.models.span import text_config

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, model, tokenizer, model_id: str, config: ApiConfig):
        self.model, self.tokenizer, self.model_id, self.config = model, tokenizer, model_id, config
        limit = getattr(text_config(model.config), "max_position_embeddings", None) or 2048
        self.context = min(config.max_context or limit, limit)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos = frozenset(eos)
        self.heads = HeadBatcher.install(model) if config.batch_heads else None
        self.executor = ThreadPoolExecutor(config.max_concurrent_requests, thread_name_prefix="swarmllm-api")
        self._admitted = 0
        self._lock = threading.Lock()
        self.metrics = ApiMetrics()
        self._vocabulary: Vocabulary | None = None  # built on the first constrained request (~0.5 s)
        self._vocabulary_lock = threading.Lock()

    # Prompts

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None, calls_tools: bool = False) -> list[int]:
        """`tools` rendered by the template; `calls_tools`: the reply may call them (tool_choice is not 'none')."""
        template = self.tokenizer.chat_template
        if template is None:
            raise ApiError(400, f"model {self.model_id} has no chat template: use /v1/completions", param="messages")
        cannot = tool_calls.template_error(str(template))
        if cannot and calls_tools:
            raise ApiError(400, f"{cannot}: call model {self.model_id} without tools, or with tool_choice 'none'",
                           param="tools")
        if cannot and any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            raise ApiError(400, f"{cannot}, so it cannot show tool calls and results", param="messages")
        if cannot:
            tools = None  # tool_choice 'none': the reply calls none, and this template cannot show them
        try:
            ids = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                     return_dict=True)["input_ids"]
        except Exception as e:  # a template may refuse e.g. two user turns in a row
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None
        return list(ids)

    def text_prompts(self, prompt: str | list) -> list[list[int]]:
        """A completions request's prompts as token ids: a string, a token-id list, or a batch of either."""
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            prompt = [prompt]
        return [self._text_prompt(p) for p in prompt]

    def _text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"token ids must be within 0:{vocab}", param="prompt")
            ids = list(prompt)
        else:
            ids = self.tokenizer(prompt).input_ids
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return ids

    def budget(self, prompt: list[int], requested: int | None) -> int:
        """Tokens to generate: as requested, or the default, within the context (OpenAI's error past it)."""
        room = self.context - len(prompt)
        if requested is not None and requested > room or room < 1:
            want = requested if requested is not None else 1
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you requested "
                                f"{len(prompt) + want} tokens ({len(prompt)} in the prompt, {want} for the completion). "
                                "Please reduce the length of the prompt or the completion.",
                           param="messages", code="context_length_exceeded")
        return requested if requested is not None else min(self.config.default_max_tokens, room)

    @property
    def vocabulary(self) -> Vocabulary:
        with self._vocabulary_lock:
            if self._vocabulary is None:
                self._vocabulary = Vocabulary(self.tokenizer, self.eos)
            return self._vocabulary

    def check_sampling(self, sampling: Sampling) -> None:
        """400 for what the request's schema could not check without the model: logit_bias ids past the
        vocabulary, a JSON schema that cannot be enforced."""
        vocab = text_config(self.model.config).vocab_size  # the LM head's width, which the tokenizer's length may not reach
        bad = [t for t, _ in sampling.logit_bias if t >= vocab]
        if bad:
            raise ApiError(400, f"logit_bias names token ids outside the vocabulary (0:{vocab}): {bad[:5]}",
                           param="logit_bias")
        if sampling.grammar is not None:
            self.vocabulary.check(sampling.grammar, sampling.grammar_param)

    # Running

    def check_swarm(self) -> None:
        """Refuse at once (503) while some blocks have no server, instead of waiting out the client's
        missing_blocks_timeout; the failover inside a completion still waits for a replacement."""
        manager = getattr(self.model, "sequence_manager", None)
        if manager is None:
            return
        from swarmllm.client.routing import MissingBlocksError, missing_blocks

        servers = manager.servers()
        missing = missing_blocks(servers, 0, manager.num_blocks, manager.versions(servers))
        if missing:  # the cached view may predate the servers (a client that just joined): look once more
            servers = manager.servers(force=True)
            missing = missing_blocks(servers, 0, manager.num_blocks, manager.versions(servers))
        if missing:
            raise ApiError(503, f"{MissingBlocksError(missing)} of {self.model_id}: try again when servers hold them",
                           code="missing_blocks")

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        with self._lock:
            if self._admitted >= self.config.max_concurrent_requests + self.config.max_queued_requests:
                raise ApiError(429, "too many requests in progress: try again shortly", code="too_many_requests")
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1

    async def stream(self, prompt: list[int], sampling: Sampling, endpoint: str = "",
                     key: str | None = None) -> AsyncGenerator[Piece | Completion, None]:
        """Pieces of text (with their logprobs) as they become final, then the Completion. Closing the
        iterator early (the client went away) cancels the decoding; its thread then closes the session.
        `key`: the name of the API key it came with, to count its tokens under."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                cancel.set()

        def work() -> None:
            if cancel.is_set():  # cancelled while queued: never open a session
                return
            try:
                vocabulary = self.vocabulary if sampling.grammar is not None else None
                put(complete(self.model, self.tokenizer, prompt, sampling, self.eos, cancel, put, vocabulary,
                             prompt_lookup=self.config.prompt_lookup))
            except BaseException as e:  # delivered to the request, which answers with an error
                put(e)
            finally:
                if self.heads is not None:
                    self.heads.forget()  # this worker decodes no more for now: no head pass waits for it

        m, began, first, finished = self.metrics, time.monotonic(), True, False
        with self.admitted():
            self.executor.submit(work)
            m.in_progress.inc()
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        finished = True  # failed, not cancelled
                        raise as_api_error(item)
                    if first:
                        m.first_token.observe(time.monotonic() - began)
                        first = False
                    if isinstance(item, Completion):
                        finished = True
                        m.prompt_tokens.inc(item.prompt_tokens)
                        m.completion_tokens.inc(item.completion_tokens)
                        if key is not None:
                            m.key_tokens.labels(key, "prompt").inc(item.prompt_tokens)
                            m.key_tokens.labels(key, "completion").inc(item.completion_tokens)
                        m.duration.labels(endpoint).observe(time.monotonic() - began)
                    yield item
                    if isinstance(item, Completion):
                        return
            finally:
                cancel.set()
                m.in_progress.dec()
                if not finished:  # closed early: the client went away
                    m.cancelled.inc()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def as_api_error(e: BaseException) -> ApiError:
    from swarmllm.client.routing import MissingBlocksError
    from swarmllm.client.verification import VerificationError
    from swarmllm.wire import Blame, RemoteError, blame

    if isinstance(e, ApiError):
        return e
    if isinstance(e, MissingBlocksError):
        return ApiError(503, f"the swarm lost servers mid-request: {e}", code="missing_blocks")
    if isinstance(e, VerificationError):
        return ApiError(502, f"servers disagreed on a result and no majority settled it: {e}", code="verification_failed")
    if blame(e) == Blame.BUSY:
        # Every server that could take the request is full or limits us: the swarm is busy, not broken.
        return ApiError(503, f"the swarm is busy: {e}", code="swarm_busy")
    if isinstance(e, RemoteError):
        return ApiError(502, f"a server failed the request: {e}", code="server_error")
    logger.exception("completion failed", exc_info=e)
    return ApiError(500, f"the completion failed: {type(e).__name__}: {e}", code="internal_error")

