"""The OpenAI API's request and response records, as far as swarmllm serves them.

Requests ignore fields we do not know (clients send many), but a field we know and cannot honour (suffix,
best_of > 1, ...) is refused with a clear error rather than silently dropped: docs/openai.md lists them.

`n` > 1 asks for several choices of one prompt: each is its own completion (and server-side session),
decoded concurrently; with a `seed`, choice i samples with seed + i, so every choice is reproducible and
they differ.

Logprobs come in OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes, top_logprobs}]}` and the
legacy completions' `{tokens, token_logprobs, top_logprobs, text_offset}`. `/v1/completions` with `echo`,
`logprobs` and `max_tokens: 0` scores a text (how evaluation harnesses ask for log-likelihoods).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from swarmllm.api import tool_calls
from swarmllm.api.constrained import grammar_for
from swarmllm.api.errors import ApiError
from swarmllm.api.generation import Completion, Sampling, TokenLogprob

MAX_STOPS = 4  # as OpenAI
MAX_CHOICES = 16  # each choice is a session on every server of its route: keep one request's share bounded


# Fields OpenAI defines that swarmllm cannot honour, with the values it can (docs/openai.md lists every field).
_REFUSED: dict[str, tuple[tuple, str]] = {
    "audio": ((None,), "audio output is not supported"),
    "functions": ((None,), "functions are OpenAI's deprecated form of tools: pass tools"),
    "function_call": ((None,), "function_call is OpenAI's deprecated form of tool_choice: pass tools and tool_choice"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "this model does not reason in separate tokens"),
    "service_tier": ((None, "auto", "default"), "there is one service tier"),
    "store": ((None, False), "completions are not stored"),
    "verbosity": ((None,), "verbosity is not supported"),
    "web_search_options": ((None,), "web search is not supported"),
}


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_cannot_be_honoured(cls, data):
        for name, (allowed, why) in _REFUSED.items():
            if isinstance(data, dict) and name in data and data[name] not in allowed:
                raise ApiError(400, f"{name}: {why}", param=name)
        return data

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    user: str | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id (as text) -> bias
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.isdigit():
                raise ApiError(400, f"logit_bias keys are token ids, got {key!r}", param="logit_bias")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return v

    def sampling(self, max_tokens: int) -> Sampling:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        top, prompt = self.logprob_request()
        return Sampling(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,  # OpenAI's defaults
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed, stop=stops,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
            logprobs=top, prompt_logprobs=prompt,
            grammar=self.response_format.grammar() if self.response_format is not None else None,
        )

    def samplings(self, max_tokens: int) -> list[Sampling]:
        """One Sampling per choice (`n`): the same, but for the seed (seed + i), so choices differ."""
        first = self.sampling(max_tokens)
        return [first if first.seed is None else dataclasses.replace(first, seed=first.seed + i)
                for i in range(self.n or 1)]

    def logprob_request(self) -> tuple[int | None, bool]:
        """(alternatives per token, or None for no logprobs; whether to score the prompt too)."""
        return None, False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: Annotated[str, Field(max_length=64)]
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    # OpenAI's strict mode promises output that validates; without it, a best effort. The schema is always
    # enforced here, so both get output that validates.
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text`; `json_object`: some JSON object; `json_schema`: JSON that validates against the schema. The JSON
    modes are enforced token by token (api/constrained.py), so the output parses unless max_tokens cuts it
    short (finish_reason "length")."""

    model_config = ConfigDict(extra="ignore")

    type: str
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _known(self):
        if self.type not in ("text", "json_object", "json_schema"):
            raise ApiError(400, f"response_format {self.type!r} is not one of 'text', 'json_object', 'json_schema'",
                           param="response_format")
        if self.type == "json_schema" and self.json_schema is None:
            raise ApiError(400, "response_format json_schema needs its json_schema", param="response_format")
        return self

    def grammar(self) -> str | None:
        if self.type == "json_object":
            return grammar_for({"type": "object"}, "response_format")
        if self.type == "json_schema":
            schema = self.json_schema.schema_ if self.json_schema is not None else None  # (checked: never None)
            return grammar_for(schema or {}, "response_format")  # OpenAI: no schema, any JSON
        return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self, names: dict[str, str]) -> dict:
        """The message as chat templates take it: "developer" is OpenAI's newer name for "system", tool call
        arguments are objects, and a tool turn carries its function's name (`names`: call id -> name)."""
        out: dict = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": tool_calls.parse_arguments(c.function.arguments)}}
                for c in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            out["name"] = self.name or names.get(self.tool_call_id or "", "")
        return out


