"""The web UI in a real browser, against `swarmllm api` over a real 3-server SmolLM2 swarm: the chat page streams
the same answer the API gives non-streamed, and the monitor maps every server and shows no gap."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.swarm, pytest.mark.real_model]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000
QUESTION = "What is the capital of France?"

# Runs in the page: records the streaming bubble's text at every DOM change, so no partial is missed
# between two polls from Python.
RECORD_PARTIALS = """() => {
  window.__partials = [];
  new MutationObserver(() => {
    const bubble = document.querySelector('.message.assistant[data-streaming="true"]');
    if (bubble) window.__partials.push(bubble.textContent);
  }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


def _post(url: str, body: dict, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def _model_id(api_url: str, key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with urllib.request.urlopen(urllib.request.Request(f"{api_url}/v1/models", headers=headers), timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def test_chat_streams_the_same_answer_as_the_api(api_url, page) -> None:
    model = _model_id(api_url)
    page.goto(f"{api_url}/")
    page.wait_for_function("id => document.getElementById('model').textContent === id", arg=model)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#prompt", QUESTION)
    page.evaluate(RECORD_PARTIALS)
    page.click("#send")

    page.wait_for_selector('.message.assistant[data-streaming="false"]')
    final = page.text_content(".message.assistant")
    partials = [p for p in dict.fromkeys(page.evaluate("window.__partials")) if p]
    assert page.locator(".message.error").count() == 0, page.text_content(".message.error")
    assert len(partials) >= 2, f"the answer did not stream: partial texts {partials!r}"
    for shorter, longer in zip(partials, [*partials[1:], final]):
        assert longer.startswith(shorter), f"text did not grow: {shorter!r} then {longer!r}"

    want = _post(f"{api_url}/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 24,
    })["choices"][0]["message"]["content"]
    assert final and final == want


def test_pages_ask_for_the_api_key_and_then_work(keyed_api, page) -> None:
    url, _, key = keyed_api
    model = _model_id(url, key)
    page.goto(f"{url}/")
    page.wait_for_selector("#api-key-form:not([hidden])")  # the page loads; the API behind it answers 401
    assert "needs a key" in page.text_content("#api-key-message")
    page.fill("#api-key", "not-the-key")
    page.click("#api-key-save")
    page.wait_for_function("() => document.getElementById('api-key-message').textContent.includes('refused')")
    page.fill("#api-key", key)
    page.click("#api-key-save")
    page.wait_for_function("id => document.getElementById('model').textContent === id", arg=model)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    page.fill("#prompt", QUESTION)
    page.click("#send")
    page.wait_for_selector('.message.assistant[data-streaming="false"]')
    want = _post(f"{url}/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 12,
    }, key)["choices"][0]["message"]["content"]
    assert page.text_content(".message.assistant") == want
    assert page.is_hidden("#api-key-form")

    # The monitor, in the same tab's session, uses the key it was given.
    page.goto(f"{url}/monitor")
    page.wait_for_selector(".server-row")
    assert page.locator("#api-key-form:not([hidden])").count() == 0


def test_monitor_maps_every_server_without_gaps(api_url, smollm2_swarm, page) -> None:
    # Servers still running: other tests may have added a server to the shared swarm and stopped it.
    peers = list(smollm2_swarm.running_servers())
    with urllib.request.urlopen(f"{api_url}/api/swarm", timeout=60) as response:  # what the page will draw
        listed = {s["peer_id"] for m in json.load(response)["models"] for s in m["servers"]}
    assert set(peers) <= listed, f"/api/swarm lists {listed}, not every server of {peers}"
    page.goto(f"{api_url}/monitor")
    for peer in peers:
        try:
            page.wait_for_selector(f'.server-row[data-peer-id="{peer}"]')
            page.wait_for_selector(f'.map-row[data-peer-id="{peer}"]')
        except Exception:
            raise AssertionError(f"the monitor never showed {peer}; its error banner: "
                                 f"{page.text_content('#error')!r}") from None
    # All three servers are ready before the fixture yields, so the very first full snapshot has no gap.
    page.wait_for_selector('.model[data-complete="true"]')
    model = page.locator(".model", has=page.locator(f'.server-row[data-peer-id="{peers[0]}"]'))
    summary = model.locator(".coverage-summary").text_content()
    assert re.fullmatch(r"(\d+)/\1 blocks covered", summary), summary
    assert page.locator(".gap").count() == 0
    if path := os.environ.get("SWARMLLM_SCREENSHOT"):
        page.screenshot(path=path, full_page=True)
