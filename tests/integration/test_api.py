"""`swarmllm api` as a real process over a real 3-server swarm of SmolLM2, driven by the official openai client.

Greedy answers equal the swarm's own `generate()` and local transformers, streamed or not; sampling options
behave; bad input gets OpenAI errors with the right status and the app stays up; `swarmllm status` shows the
swarm as it is.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from swarmllm.launcher import run

pytestmark = [pytest.mark.swarm, pytest.mark.real_model]

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(api_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


def _local_greedy(model, tokenizer, ids: list[int], n: int) -> str:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):]
    return tokenizer.decode(out, skip_special_tokens=True)


def _chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              return_dict=True)["input_ids"])


def _post(url: str, body: bytes | dict, method: str = "POST") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_the_served_model(client, smollm2_swarm) -> None:
    models = client.models.list().data
    assert len(models) == 1 and models[0].owned_by == "swarmllm"
    served = smollm2_swarm.server_lines["server0"].split()[2]  # "server ready: MODEL blocks ..."
    assert models[0].id == served


def test_chat_equals_swarm_and_local_greedy(client, model_id, smollm2_client, smollm2_local, smollm2_tokenizer) -> None:
    ids = _chat_ids(smollm2_tokenizer, QUESTION)
    reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=24)
    swarm = _local_greedy(smollm2_client, smollm2_tokenizer, ids, 24)
    local = _local_greedy(smollm2_local, smollm2_tokenizer, ids, 24)
    assert reply.choices[0].message.content == swarm == local
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # SmolLM2 answers this in a few tokens and ends its turn: finish_reason says so.
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 24

    streamed, chunks, usage, finish = "", 0, None, None
    for chunk in client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": QUESTION}],
                                                temperature=0, max_tokens=24, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                streamed += choice.delta.content
                chunks += 1
            finish = choice.finish_reason or finish
    assert streamed == reply.choices[0].message.content
    assert chunks >= 3, "tokens must arrive one by one, not in one piece"
    assert finish == "stop" and usage is not None and usage.completion_tokens == reply.usage.completion_tokens


def test_completions_equal_local_greedy_and_stop_at_length(client, model_id, smollm2_local, smollm2_tokenizer) -> None:
    prompt = "A swarm of computers can"
    ids = smollm2_tokenizer(prompt).input_ids
    reply = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=16)
    assert reply.choices[0].text == _local_greedy(smollm2_local, smollm2_tokenizer, ids, 16)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 16
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_id, prompt=prompt, temperature=0, max_tokens=16, stream=True) if c.choices)
    assert streamed == reply.choices[0].text


def test_logprobs_through_the_swarm_equal_local_transformers(client, model_id, smollm2_local, smollm2_tokenizer) -> None:
    ids = _chat_ids(smollm2_tokenizer, QUESTION)
    reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    with torch.inference_mode():
        out = smollm2_local.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        generated = [t for t in out if t != smollm2_tokenizer.eos_token_id]  # the end of turn has no entry
        ref = torch.log_softmax(smollm2_local(torch.tensor([ids + generated])).logits[0].float(), dim=-1)
    assert [e.token for e in content] == [smollm2_tokenizer.decode([t]) for t in generated]
    for i, (token, entry) in enumerate(zip(generated, content)):
        assert entry.logprob == pytest.approx(float(ref[len(ids) - 1 + i, token]), abs=1e-3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(ref[len(ids) - 1 + i].topk(3).values.tolist(),
                                                                         abs=1e-3)

    # Scoring a text, the way evaluation harnesses ask for log-likelihoods: echo, logprobs, max_tokens 0.
    text = "The capital of France is Paris."
    text_ids = smollm2_tokenizer(text).input_ids
    scored = client.completions.create(model=model_id, prompt=text, echo=True, logprobs=1, max_tokens=0)
    with torch.inference_mode():
        ref = torch.log_softmax(smollm2_local(torch.tensor([text_ids])).logits[0].float(), dim=-1)
    assert scored.choices[0].text == text and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[0] is None
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [float(ref[i - 1, text_ids[i]]) for i in range(1, len(text_ids))], abs=1e-3)


def test_stop_strings_seed_and_sampling_options(client, model_id) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    full = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    cut = text.index(" Paris")
    stopped = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=24,
                                             stop=[" Paris", "zzz"])
    assert stopped.choices[0].message.content == text[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model_id, messages=messages, temperature=0, max_tokens=24, stop=" Paris", stream=True) if c.choices)
    assert streamed == text[:cut], "a stop string must not leak into the stream either"

    poem = [{"role": "user", "content": "Write a short poem about the sea."}]
    kwargs = dict(model=model_id, messages=poem, temperature=1.0, top_p=0.95, max_tokens=16)
    a = client.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    assert a == b, "the same seed must give the same sample"
    others = {client.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds gave the same 16-token sample four times"


def test_concurrent_requests_are_decoded_together(client, model_id) -> None:
    """Two streams overlap: the second gets tokens while the first is still streaming (not queued after it)."""
    times: dict[int, list[float]] = {0: [], 1: []}

    def run(i: int) -> None:
        for chunk in client.chat.completions.create(
                model=model_id, messages=[{"role": "user", "content": f"Count from {i} to {i + 30}."}],
                temperature=0, max_tokens=40, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                times[i].append(time.monotonic())

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(times[0]) > 10 and len(times[1]) > 10
    first_done = min(times[0][-1], times[1][-1])
    assert max(times[0][0], times[1][0]) < first_done, "one request waited for the other to finish"


def test_bad_input_gets_openai_errors_and_the_app_stays_up(api_url, client, model_id) -> None:
    chat = f"{api_url}/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    status, body = _post(chat, b'{"model": "x", "messages": [')
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]
    status, body = _post(chat, {"model": "gpt-4o", "messages": user})
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    status, body = _post(chat, {"model": model_id, "messages": user, "max_tokens": -5})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = _post(chat, {"model": model_id, "messages": [], "max_tokens": 5})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = _post(chat, {"model": model_id, "messages": user, "temperature": "hot"})
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = _post(chat, {"model": model_id, "messages": user, "n": 17})
    assert status == 400 and body["error"]["param"] == "n"
    long = " ".join(["swarm"] * 9000)  # more tokens than SmolLM2's 8192-token context
    status, body = _post(chat, {"model": model_id, "messages": [{"role": "user", "content": long}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = _post(chat, {"model": model_id, "messages": [{"role": "user", "content": "x" * 3_000_000}]})
    assert status == 413
    status, body = _post(chat, b"", method="GET")
    assert status == 405 and "error" in body
    status, body = _post(f"{api_url}/v1/embeddings", {"model": model_id, "input": "x"})
    assert status == 404 and "error" in body
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_id, prompt="x", max_tokens=-1)
    # Still serving.
    reply = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=8)
    assert reply.choices[0].message.content


def test_api_keys_guard_the_api_and_rotate_without_a_restart(keyed_api, smollm2_local, smollm2_tokenizer) -> None:
    url, keys, key = keyed_api

    def client(api_key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)

    for api_key in ("wrong", key + "x"):
        with pytest.raises(openai.AuthenticationError) as refused:
            client(api_key).models.list()
        assert refused.value.code == "invalid_api_key"
    status, body = _post(f"{url}/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"  # checked before the body is even read

    model = client(key).models.list().data[0].id
    reply = client(key).chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                                temperature=0, max_tokens=12)
    ids = _chat_ids(smollm2_tokenizer, QUESTION)
    assert reply.choices[0].message.content == _local_greedy(smollm2_local, smollm2_tokenizer, ids, 12)

    try:  # rotation: the running process rereads the file; the old key is refused from then on
        keys.write_text("rotated-key-2\n")
        os.utime(keys, ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime even on coarse clocks
        assert client("rotated-key-2").models.list().data[0].id == model
        with pytest.raises(openai.AuthenticationError):
            client(key).models.list()
    finally:
        keys.write_text(f"{key}\n")
        os.utime(keys, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert client(key).models.list().data[0].id == model


def test_status_shows_the_swarm(smollm2_swarm) -> None:
    from swarmllm.cli.status import render
    from swarmllm.observe.snapshot import SwarmSnapshot

    peers = smollm2_swarm.running_servers()  # another test may have added a server and stopped it
    done = run(["status", "--initial-peers", *smollm2_swarm.initial_peers, "--json"])
    assert done.returncode == 0, done.stderr[-2000:]
    snap = json.loads(done.stdout)
    (model,) = snap["models"]
    assert model["num_blocks"] == 30 and model["complete"] and model["gaps"] == []
    assert model["coverage"] == [1] * 30
    online = [s for s in model["servers"] if s["state"] == "online"]  # a stopped one stays listed, offline
    assert {s["peer_id"]: f"{s['start']}:{s['end']}" for s in online} == peers
    for s in online:
        assert s["rtt_ms"] is not None and s["inference_tps"] > 0
    # The table is the same snapshot rendered (one process start less: each costs ~15 s on 2 busy cores).
    table = render(SwarmSnapshot.model_validate_json(json.dumps(snap)))  # as strictly as from the wire
    assert "all 30 blocks covered" in table and "|" + "1" * 30 + "|" in table
    for peer, blocks in peers.items():
        row = next(line for line in table.splitlines() if peer in line)
        assert blocks in row and "online" in row


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_hanging_up_cancels_and_frees_the_session(api_url, model_id, smollm2_swarm, stream) -> None:
    """A client that hangs up mid-answer, streaming or waiting for the whole answer: decoding stops and every
    server closes the session (watched through the servers' Prometheus metrics)."""
    import http.client
    from urllib.parse import urlparse

    from prometheus_client.parser import text_string_to_metric_families

    def sample(url: str, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def sessions_open() -> bool:
        return all(sample(u, "swarmllm_active_sessions") >= 1 for u in urls)

    urls = list(smollm2_swarm.metrics_urls().values())
    before = sample(urls[-1], "swarmllm_tokens_total", kind="inference")
    cancelled = sample(f"{api_url}/metrics", "swarmllm_api_cancelled_total")
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Tell me a very long story."}],
                       "temperature": 0, "max_tokens": 400, "stream": stream})
    address = urlparse(api_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    if stream:
        reply, events = connection.getresponse(), 0
        while events < 5:  # a few tokens in: the session is open on every server
            if reply.readline().startswith(b"data: "):
                events += 1
    deadline = time.monotonic() + 30
    while not sessions_open() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sessions_open()
    connection.sock.shutdown(2)  # hang up mid-answer
    connection.close()

    deadline = time.monotonic() + 30  # closing waits for the step in flight, slow on a loaded machine
    while time.monotonic() < deadline and any(sample(u, "swarmllm_active_sessions") for u in urls):
        time.sleep(0.2)
    assert all(sample(u, "swarmllm_active_sessions") == 0 for u in urls), "a server kept the session open"
    served = sample(urls[-1], "swarmllm_tokens_total", kind="inference") - before
    time.sleep(1.0)
    assert sample(urls[-1], "swarmllm_tokens_total", kind="inference") - before == served, "decoding went on"
    assert served < 400, "all the requested tokens were decoded for nobody"
    assert sample(f"{api_url}/metrics", "swarmllm_api_cancelled_total") == cancelled + 1
