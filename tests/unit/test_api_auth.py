"""API keys: the keys file (parsing, reloading when it changes, keeping the last good keys when it breaks),
and the app: guarded routes answer 401 in OpenAI's format without a valid bearer key, pages stay open."""

from __future__ import annotations

import hashlib
import os

import pytest
from starlette.testclient import TestClient

from swarmllm.api.app import create_app
from swarmllm.api.auth import ApiKeys, guarded, parse_keys
from swarmllm.api.config import ApiConfig
from swarmllm.api.engine import Engine


def _write(path, text: str, bump: int = 0) -> None:
    path.write_text(text)
    st = path.stat()  # a distinct mtime, as an edit a second later would give (some filesystems are coarse)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


def test_parse_keys_skips_comments_and_names_every_key() -> None:
    unnamed = "key-" + hashlib.sha256(b"key-one").hexdigest()[:8]
    assert parse_keys("# team a\nkey-one\n\n  risk-team key-two  # ops\n") == [
        (unnamed, "key-one"), ("risk-team", "key-two")]
    with pytest.raises(ValueError, match="no key"):
        parse_keys("# nothing here\n\n")
    with pytest.raises(ValueError, match="line 2: expected KEY or NAME KEY"):
        parse_keys("good\na bad key\n")
    with pytest.raises(ValueError, match="line 2: the name ops is given twice"):
        parse_keys("ops k1\nops k2\n")


def test_bearer_header_is_checked_exactly(tmp_path) -> None:
    path = tmp_path / "keys"
    _write(path, "alpha\nteam-b beta\n")
    keys = ApiKeys(path)
    assert keys.identify("Bearer beta") == keys.identify("bearer beta") == keys.identify("Bearer  beta ") == "team-b"
    assert keys.identify("Bearer alpha").startswith("key-")
    for header in (None, "", "alpha", "Bearer", "Bearer ", "Basic alpha", "Bearer alph", "Bearer alphaa",
                   "Bearer gamma", "Bearer team-b"):
        assert keys.identify(header) is None, header


def test_keys_reload_when_the_file_changes_and_survive_a_broken_edit(tmp_path) -> None:
    path = tmp_path / "keys"
    _write(path, "old\n")
    keys = ApiKeys(path)
    assert keys.identify("Bearer old")
    _write(path, "new\n", bump=1)  # rotation: the old key is revoked without a restart
    assert keys.identify("Bearer new") and not keys.identify("Bearer old")
    _write(path, "\n", bump=2)  # emptied mid-edit: the last good keys stay, nobody is let in or locked out
    assert keys.identify("Bearer new")
    path.unlink()
    assert keys.identify("Bearer new")


def test_a_missing_or_empty_file_is_refused_at_start(tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot use the API keys file"):
        ApiKeys(tmp_path / "absent")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="no key"):
        ApiKeys(tmp_path / "empty")


def test_pages_are_open_and_everything_else_is_guarded() -> None:
    assert not guarded("/") and not guarded("/monitor") and not guarded("/static/chat.js")
    for path in ("/v1/models", "/v1/chat/completions", "/api/swarm", "/metrics", "/monitor/x", "/nothing"):
        assert guarded(path), path


@pytest.mark.real_model
@pytest.mark.usefixtures("one_torch_thread")
def test_the_app_answers_401_without_a_key_and_serves_with_one(tmp_path, smollm2_local, smollm2_tokenizer) -> None:
    path = tmp_path / "keys"
    _write(path, "s3cret\nops other-key\n")
    engine = Engine(smollm2_local, smollm2_tokenizer, "smol", ApiConfig(model="smol", api_keys_file=path))
    try:
        with TestClient(create_app(engine)) as client:
            chat = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                for method, route, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", chat),
                                            ("GET", "/metrics", None), ("GET", "/api/swarm", None)):
                    response = client.request(method, route, json=body, headers=headers)
                    assert response.status_code == 401, (route, headers)
                    assert response.headers["www-authenticate"] == "Bearer"
                    assert response.json()["error"]["code"] == "invalid_api_key"
            key = {"Authorization": "Bearer s3cret"}
            assert client.get("/v1/models", headers=key).json()["data"][0]["id"] == "smol"
            answer = client.post("/v1/chat/completions", json=chat, headers=key)
            assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
            assert client.get("/").status_code == 200 and client.get("/static/auth.js").status_code == 200
            client.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer other-key"})
            # 401s are counted like any other response; requests and tokens are counted per key name.
            text = client.get("/metrics", headers=key).text
            assert 'swarmllm_api_requests_total{endpoint="/v1/models",status="401"} 2.0' in text
            unnamed = "key-" + hashlib.sha256(b"s3cret").hexdigest()[:8]
            assert f'swarmllm_api_key_requests_total{{key="{unnamed}"}} 3.0' in text  # models, chat, metrics
            assert 'swarmllm_api_key_requests_total{key="ops"} 1.0' in text
            assert f'swarmllm_api_key_tokens_total{{key="{unnamed}",kind="completion"}} 2.0' in text
            assert 'swarmllm_api_key_tokens_total{key="ops",kind="completion"} 2.0' in text
            prompt = answer.json()["usage"]["prompt_tokens"]
            assert f'swarmllm_api_key_tokens_total{{key="ops",kind="prompt"}} {float(prompt)}' in text
            assert "s3cret" not in text and "other-key" not in text  # names only, never keys
    finally:
        engine.shutdown()
