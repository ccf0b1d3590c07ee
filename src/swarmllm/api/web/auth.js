"use strict";
// API keys for the pages. When the API answers 401 (the server was started with --api-keys-file), a bar
// under the header asks for a key. The key is kept for this tab only (sessionStorage: gone when the tab
// closes) and sent as a bearer token, as OpenAI's clients do. Without keys on the server it never shows.

const apiKey = (() => {
  const STORE = "swarmllm.apiKey";
  let bar = null;

  function stored() {
    try {
      return sessionStorage.getItem(STORE);
    } catch {
      return null; // storage disabled: the key lives until the page reloads
    }
  }

  let current = stored();

  function save(key) {
    current = key;
    try {
      sessionStorage.setItem(STORE, key);
    } catch {
      // see stored()
    }
  }

  /** The bar that asks for a key; built on first use, so pages without keys carry no trace of it. */
  function ask(message) {
    if (!bar) {
      bar = document.createElement("form");
      bar.id = "api-key-form";
      bar.className = "keybar";
      const text = document.createElement("span");
      text.id = "api-key-message";
      const input = document.createElement("input");
      input.id = "api-key";
      input.type = "password";
      input.autocomplete = "off";
      input.placeholder = "API key";
      const button = document.createElement("button");
      button.id = "api-key-save";
      button.type = "submit";
      button.className = "primary";
      button.textContent = "Use key";
      bar.append(text, input, button);
      bar.addEventListener("submit", (event) => {
        event.preventDefault();
        const key = input.value.trim();
        if (!key) return;
        save(key);
        input.value = "";
        bar.hidden = true;
        window.dispatchEvent(new Event("apikey")); // the page retries what failed
      });
      document.querySelector(".topbar").after(bar);
    }
    bar.querySelector("#api-key-message").textContent = message;
    bar.hidden = false;
    bar.querySelector("#api-key").focus();
  }

  /** fetch() with the key, if any; a 401 brings up the key bar and is returned for the caller to report. */
  async function fetchWithKey(url, options = {}) {
    const headers = { ...(options.headers || {}) };
    if (current) headers.Authorization = `Bearer ${current}`;
    const response = await fetch(url, { ...options, headers });
    if (response.status === 401) {
      ask(current ? "This API key was refused. Enter another:" : "This API needs a key:");
    }
    return response;
  }

  return { fetch: fetchWithKey };
})();
