"""Structured output and tools through the API's real HTTP server, driven by the official openai client, on
the real SmolLM2 (local, greedy): JSON modes parse and validate, tool calls come back in OpenAI's form for
every tool_choice, streamed or not, and a tool's result goes into the next turn.

SmolLM2's own chat template has no tools; the tool tests give it a template that renders them in Hermes'
`<tool_call>` format (tests/data/hermes_tools.jinja), as Qwen's and other tool-trained models' do."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import openai
import pytest

from swarmllm.api.config import ApiConfig
from swarmllm.api.engine import Engine
from swarmllm.api.serve import ApiServer

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_torch_thread")]

MODEL = "smol"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a city",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _serve(model, tokenizer):
    engine = Engine(model, tokenizer, MODEL, ApiConfig(model=MODEL, max_context=1024))
    server = ApiServer(engine, port=0).start()
    host, port = server.socket.getsockname()[:2]
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    return engine, server, client


@pytest.fixture(scope="module")
def plain(smollm2_local, smollm2_tokenizer):
    """SmolLM2 with its own chat template (no tools)."""
    engine, server, client = _serve(smollm2_local, smollm2_tokenizer)
    yield client
    server.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def served(smollm2_local, smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = (Path(__file__).parent.parent / "data" / "hermes_tools.jinja").read_text()
    engine, server, client = _serve(smollm2_local, tokenizer)
    yield engine, client
    server.stop()
    engine.shutdown()


def _chat(client, **kw):
    return client.chat.completions.create(**{"model": MODEL, "temperature": 0, "max_tokens": 60, **kw})


def test_json_object_parses(plain) -> None:
    reply = _chat(plain, messages=[{"role": "user", "content": 'Return {"ok": true} as JSON.'}],
                  response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_json_schema_output_validates(plain) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "population", "country"],
              "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20},
                             "population": {"type": "integer", "minimum": 0, "maximum": 99_999_999}}}
    reply = _chat(plain, messages=[{"role": "user", "content": "Describe Paris in JSON."}],
                  response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


@pytest.mark.parametrize(("response_format", "message"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "cannot enforce this schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "weird"}}},
     "cannot enforce this schema"),
    ({"type": "json_schema"}, "needs its json_schema"),
    ({"type": "yaml"}, "is not one of"),
])
def test_a_format_that_cannot_be_enforced_is_refused(plain, response_format, message) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(plain, messages=ASK, response_format=response_format)
    assert refused.value.body["param"] == "response_format" and message in refused.value.body["message"]


def _calls(reply) -> list[tuple[str, dict]]:
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    for name, arguments in calls:
        jsonschema.validate(arguments, SCHEMAS[name])
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    return calls


@pytest.mark.parametrize(("choice", "name"), [
    ("required", "get_weather"),
    ({"type": "function", "function": {"name": "get_time"}}, "get_time"),  # the model would pick get_weather
])
def test_a_required_or_named_tool_call_validates(served, choice, name) -> None:
    _, client = served
    reply = _chat(client, messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)
    [(called, arguments)] = _calls(reply)
    assert called == name and arguments["city"] == "Paris"


def test_auto_and_none_let_the_model_answer_in_text(served) -> None:
    _, client = served
    for choice in ("auto", "none"):
        # The first tokens decide: a call starts with <tool_call>, which stays in the text when cut short.
        message = _chat(client, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=8).choices[0].message
        assert message.tool_calls is None and message.content and not message.content.startswith("<tool_call>")


def test_streamed_tool_calls_equal_the_plain_reply(served) -> None:
    _, client = served
    kw = dict(messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    plain = _calls(_chat(client, **kw))
    chunks = list(_chat(client, stream=True, **kw))
    calls = [c for ch in chunks for d in [ch.choices[0].delta] if d.tool_calls for c in d.tool_calls]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == plain
    assert calls[0].index == 0 and calls[0].id.startswith("call_")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_result_goes_into_the_next_turn(served) -> None:
    engine, client = served
    call = _chat(client, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    called = call.choices[0].message.tool_calls[0]
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [called.model_dump()]},
            {"role": "tool", "tool_call_id": called.id, "content": '{"temperature": 21}'}]
    reply = _chat(client, messages=turn, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.choices[0].message.content
    # What the model saw: the call it made, then the tool's answer.
    from swarmllm.api.schemas import ChatRequest

    body = ChatRequest(model=MODEL, messages=turn, tools=TOOLS)
    prompt = engine.tokenizer.decode(engine.chat_prompt(body.chat(), body.template_tools()))
    assert '"arguments": {"city": "Paris"' in prompt and '<tool_response>\n{"temperature": 21}' in prompt


def test_a_template_without_tools_refuses_calls_but_serves_tool_choice_none(plain) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(plain, messages=ASK, tools=TOOLS)
    assert refused.value.body["param"] == "tools" and "no tool support" in refused.value.body["message"]
    reply = _chat(plain, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert reply.choices[0].message.content and reply.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError) as refused:
        _chat(plain, messages=ASK, tool_choice="auto")
    assert refused.value.body["param"] == "tool_choice"
