"""The HTTP app: OpenAI-compatible routes, the swarm snapshot, and the web UI's pages.

Routes:
- `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (streaming as server-sent events);
- `GET /api/swarm`: the swarm snapshot (observe/snapshot.py) that the monitor page draws;
- `GET /metrics`: the API host's Prometheus metrics (api/metrics.py);
- `GET /` the chat page, `GET /monitor` the swarm monitor, `/static/*` their scripts and styles.

With ApiConfig.api_keys_file set, every route but the pages needs `Authorization: Bearer KEY` (api/auth.py).

Every error, ours or a malformed request's, is answered in OpenAI's format; nothing a request sends can
stop the app. Bodies are parsed here rather than by a framework, so each kind of bad input gets its own
status and message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from swarmllm.api import schemas
from swarmllm.api.auth import ApiKeys, guarded
from swarmllm.api.engine import Engine, as_api_error
from swarmllm.api.errors import ApiError
from swarmllm.api.generation import Completion, Piece, Sampling
from swarmllm.observe.snapshot import SwarmSnapshot

logger = logging.getLogger(__name__)

WEB = Path(__file__).parent / "web"
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}
KEY_SCOPE = "swarmllm.api_key"  # ASGI scope entry: the name of the API key a request came with
R = TypeVar("R", bound=schemas.Request)


def create_app(engine: Engine, snapshot: Callable[[], SwarmSnapshot] | None = None, refresh: float = 2.0):
    """`snapshot`: reads the swarm (blocking); None where there is no swarm (a local model)."""
    cached = _Cached(snapshot, refresh) if snapshot is not None else None

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "swarmllm"}]})

    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, schemas.ChatRequest, engine)
        prompt = engine.chat_prompt(body.chat(), body.template_tools(), body.calls_tools)
        return await _complete(request, engine, body, [prompt], chat=True)

    async def completions(request: Request) -> Response:
        body = await _parse(request, schemas.CompletionRequest, engine)
        prompts = engine.text_prompts(body.prompt)
        return await _complete(request, engine, body, prompts, chat=False)

    async def swarm(request: Request) -> Response:
        if cached is None:
            raise ApiError(404, "this API serves a local model: there is no swarm to show", code="no_swarm")
        try:
            snap = await cached.get()
        except Exception as e:
            raise ApiError(503, f"could not read the swarm: {type(e).__name__}: {e}", code="swarm_unreadable") from None
        return JSONResponse(snap.model_dump(mode="json"))

    async def metrics(request: Request) -> Response:
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    def page(name: str):
        async def serve(request: Request) -> Response:
            return FileResponse(WEB / name, headers={"Cache-Control": "no-cache"})
        return serve

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/api/swarm", swarm, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", page("chat.html"), methods=["GET"]),
        Route("/monitor", page("monitor.html"), methods=["GET"]),
        Mount("/static", StaticFiles(directory=WEB), name="static"),
    ]

    async def api_error(request: Request, e: ApiError) -> Response:
        return JSONResponse(e.body(), status_code=e.status)

    async def http_error(request: Request, e: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return JSONResponse(ApiError(e.status_code, message.get(e.status_code, str(e.detail))).body(),
                            status_code=e.status_code)

    async def internal_error(request: Request, e: Exception) -> Response:
        error = as_api_error(e)
        return JSONResponse(error.body(), status_code=error.status)

    # (Starlette types each handler as taking any Exception; each of these takes only its own class.)
    handlers: dict[Any, Callable] = {ApiError: api_error, HTTPException: http_error, Exception: internal_error}
    app: Starlette | _RequireKey = Starlette(routes=routes, exception_handlers=handlers)
    if engine.config.api_keys_file is not None:
        app = _RequireKey(app, ApiKeys(engine.config.api_keys_file), engine.metrics)
    return _CountResponses(app, engine.metrics, {r.path for r in routes if isinstance(r, Route)})


class _RequireKey:
    """ASGI wrapper that answers 401 (OpenAI's `invalid_api_key`) to a guarded route without a valid key."""

    def __init__(self, app, keys: ApiKeys, metrics):
        self.app, self.keys, self.metrics = app, keys, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and guarded(scope["path"]):
            headers = dict(scope["headers"])
            name = self.keys.identify(headers.get(b"authorization", b"").decode("latin-1"))
            if name is None:
                error = ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                request = Request(scope, receive)
                await _drain(request, request.stream(), 0)  # answering mid-upload would reset the connection
                await response(scope, receive, send)
                return
            self.metrics.key_requests.labels(name).inc()
            scope = {**scope, KEY_SCOPE: name}  # the completion's tokens are counted under this name
        await self.app(scope, receive, send)


class _CountResponses:
    """ASGI wrapper that counts every response by route and status (`swarmllm_api_requests_total`)."""

    def __init__(self, app, metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


_DRAIN_BYTES = 64 << 20


async def _drain(request: Request, chunks: AsyncIterator[bytes], read: int) -> None:
    """Read and drop the rest of a refused body (401, 413) before answering. A client still writing its body
    when we close the connection gets a reset instead of our answer (seen in CI with a 3 MB prompt).
    Past _DRAIN_BYTES the client gets the reset: reading a huge body costs more than a clear error is worth.
    `chunks`: the body's stream, `read` bytes of it already read."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > _DRAIN_BYTES:
        return
    async for chunk in chunks:
        read += len(chunk)
        if read > _DRAIN_BYTES:
            return


async def _parse(request: Request, schema: type[R], engine: Engine) -> R:
    limit = engine.config.max_body_bytes
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        await _drain(request, request.stream(), 0)
        raise ApiError(413, f"the request body is {size} bytes; this server accepts at most {limit}")
    raw = b""
    chunks = request.stream()
    async for chunk in chunks:
        raw += chunk
        if len(raw) > limit:
            await _drain(request, chunks, len(raw))
            raise ApiError(413, f"the request body exceeds {limit} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # Pydantic names the union member it tried (`stop.str`, `prompt.list[int]`): not part of the param.
        loc = [p for p in err["loc"] if isinstance(p, int) or p.isidentifier() and p not in _TYPE_TAGS]
        param = ".".join(str(p) for p in loc) or None
        raise ApiError(400, f"invalid value for '{param}': {err['msg']}" if param else err["msg"], param=param) from None
    if body.model != engine.model_id:
        raise ApiError(404, f"the model '{body.model}' does not exist here; this server serves '{engine.model_id}'",
                       param="model", code="model_not_found")
    return body


async def _complete(request: Request, engine: Engine, body: schemas.ChatRequest | schemas.CompletionRequest, prompts: list[list[int]],
                    chat: bool) -> Response:
    """`n` choices for each prompt (completions take a batch of prompts), as OpenAI orders them: choice
    index = prompt index x n + choice."""
    if len(prompts) * (body.n or 1) > schemas.MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n={body.n or 1} choices is over {schemas.MAX_CHOICES} "
                            "completions per request", param="prompt" if len(prompts) > 1 else "n")
    samplings = [body.samplings(engine.budget(p, body.requested_tokens)) for p in prompts]
    # Off the event loop: the first constrained request builds the vocabulary (~0.5 s), check_swarm may ask the DHT.
    await asyncio.get_running_loop().run_in_executor(None, engine.check_sampling, samplings[0][0])
    await asyncio.get_running_loop().run_in_executor(None, engine.check_swarm)
    rid = schemas.new_id("chatcmpl" if chat else "cmpl")
    calls_tools = isinstance(body, schemas.ChatRequest) and body.calls_tools
    echo = isinstance(body, schemas.CompletionRequest) and body.echo
    echoes = [engine.tokenizer.decode(p, skip_special_tokens=True) if echo else "" for p in prompts
              for _ in samplings[0]]
    key = request.scope.get(KEY_SCOPE)
    streams = [engine.stream(p, s, endpoint=request.url.path, key=key)  # one per choice
               for p, ss in zip(prompts, samplings) for s in ss]
    if body.stream:
        # Fail before the 200 if the request cannot even start (full, swarm gone): the first item of a
        # stream is only produced once decoding runs, so admission errors surface here.
        firsts = await _firsts(streams)
        events = _events(streams, firsts, rid, engine.model_id, chat, body.include_usage, echoes, samplings[0][0],
                         body.n or 1, calls_tools)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    choices = await _until_done(request, streams)
    return JSONResponse(schemas.chat_response(rid, engine.model_id, choices, calls_tools) if chat
                        else schemas.text_response(rid, engine.model_id, choices, echoes, body.n or 1))


Stream = AsyncGenerator[Piece | Completion, None]


async def _firsts(streams: list[Stream]) -> list[Piece | Completion]:
    """The first item of every stream, awaited together (each starts its own decoding); if any fails, all
    are closed and its error raised."""
    firsts = await asyncio.gather(*(anext(p) for p in streams), return_exceptions=True)
    items = [f for f in firsts if not isinstance(f, BaseException)]
    if len(items) < len(firsts):
        await _close(streams)
        raise next(f for f in firsts if isinstance(f, BaseException))
    return items


async def _close(streams: list[Stream], tasks: Sequence[asyncio.Task] = ()) -> None:
    """Stop the tasks iterating `streams`, then close the streams: their decoding is cancelled. (A stream
    cannot be closed while a task is inside it.)"""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for p in streams:
        await p.aclose()


async def _until_done(request: Request, streams: list[Stream]) -> list[Completion]:
    """Every stream's Completion; stop decoding if the client hangs up while waiting (nobody reads the
    answer), or at the first failure."""

    async def consume(pieces: Stream) -> Completion:
        async for item in pieces:
            if isinstance(item, Completion):
                return item
        raise ApiError(500, "the completion ended without a result")

    tasks = [asyncio.ensure_future(consume(p)) for p in streams]
    try:
        while True:
            done, pending = await asyncio.wait(tasks, timeout=0.5, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if (error := t.exception()) is not None:
                    raise error
            if not pending:
                return [t.result() for t in tasks]
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the connection")
    finally:
        await _close(streams, [t for t in tasks if not t.done()])


async def _events(streams: list[Stream], firsts: list[Piece | Completion], rid: str, model: str, chat: bool,
                  include_usage: bool, echoes: list[str], sampling: Sampling, n: int,
                  calls_tools: bool = False) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's shape, every choice's chunks as they come, each with its index. When the
    client disconnects, Starlette cancels this generator; closing the streams then cancels the decoding.
    `n`: choices per prompt. `calls_tools`: a reply may be tool calls, known only once it ends; its text is
    held back until then, and goes out as one `tool_calls` or `content` delta."""
    created = int(time.time())
    offsets = [0] * len(streams)  # completions' text_offset per choice (see schemas.text_logprobs)

    def chunk(i: int, text: str | None = None, finish: str | None = None, role: bool = False, entries=None) -> str:
        scored = sampling.logprobs is not None and entries is not None
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            data = schemas.chat_chunk(rid, model, created, i, delta, finish,
                                      schemas.chat_logprobs(entries) if scored else None)
        else:
            data = schemas.text_chunk(rid, model, created, i, text or "", finish,
                                      schemas.text_logprobs(entries, offsets[i]) if scored else None)
            offsets[i] += sum(len(e.token) for e in entries) if scored else 0
        return f"data: {json.dumps(data)}\n\n"

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, pieces: Stream) -> None:
        try:
            async for item in pieces:
                queue.put_nowait((i, item))
        except Exception as e:  # delivered as an error event
            queue.put_nowait((i, e))

    for i, first in enumerate(firsts):
        queue.put_nowait((i, first))
    tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(streams)]
    finished: dict[int, Completion] = {}
    held: dict[int, list] = {}  # logprobs of held-back text, per choice (calls_tools)
    try:
        for i in range(len(streams)):
            if chat:
                yield chunk(i, role=True)
            elif echoes[i] and not sampling.prompt_logprobs:
                yield chunk(i, echoes[i])  # else it goes out with the prompt's logprobs, once the prefill computed them
        while len(finished) < len(streams):
            i, item = await queue.get()
            if isinstance(item, Exception):  # the status line is gone: OpenAI clients raise on an error event
                yield f"data: {json.dumps(as_api_error(item).body())}\n\n"
                break
            if isinstance(item, Completion):
                finished[i] = item
                finish: str = item.finish_reason
                if calls_tools:
                    message, finish = schemas.chat_message(item, True)
                    yield _held_reply(chunk(i, message["content"], entries=held.pop(i, None)), message, rid, model,
                                      created, i)
                yield chunk(i, finish=finish)
            elif calls_tools:
                held.setdefault(i, []).extend(item.logprobs)
            elif item.prompt_logprobs is not None:
                yield chunk(i, echoes[i], entries=item.prompt_logprobs)
            elif item.text or item.logprobs:
                yield chunk(i, item.text, entries=item.logprobs)
        else:
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                choices = [finished[i] for i in range(len(streams))]
                yield f"data: {json.dumps(schemas.usage_chunk(rid, model, created, obj, choices, n))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await _close(streams, tasks)


def _held_reply(content_chunk: str, message: dict, rid: str, model: str, created: int, i: int) -> str:
    """A held-back reply as one event: its text (`content_chunk`), or its tool calls, each with its index."""
    if "tool_calls" not in message:
        return content_chunk
    calls = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
    return f"data: {json.dumps(schemas.chat_chunk(rid, model, created, i, {'tool_calls': calls}))}\n\n"


class _Cached:
    """One swarm snapshot at a time, reused for `refresh` seconds: many open monitors cost one DHT read."""

    def __init__(self, read: Callable[[], SwarmSnapshot], refresh: float):
        self.read, self.refresh = read, refresh
        self.value: SwarmSnapshot | None = None
        self.taken = 0.0
        self.lock = asyncio.Lock()

    async def get(self) -> SwarmSnapshot:
        async with self.lock:
            if self.value is None or time.monotonic() - self.taken > self.refresh:
                self.value = await asyncio.get_running_loop().run_in_executor(None, self.read)
                self.taken = time.monotonic()
            return self.value

