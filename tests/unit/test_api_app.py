"""The HTTP app in process, over the local SmolLM2 (no swarm, no socket): OpenAI's response shapes, streaming
that joins to the plain answer, every kind of bad input answered with its status and OpenAI error fields,
and admission that refuses with 429 instead of queueing without bound."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
from starlette.testclient import TestClient

from swarmllm.api.app import create_app
from swarmllm.api.config import ApiConfig
from swarmllm.api.engine import Engine
from swarmllm.api.serve import ApiServer

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_torch_thread")]

MODEL = "smol"
QUESTION = "What is the capital of France?"
CHAT = "/v1/chat/completions"
TEXT_PROMPT = "The capital of France is"



def _chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], **kw}


@pytest.fixture(scope="module")
def engine(smollm2_local, smollm2_tokenizer):
    engine = Engine(smollm2_local, smollm2_tokenizer, MODEL,
                    ApiConfig(model=MODEL, max_context=64, max_body_bytes=4096))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine)) as client:
        yield client


@pytest.fixture(scope="module")
def chat_prompt(smollm2_tokenizer) -> list[int]:
    messages = [{"role": "user", "content": QUESTION}]
    return list(smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


@pytest.fixture(scope="module")
def chat_answer(client) -> dict:
    response = client.post(CHAT, json=_chat(temperature=0, max_tokens=8))
    assert response.status_code == 200, response.text
    return response.json()


def _events(lines) -> list[dict | str]:
    """The `data:` payloads of a server-sent event stream, parsed ([DONE] stays a string)."""
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models_lists_the_one_model(client) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    assert response.json() == {"object": "list", "data": [
        {"id": MODEL, "object": "model", "created": 0, "owned_by": "swarmllm"}]}


def test_chat_completion_has_openais_shape(chat_answer, chat_prompt, smollm2_local, smollm2_tokenizer) -> None:
    with torch.inference_mode():
        out = smollm2_local.generate(torch.tensor([chat_prompt]), max_new_tokens=8, do_sample=False)
    greedy = out[0, len(chat_prompt):].tolist()
    body = chat_answer
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["message"] == {"role": "assistant",
                                 "content": smollm2_tokenizer.decode(greedy, skip_special_tokens=True)}
    assert greedy[-1] == smollm2_tokenizer.eos_token_id  # the answer ends by itself within 8 tokens...
    assert choice["finish_reason"] == "stop"  # ...and the EOS counts as a completion token below
    assert body["usage"] == {"prompt_tokens": len(chat_prompt), "completion_tokens": len(greedy),
                             "total_tokens": len(chat_prompt) + len(greedy)}


def test_streamed_deltas_join_to_the_plain_answer(client, chat_answer) -> None:
    with client.stream("POST", CHAT, json=_chat(temperature=0, max_tokens=8, stream=True,
                                                  stream_options={"include_usage": True})) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.iter_lines())
    assert events[-1] == "[DONE]"
    *chunks, usage, _ = events
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == chat_answer["choices"][0]["message"]["content"]
    assert usage["choices"] == [] and usage["usage"] == chat_answer["usage"]


def _raw_post(client, content: bytes, path: str = CHAT):
    return client.post(path, content=content, headers={"content-type": "application/json"})


def _too_long_message() -> str:
    return " ".join(["word"] * 80)  # about 80 tokens: past the 64-token context, within 4096 bytes


@pytest.mark.parametrize(("request_kw", "status", "param", "code"), [
    ({"content": b"{not json"}, 400, None, None),
    ({"content": b"\x80 not utf-8"}, 400, None, None),
    ({"content": b"[1, 2]"}, 400, None, None),
    ({"json": {"messages": [{"role": "user", "content": "hi"}]}}, 400, "model", None),
    ({"json": _chat(model="gpt-4")}, 404, "model", "model_not_found"),
    ({"json": _chat(max_tokens=-1)}, 400, "max_tokens", None),
    ({"json": _chat(temperature=3)}, 400, "temperature", None),
    ({"json": _chat(top_p=0)}, 400, "top_p", None),
    ({"json": _chat(n=17)}, 400, "n", None),
    ({"json": _chat(top_logprobs=2)}, 400, "top_logprobs", None),  # without logprobs: true
    ({"json": _chat(logprobs=True, top_logprobs=21)}, 400, "top_logprobs", None),
    ({"json": _chat(stop=["a", "b", "c", "d", "e"])}, 400, "stop", None),
    ({"json": _chat(stop=5)}, 400, "stop", None),  # param names the field, not pydantic's union member
    ({"json": {"model": MODEL, "messages": [{"role": "user", "content": 5}]}}, 400, "messages.0.content", None),
    ({"json": {"model": MODEL, "messages": []}}, 400, "messages", None),
    ({"json": {"model": MODEL, "messages": [{"role": "user", "content": _too_long_message()}]}},
     400, "messages", "context_length_exceeded"),
    ({"json": _chat(max_tokens=40)}, 400, "messages", "context_length_exceeded"),  # 37 + 40 > 64
    ({"json": _chat(max_tokens=8, extra="x" * 4096)}, 413, None, None),
])
def test_bad_chat_requests_get_openai_errors(client, request_kw, status, param, code) -> None:
    response = client.post(CHAT, headers={"content-type": "application/json"}, **request_kw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code
    assert error["message"]


def test_a_body_without_a_length_is_cut_off_past_the_limit(client) -> None:
    def chunks():
        yield b'{"model": "smol", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    response = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "content-length" not in response.request.headers  # the streamed check, not the header's


@pytest.mark.parametrize(("chunked", "keyed", "status"), [(False, False, 413), (True, False, 413), (False, True, 401)])
def test_a_refused_slow_upload_still_reads_its_answer(smollm2_local, smollm2_tokenizer, tmp_path, chunked, keyed,
                                                      status) -> None:
    """Over a real socket: the client is still writing its body when the app decides to refuse it (too large,
    or no API key). With `connection: close` (urllib sends it) uvicorn closes right after the answer, and
    unread bytes make the kernel reset the connection under the client's write (a CI failure); so the app
    reads the rest first."""
    (tmp_path / "keys").write_text("k\n")
    engine = Engine(smollm2_local, smollm2_tokenizer, MODEL, ApiConfig(
        model=MODEL, max_body_bytes=4096, api_keys_file=tmp_path / "keys" if keyed else None))
    server = ApiServer(engine, port=0).start()
    try:
        host, port = server.socket.getsockname()[:2]
        body = json.dumps(_chat(extra="x" * 200_000)).encode()
        framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % len(body)
        with socket.create_connection((host, port), timeout=30) as conn:
            conn.sendall(b"POST " + CHAT.encode() + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                         b"content-type: application/json\r\n"
                         + framing + b"\r\n\r\n")
            for i in range(0, len(body), 16_384):
                piece = body[i:i + 16_384]
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                time.sleep(0.01)  # the app has answered (or would have) long before the last piece
            if chunked:
                conn.sendall(b"0\r\n\r\n")
            reply = conn.recv(65_536)
    finally:
        server.stop()
    assert reply.startswith(b"HTTP/1.1 %d" % status), reply[:200]


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", CHAT, 405, None),
    ("GET", "/v1/completions", 405, None),
    ("POST", "/v1/models", 405, None),
    ("GET", "/v1/nothing", 404, None),
    ("GET", "/api/swarm", 404, "no_swarm"),
])
def test_routes_answer_openai_errors(client, method, path, status, code) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == code and error["message"]


def test_the_app_still_answers_after_bad_requests(client) -> None:
    assert _raw_post(client, b"{").status_code == 400
    assert client.get("/v1/models").status_code == 200


def _complete(client, **kw) -> dict:
    response = client.post("/v1/completions", json={"model": MODEL, "temperature": 0, "max_tokens": 4, **kw})
    assert response.status_code == 200, response.text
    return response.json()


def test_completions_from_text_and_from_token_ids_agree(client, smollm2_tokenizer) -> None:
    ids = smollm2_tokenizer(TEXT_PROMPT).input_ids
    by_text = _complete(client, prompt=TEXT_PROMPT)
    by_ids = _complete(client, prompt=ids)
    assert by_text["object"] == "text_completion" and by_text["id"].startswith("cmpl-")
    [choice] = by_text["choices"]
    assert choice["text"] and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert by_ids["choices"][0]["text"] == choice["text"]
    assert by_text["usage"] == by_ids["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 4,
                                                   "total_tokens": len(ids) + 4}
    # A one-prompt list is the same as the string.
    assert _complete(client, prompt=[TEXT_PROMPT])["choices"][0]["text"] == choice["text"]


def test_echo_prepends_the_prompt(client) -> None:
    plain = _complete(client, prompt=TEXT_PROMPT)["choices"][0]["text"]
    echoed = _complete(client, prompt=TEXT_PROMPT, echo=True)
    assert echoed["choices"][0]["text"] == TEXT_PROMPT + plain
    assert echoed["usage"]["completion_tokens"] == 4  # the echo is not generated
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": TEXT_PROMPT, "temperature": 0,
                                                        "max_tokens": 4, "echo": True, "stream": True}) as response:
        events = _events(response.iter_lines())
    *chunks, done = events
    assert done == "[DONE]" and all(c["object"] == "text_completion" for c in chunks)
    assert chunks[0]["choices"][0]["text"] == TEXT_PROMPT
    assert "".join(c["choices"][0]["text"] for c in chunks) == TEXT_PROMPT + plain
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_logprobs_streamed_equal_plain(client) -> None:
    plain = client.post(CHAT, json=_chat(temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)).json()
    content = plain["choices"][0]["logprobs"]["content"]
    assert plain["choices"][0]["logprobs"]["refusal"] is None
    assert "".join(e["token"] for e in content) == plain["choices"][0]["message"]["content"]
    for e in content:
        assert e["logprob"] <= 0 and e["bytes"] == list(e["token"].encode())
        assert len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token"] == e["token"]  # greedy: the best
        assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
    with client.stream("POST", CHAT, json=_chat(temperature=0, max_tokens=6, logprobs=True, top_logprobs=2,
                                                  stream=True)) as response:
        *chunks, _ = _events(response.iter_lines())
    streamed = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    # Not asked for: null, streamed or not.
    assert all(c["choices"][0]["logprobs"] is None for c in _stream_chunks(client, CHAT, _chat(max_tokens=2)))


def test_n_choices_each_reproduce_their_own_seed(client) -> None:
    body = _chat(temperature=1.0, max_tokens=6, seed=7)
    several = client.post(CHAT, json={**body, "n": 3}).json()
    assert [c["index"] for c in several["choices"]] == [0, 1, 2]
    singles = [client.post(CHAT, json={**body, "seed": 7 + i}).json() for i in range(3)]
    assert [c["message"]["content"] for c in several["choices"]] == \
        [s["choices"][0]["message"]["content"] for s in singles]  # choice i samples with seed + i
    assert len({c["message"]["content"] for c in several["choices"]}) > 1
    assert several["usage"]["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]  # the prompt counts once
    assert several["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)


def test_n_choices_stream_interleaved_by_index(client, chat_answer) -> None:
    chunks = _stream_chunks(client, CHAT, _chat(temperature=0, max_tokens=8, n=2,
                                                 stream_options={"include_usage": True}))
    *chunks, usage = chunks
    texts, finishes = {0: "", 1: ""}, {}
    for c in chunks:
        [choice] = c["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    want = chat_answer["choices"][0]["message"]["content"]
    assert texts == {0: want, 1: want} and finishes == {0: "stop", 1: "stop"}  # greedy: the same twice
    assert usage["usage"]["completion_tokens"] == 2 * chat_answer["usage"]["completion_tokens"]
    assert usage["usage"]["prompt_tokens"] == chat_answer["usage"]["prompt_tokens"]


def _stream_chunks(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        *chunks, done = _events(response.iter_lines())
    assert done == "[DONE]"
    return chunks


def test_completions_score_a_text_with_echo_and_max_tokens_0(client, smollm2_local, smollm2_tokenizer) -> None:
    ids = smollm2_tokenizer(TEXT_PROMPT).input_ids
    scored = _complete(client, prompt=TEXT_PROMPT, echo=True, logprobs=1, max_tokens=0)
    choice = scored["choices"][0]
    assert choice["text"] == TEXT_PROMPT and scored["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["tokens"] == [smollm2_tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.inference_mode():
        ref = torch.log_softmax(smollm2_local(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
    # Echo plus generated tokens: one list, the prompt's entries first; streamed the same.
    both = _complete(client, prompt=TEXT_PROMPT, echo=True, logprobs=0, max_tokens=3)["choices"][0]
    assert both["logprobs"]["token_logprobs"][:len(ids)] == pytest.approx(lp["token_logprobs"])
    assert len(both["logprobs"]["tokens"]) == len(ids) + 3
    assert "".join(both["logprobs"]["tokens"]) == both["text"]
    chunks = _stream_chunks(client, "/v1/completions", {"model": MODEL, "prompt": TEXT_PROMPT, "temperature": 0,
                                                        "max_tokens": 3, "echo": True, "logprobs": 0})
    assert chunks[0]["choices"][0]["text"] == TEXT_PROMPT  # the echo comes first, with the prompt's logprobs
    merged = {k: [x for c in chunks if c["choices"][0]["logprobs"] for x in c["choices"][0]["logprobs"][k]]
              for k in ("tokens", "token_logprobs", "text_offset")}
    assert merged == {k: both["logprobs"][k] for k in merged}
    assert "".join(c["choices"][0]["text"] for c in chunks) == both["text"]


def test_a_batch_of_prompts_gets_n_choices_each_in_order(client, smollm2_tokenizer) -> None:
    other = "Two plus two equals"
    batch = _complete(client, prompt=[TEXT_PROMPT, other], n=2, echo=True)
    singles = [_complete(client, prompt=p, echo=True) for p in (TEXT_PROMPT, other)]
    texts = [c["text"] for c in sorted(batch["choices"], key=lambda c: c["index"])]
    want = [s["choices"][0]["text"] for s in singles]
    assert texts == [want[0], want[0], want[1], want[1]]  # index = prompt x n + choice; greedy: equal
    assert batch["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)  # once each
    assert batch["usage"]["completion_tokens"] == 2 * sum(s["usage"]["completion_tokens"] for s in singles)
    # The same batch as token ids, which is how evaluation harnesses send it.
    ids = [smollm2_tokenizer(p).input_ids for p in (TEXT_PROMPT, other)]
    by_ids = _complete(client, prompt=ids)
    assert [c["text"] for c in by_ids["choices"]] == [t.removeprefix(p) for t, p in zip(want, (TEXT_PROMPT, other))]
    chunks = _stream_chunks(client, "/v1/completions", {"model": MODEL, "prompt": [TEXT_PROMPT, other],
                                                        "temperature": 0, "max_tokens": 4, "echo": True,
                                                        "stream_options": {"include_usage": True}})
    *chunks, usage = chunks
    streamed = ["", ""]
    for c in chunks:
        streamed[c["choices"][0]["index"]] += c["choices"][0]["text"]
    assert streamed == want and usage["usage"] == singles[0]["usage"] | {
        k: singles[0]["usage"][k] + singles[1]["usage"][k] for k in singles[0]["usage"]}


def test_harness_style_scoring_counts_an_end_of_sequence_token(client, chat_prompt, smollm2_local,
                                                               smollm2_tokenizer) -> None:
    """The request lm-evaluation-harness sends (a batch of token ids, echo, logprobs 1, max_tokens 1) sums
    token_logprobs[ctxlen:-1], assuming the last entry is the generated token. Here the model's next token
    is its end of turn: it must still have its entry, or the slice would drop a scored token."""
    with torch.inference_mode():
        answer = smollm2_local.generate(torch.tensor([chat_prompt]), max_new_tokens=16, do_sample=False)
    answer = answer[0, len(chat_prompt):-1].tolist()  # without the end of turn, which comes next
    ids = chat_prompt + answer
    reply = _complete(client, prompt=[ids], echo=True, logprobs=1, max_tokens=1)["choices"][0]
    lp = reply["logprobs"]
    assert reply["finish_reason"] == "stop" and len(lp["token_logprobs"]) == len(ids) + 1
    assert lp["tokens"][-1] == smollm2_tokenizer.decode([smollm2_tokenizer.eos_token_id])
    with torch.inference_mode():
        ref = torch.log_softmax(smollm2_local(torch.tensor([ids])).logits[0].float(), dim=-1)
    ctxlen = len(chat_prompt)
    want = sum(float(ref[i - 1, ids[i]]) for i in range(ctxlen, len(ids)))
    assert sum(lp["token_logprobs"][ctxlen:-1]) == pytest.approx(want, abs=1e-3)


def test_completions_logprobs_are_bounded(client) -> None:
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 6})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"


@pytest.mark.parametrize(("prompt", "param"), [
    ([49152], "prompt"),  # the vocabulary is 0:49152
    ([5, -1], "prompt"),
    ([], "prompt"),
    ("", "prompt"),
    ([[5, 6], []], "prompt"),  # a batch with an empty prompt
    (["x"] * 17, "prompt"),  # more completions than one request may ask for
    (5, "prompt"),
])
def test_bad_completion_prompts_get_400(client, prompt, param) -> None:
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_request_past_the_admission_limit_gets_429(smollm2_local, smollm2_tokenizer) -> None:
    engine = Engine(smollm2_local, smollm2_tokenizer, MODEL,
                    ApiConfig(model=MODEL, max_context=64, max_concurrent_requests=1, max_queued_requests=0))
    try:
        with TestClient(create_app(engine)) as client:
            with client.stream("POST", CHAT, json=_chat(temperature=0, max_tokens=4, stream=True)) as first:
                lines = first.iter_lines()
                # The response has started, so the first request holds the only slot until it is read out:
                # the app cannot send more of it (the client reads one event at a time).
                assert _events([next(lines)])[0]["choices"][0]["delta"]["role"] == "assistant"
                refused = client.post(CHAT, json=_chat(temperature=0, max_tokens=1))
                assert refused.status_code == 429
                error = refused.json()["error"]
                assert error["type"] == "rate_limit_exceeded" and error["code"] == "too_many_requests"
                assert _events(lines)[-1] == "[DONE]"
            # Once the first request is done its slot is free again.
            assert client.post(CHAT, json=_chat(temperature=0, max_tokens=1)).status_code == 200
    finally:
        engine.shutdown()


def test_metrics_count_requests_tokens_and_latency(client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict:
        text = client.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    before = samples()
    answer = client.post(CHAT, json=_chat(temperature=0, max_tokens=4)).json()
    assert client.post(CHAT, json=_chat(max_tokens=-1)).status_code == 400
    after = samples()

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("swarmllm_api_requests_total", endpoint=CHAT, status="200") == 1
    assert grew("swarmllm_api_requests_total", endpoint=CHAT, status="400") == 1
    assert grew("swarmllm_api_completion_tokens_total") == answer["usage"]["completion_tokens"]
    assert grew("swarmllm_api_prompt_tokens_total") == answer["usage"]["prompt_tokens"]
    assert grew("swarmllm_api_first_token_seconds_count") == 1
    assert grew("swarmllm_api_request_seconds_count", endpoint=CHAT) == 1
    assert after[("swarmllm_api_requests_in_progress", ())] == 0


def test_logit_bias_moves_greedy_to_what_the_biased_logits_pick(client, chat_answer, chat_prompt, smollm2_local,
                                                                  smollm2_tokenizer) -> None:
    with torch.no_grad():
        logits = smollm2_local(torch.tensor([chat_prompt])).logits[0, -1]
    first, second = logits.topk(2).indices.tolist()
    assert chat_answer["choices"][0]["message"]["content"].startswith(smollm2_tokenizer.decode([first]))
    banned = client.post(CHAT, json=_chat(temperature=0, max_tokens=8, logit_bias={str(first): -100}))
    assert banned.status_code == 200, banned.text
    assert banned.json()["choices"][0]["message"]["content"].startswith(smollm2_tokenizer.decode([second]))
    neutral = client.post(CHAT, json=_chat(temperature=0, max_tokens=8, logit_bias={str(first): 0}))
    assert neutral.json()["choices"][0]["message"]["content"] == chat_answer["choices"][0]["message"]["content"]


@pytest.mark.parametrize("field, value", [
    ("logit_bias", {"hello": 5}),
    ("logit_bias", {"1": 101}),
    ("logit_bias", {"99999999": 1}),
    ("response_format", {"type": "yaml"}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),  # SmolLM2's template has no tool support
    ("tool_choice", "auto"),  # without tools
    ("reasoning_effort", "low"),
    ("functions", [{"name": "f"}]),
    ("store", True),
    ("modalities", ["text", "audio"]),
])
def test_what_cannot_be_honoured_is_refused_by_name(client, field, value) -> None:
    response = client.post(CHAT, json=_chat(temperature=0, max_tokens=2, **{field: value}))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_a_plain_text_response_format_is_accepted(client, chat_answer) -> None:
    response = client.post(CHAT, json=_chat(temperature=0, max_tokens=8, response_format={"type": "text"}))
    assert response.json()["choices"][0]["message"]["content"] == chat_answer["choices"][0]["message"]["content"]


class _Manager:
    """A sequence manager whose cached view predates the servers: only a forced lookup finds them."""

    num_blocks = 30

    def __init__(self, found: list) -> None:
        self.found, self.lookups = found, []

    def servers(self, force: bool = False) -> list:
        self.lookups.append(force)
        return self.found if force else []

    def versions(self, servers: list) -> dict:
        return {}


def test_a_stale_view_of_the_swarm_is_refreshed_before_a_request_is_refused(engine, monkeypatch) -> None:
    from swarmllm.api.errors import ApiError
    from swarmllm.protocol import ServerRecord

    record = ServerRecord(peer_id="a", start=0, end=30, dtype="float32", cache_tokens_left=100)
    manager = _Manager([record])
    monkeypatch.setattr(engine.model, "sequence_manager", manager, raising=False)
    engine.check_swarm()  # served: the forced lookup sees every block
    assert manager.lookups == [False, True]
    manager.found = [record.model_copy(update={"end": 15})]
    with pytest.raises(ApiError) as refused:
        engine.check_swarm()
    assert refused.value.status == 503 and refused.value.code == "missing_blocks" and "15:30" in refused.value.message
