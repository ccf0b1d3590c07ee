"""Tools (function calling) for the chat API: the request's records, the grammar a reply follows, and
the reply's calls in OpenAI's form.

The chat template renders the tools into the prompt; only templates that write calls as `<tool_call>` JSON
blocks (Hermes' format, used by Qwen 2.5/3, SmolLM3 and others) are served, since the reply must be read
back. Each call is constrained (api/constrained.py) to `{"name": <a tool's name>, "arguments": <an object
valid for that tool's parameters schema>}`:
- `required`: the reply is one or more calls (one with parallel_tool_calls false);
- a named function: calls of that function only;
- `auto`: calls as above, or text that does not start a call;
- `none`: plain text (the tools are still rendered where the template can).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from swarmllm.api.errors import ApiError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\n(.*?)\n" + re.escape(CLOSE), re.S)


class Function(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object; none: no arguments
    strict: bool | None = None  # the arguments always validate here, strict or not


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: Function


class ChosenFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str


class NamedChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: ChosenFunction


def check_choice(tools: list[Tool] | None, choice: str | NamedChoice | None) -> None:
    if choice is not None and not tools:
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(choice, NamedChoice) and choice.function.name not in {t.function.name for t in tools or ()}:
        raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                       param="tool_choice")


def template_error(chat_template: str | None) -> str | None:
    """Why this chat template cannot serve tool calls; None if it can."""
    if not chat_template or "tools" not in chat_template:
        return "this model's chat template has no tool support"
    if OPEN not in chat_template:
        return f"this model's chat template writes tool calls in a format swarmllm does not read (only {OPEN} blocks)"
    return None


def grammar(tools: list[Tool], choice: str | NamedChoice, parallel: bool) -> str:
    """An llguidance grammar for the reply (see the module docstring)."""
    from llguidance import LLMatcher

    chosen = [t for t in tools if not isinstance(choice, NamedChoice) or t.function.name == choice.function.name]
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                               "arguments": t.function.parameters or {"type": "object", "properties": {}}},
              "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
    schema = {"anyOf": calls, "x-guidance": {"whitespace_flexible": False}}
    rules = [
        "start: " + ("calls | TEXT" if choice == "auto" else "calls"),
        "calls: call" + (' ("\\n" call)*' if parallel else ""),
        f"call: {json.dumps(OPEN + chr(10))} body {json.dumps(chr(10) + CLOSE)}",
        f"body: %json {json.dumps(schema)}",
    ]
    if choice == "auto":  # any text that does not begin a call (llguidance's regexes intersect and negate)
        rules.append(f"TEXT: /(?s:.+)/ & ~/(?s:{re.escape(OPEN)}.*)/")
    return LLMatcher.grammar_from_lark("\n".join(rules))


def parse_calls(text: str) -> list[dict] | None:
    """The calls of a reply that is calls (OpenAI's `tool_calls` entries), or None for a text reply."""
    if not text.startswith(OPEN):
        return None
    calls = []
    for body in _CALL.findall(text):
        call = json.loads(body)  # the grammar made it valid JSON: a failure here is a bug, answered with a 500
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}})
    return calls


def parse_arguments(arguments: str) -> dict:
    """An earlier assistant turn's call arguments (JSON text) as the object templates render."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"a tool call's arguments are not JSON: {e}", param="messages") from None
    if not isinstance(value, dict):
        raise ApiError(400, "a tool call's arguments must be a JSON object", param="messages")
    return value