class ChatRequest(Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[tool_calls.Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | tool_calls.NamedChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        tool_calls.check_choice(self.tools, self.tool_choice)
        if self.calls_tools and self.response_format is not None and self.response_format.type != "text":
            raise ApiError(400, "response_format cannot constrain a reply that may call tools: pass one or the "
                                "other, or tool_choice 'none'", param="response_format")
        return self

    @property
    def calls_tools(self) -> bool:
        """The reply may be tool calls (OpenAI's default with tools is 'auto')."""
        return bool(self.tools) and self.tool_choice != "none"

    def sampling(self, max_tokens: int) -> Sampling:
        first = super().sampling(max_tokens)
        if not self.calls_tools:
            return first
        grammar = tool_calls.grammar(self.tools or [], self.tool_choice or "auto", self.parallel_tool_calls is not False)
        return dataclasses.replace(first, grammar=grammar, grammar_param="tools")

    def logprob_request(self) -> tuple[int | None, bool]:
        if not self.logprobs:
            return None, False
        return self.top_logprobs or 0, False

    def chat(self) -> list[dict]:
        names = {c.id: c.function.name for m in self.messages for c in m.tool_calls or ()}
        return [m.for_template(names) for m in self.messages]

    def template_tools(self) -> list[dict] | None:
        """The tools as chat templates take them (OpenAI's own shape); None without tools."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Request):
    prompt: str | list[str] | list[int] | list[list[int]]  # one prompt, or a batch (choices per prompt)
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0: no completion (with echo and logprobs: scoring)
    echo: bool = False
    suffix: str | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None  # OpenAI's bound for this endpoint
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_supported(self):
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of > 1 is not supported", param="best_of")
        return self

    @property
    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_request(self) -> tuple[int | None, bool]:
        return self.logprobs, self.logprobs is not None and self.echo


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(choices: list[Completion], n: int = 1) -> dict:
    """Each prompt counts once, however many (`n`) choices were generated from it (as OpenAI counts);
    `choices` are ordered prompt by prompt."""
    prompt, completion = sum(c.prompt_tokens for c in choices[::n]), sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    def one(token: str, logprob: float | None) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    if entries is None:
        return None
    # The end-of-sequence token is not part of the message, so not of its tokens (as OpenAI shows it).
    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]}
                        for e in entries if not e.end],
            "refusal": None}


def text_logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    """The legacy completions shape: one entry per token of the echoed prompt and per generated token, an
    end-of-sequence one included (harnesses count entries against tokens). `text_offset`: where each
    token's text starts in the choice's text, counted from `offset` and the lengths of the tokens decoded
    alone."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) if e.logprob is not None else None for e in entries],
            "text_offset": offsets}


def chat_message(c: Completion, calls_tools: bool) -> tuple[dict, str]:
    """The assistant's message and the finish reason: with tools, a reply made of tool calls comes back in
    OpenAI's `tool_calls` form (finish reason "tool_calls")."""
    calls = tool_calls.parse_calls(c.text) if calls_tools and c.finish_reason == "stop" else None
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": c.text}, c.finish_reason


def chat_response(rid: str, model: str, choices: list[Completion], calls_tools: bool = False) -> dict:
    messages = [chat_message(c, calls_tools) for c in choices]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": message, "logprobs": chat_logprobs(c.logprobs), "finish_reason": finish}
                        for i, (c, (message, finish)) in enumerate(zip(choices, messages))],
            "usage": usage(choices, len(choices))}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish: str | None = None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def text_response(rid: str, model: str, choices: list[Completion], prefixes: list[str], n: int = 1) -> dict:
    """`prefixes`: each choice's echoed prompt (empty strings without echo); `n`: choices per prompt."""
    def logprobs(c: Completion) -> dict | None:
        return None if c.logprobs is None else text_logprobs([*(c.prompt_logprobs or []), *c.logprobs])

    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": prefix + c.text, "logprobs": logprobs(c), "finish_reason": c.finish_reason}
                        for i, (c, prefix) in enumerate(zip(choices, prefixes))],
            "usage": usage(choices, n)}


def text_chunk(rid: str, model: str, created: int, index: int, text: str, finish: str | None = None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, choices: list[Completion], n: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(choices, n)}
