"""The API when the swarm fails under it: a server dies mid-stream, blocks go missing, servers come back.

The API process outlives all of it: a stream that loses its only server for some blocks ends with an error
event, new requests get 503 `missing_blocks` at once while the blocks have no server, and requests work
again, with the same greedy answer, once a server holds them again.
"""

from __future__ import annotations

import time

import openai
import pytest

from swarmllm.launcher import LocalSwarm, ServerSpec, spawn

pytestmark = [pytest.mark.swarm, pytest.mark.real_model]

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture()
def swarm_and_api(smollm2_dir):
    with LocalSwarm(str(smollm2_dir), [ServerSpec("0:15"), ServerSpec("15:30")]) as swarm:
        api = spawn("api", ["api", str(smollm2_dir), "--initial-peers", *swarm.initial_peers, "--port", "0",
                            "--num-threads", "1", "--missing-blocks-timeout", "3", "--update-period", "1"],
                    env={"OMP_NUM_THREADS": "1"})
        try:
            url = api.wait_for("api ready:", 180).split()[2]
            yield swarm, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        finally:
            api.stop()


def test_server_death_mid_stream_then_missing_blocks_then_recovery(swarm_and_api) -> None:
    swarm, client = swarm_and_api
    model = client.models.list().data[0].id
    answer = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=16)
    want = answer.choices[0].message.content
    assert want

    # The only server of blocks 15:30 stops after a few tokens of a long answer: no replacement exists.
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a very long story about a dragon."}],
        temperature=0, max_tokens=300, stream=True)
    received = ""
    with pytest.raises(openai.APIError) as failed:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += chunk.choices[0].delta.content
                if len(received) > 10 and swarm.servers["server1"].proc.poll() is None:
                    swarm.servers["server1"].stop()
    assert received, "the stream failed before any token"
    assert "15:30" in str(failed.value) or "no server" in str(failed.value)

    # While blocks 15:30 have no server, requests are refused at once with 503, and the app stays up.
    deadline = time.monotonic() + 30
    while True:
        began = time.monotonic()
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=16)
        if refused.value.status_code == 503 or time.monotonic() > deadline:
            break
    assert refused.value.status_code == 503
    assert refused.value.body["code"] == "missing_blocks" and "15:30" in refused.value.body["message"]
    assert time.monotonic() - began < 5, "a refusal must not wait out the failover"
    assert client.models.list().data[0].id == model

    # A new server for the missing blocks: the same request gives the same greedy answer again.
    swarm.add_server("server2", ServerSpec("15:30"))
    deadline = time.monotonic() + 60
    while True:
        try:
            again = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=16)
            break
        except openai.APIStatusError as e:
            assert e.status_code == 503 and time.monotonic() < deadline
            time.sleep(0.5)
    assert again.choices[0].message.content == want
