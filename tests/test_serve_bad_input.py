"""Malformed requests: every one gets a 4xx with a structured error body, and the server
keeps serving afterwards."""

import json

import httpx
import pytest

from test_serve_common import server, MODEL, base_state, serve, wait_idle  # noqa: F401 (fixtures)

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]
OK_CHAT = {"model": MODEL, "messages": MSGS, "max_tokens": 2}
OK_OLLAMA = {"model": MODEL, "messages": MSGS, "stream": False, "options": {"num_predict": 2}}


def chat(**patch):
    body = {**OK_CHAT, **patch}
    return {k: v for k, v in body.items() if v is not DROP}


def ochat(**patch):
    body = {**OK_OLLAMA, **patch}
    return {k: v for k, v in body.items() if v is not DROP}


DROP = object()

# (id, method, path, body: bytes | dict | None, expected status)
CASES = [
    ("invalid-json", "POST", CHAT, b"{", 400),
    ("invalid-utf8", "POST", CHAT, b'\xff\xfe{"model": 1}', 400),
    ("truncated-utf8-in-string", "POST", CHAT, b'{"model": "m\xe6\x97", "messages": []}', 400),
    ("empty-body", "POST", CHAT, b"", 400),
    ("array-body", "POST", CHAT, b"[1, 2]", 400),
    ("string-body", "POST", CHAT, b'"hello"', 400),
    ("nan-literal", "POST", CHAT, b'{"model": "%s", "messages": [], "temperature": NaN}' % MODEL.encode(), 400),
    ("infinity-literal", "POST", CHAT, b'{"temperature": -Infinity}', 400),
    ("lone-surrogate", "POST", CHAT, json.dumps(chat(messages=[{"role": "user", "content": "\ud800"}])).encode(), 400),
    ("deep-nesting", "POST", CHAT, b"[" * 200000 + b"]" * 200000, 400),
    ("missing-model", "POST", CHAT, chat(model=DROP), 400),
    ("missing-messages", "POST", CHAT, chat(messages=DROP), 400),
    ("empty-messages", "POST", CHAT, chat(messages=[]), 400),
    ("messages-not-list", "POST", CHAT, chat(messages="hi"), 400),
    ("message-without-role", "POST", CHAT, chat(messages=[{"content": "hi"}]), 400),
    ("unknown-role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400),
    ("content-wrong-type", "POST", CHAT, chat(messages=[{"role": "user", "content": 42}]), 400),
    ("image-content-part", "POST", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]), 400),
    ("model-wrong-type", "POST", CHAT, chat(model=7), 400),
    ("model-empty", "POST", CHAT, chat(model=""), 400),
    ("max-tokens-negative", "POST", CHAT, chat(max_tokens=-5), 400),
    ("max-tokens-zero", "POST", CHAT, chat(max_tokens=0), 400),
    ("max-tokens-string", "POST", CHAT, chat(max_tokens="10"), 400),
    ("max-tokens-float", "POST", CHAT, chat(max_tokens=10.5), 400),
    ("max-tokens-bool", "POST", CHAT, chat(max_tokens=True), 400),
    ("max-tokens-absurd", "POST", CHAT, chat(max_tokens=10**12), 400),
    ("max-tokens-over-context", "POST", CHAT, chat(max_tokens=10**6), 400),
    ("max-completion-tokens-negative", "POST", CHAT, chat(max_completion_tokens=-1), 400),
    ("temperature-negative", "POST", CHAT, chat(temperature=-0.5), 400),
    ("temperature-huge", "POST", CHAT, chat(temperature=1e308), 400),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), 400),
    ("temperature-overflow-to-inf", "POST", CHAT, b'{"model": "%s", "messages": [], "temperature": 1e999}' % MODEL.encode(), 400),
    ("top-p-zero", "POST", CHAT, chat(top_p=0), 400),
    ("top-p-above-one", "POST", CHAT, chat(top_p=1.5), 400),
    ("top-p-negative", "POST", CHAT, chat(top_p=-0.1), 400),
    ("stop-empty-string", "POST", CHAT, chat(stop=""), 400),
    ("stop-list-with-empty", "POST", CHAT, chat(stop=["ok", ""]), 400),
    ("stop-too-many", "POST", CHAT, chat(stop=[f"s{i}" for i in range(17)]), 400),
    ("stop-wrong-type", "POST", CHAT, chat(stop=5), 400),
    ("n-two", "POST", CHAT, chat(n=2), 400),
    ("seed-string", "POST", CHAT, chat(seed="42"), 400),
    ("seed-too-big", "POST", CHAT, chat(seed=2**70), 400),
    ("stream-not-bool", "POST", CHAT, chat(stream="yes"), 400),
    ("stream-options-without-stream", "POST", CHAT, chat(stream_options={"include_usage": True}), 400),
    ("logit-bias-bad-key", "POST", CHAT, chat(logit_bias={"abc": 1}), 400),
    ("logit-bias-bad-value", "POST", CHAT, chat(logit_bias={"5": 1000}), 400),
    ("logit-bias-outside-vocab", "POST", CHAT, chat(logit_bias={"99999999": 1}), 400),
    ("presence-penalty-out-of-range", "POST", CHAT, chat(presence_penalty=5), 400),
    ("wrong-model", "POST", CHAT, chat(model="gpt-4"), 404),
    ("completion-missing-prompt", "POST", COMP, {"model": MODEL}, 400),
    ("completion-empty-prompt", "POST", COMP, {"model": MODEL, "prompt": ""}, 400),
    ("completion-negative-token-id", "POST", COMP, {"model": MODEL, "prompt": [1, -2]}, 400),
    ("completion-token-outside-vocab", "POST", COMP, {"model": MODEL, "prompt": [1, 10**8]}, 400),
    ("completion-empty-token-list", "POST", COMP, {"model": MODEL, "prompt": []}, 400),
    ("completion-list-of-strings", "POST", COMP, {"model": MODEL, "prompt": ["a", "b"]}, 400),
    ("completion-echo", "POST", COMP, {"model": MODEL, "prompt": "a", "echo": True}, 400),
    ("ollama-invalid-json", "POST", "/api/chat", b'{"model": ', 400),
    ("ollama-messages-not-list", "POST", "/api/chat", ochat(messages="hi"), 400),
    ("ollama-message-content-not-string", "POST", "/api/chat", ochat(messages=[{"role": "user", "content": ["x"]}]), 400),
    ("ollama-temperature-string", "POST", "/api/chat", ochat(options={"temperature": "hot"}), 400),
    ("ollama-num-predict-zero", "POST", "/api/chat", ochat(options={"num_predict": 0}), 400),
    ("ollama-num-predict-below-minus-two", "POST", "/api/chat", ochat(options={"num_predict": -3}), 400),
    ("ollama-top-p-two", "POST", "/api/chat", ochat(options={"top_p": 2}), 400),
    ("ollama-options-not-object", "POST", "/api/chat", ochat(options=[1, 2]), 400),
    ("ollama-stop-empty", "POST", "/api/chat", ochat(options={"stop": [""]}), 400),
    ("ollama-format-json", "POST", "/api/chat", ochat(format="json"), 400),
    ("ollama-bad-role", "POST", "/api/chat", ochat(messages=[{"role": "robot", "content": "x"}]), 400),
    ("ollama-images", "POST", "/api/chat", ochat(messages=[{"role": "user", "content": "x", "images": ["AAAA"]}]), 400),
    ("ollama-wrong-model", "POST", "/api/chat", ochat(model="llama3"), 404),
    ("ollama-generate-prompt-int", "POST", "/api/generate", {"model": MODEL, "prompt": 5}, 400),
    ("ollama-generate-bad-context", "POST", "/api/generate", {"model": MODEL, "prompt": "x", "context": [-1]}, 400),
    ("ollama-generate-context-outside-vocab", "POST", "/api/generate", {"model": MODEL, "prompt": "x", "context": [10**8]}, 400),
    ("ollama-generate-template-override", "POST", "/api/generate", {"model": MODEL, "prompt": "x", "template": "{{ .Prompt }}"}, 400),
    ("ollama-show-missing-model", "POST", "/api/show", {}, 400),
    ("ollama-show-wrong-model", "POST", "/api/show", {"model": "../../etc/passwd"}, 404),
    ("get-on-post-route", "GET", CHAT, None, 405),
    ("post-on-get-route", "POST", "/v1/models", {}, 405),
    ("unknown-route", "POST", "/v2/chat", {}, 404),
    ("unknown-ollama-route", "POST", "/api/pull", {"model": "x"}, 404),
]
assert len(CASES) >= 40


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def send(client, method, path, body):
    if isinstance(body, dict):
        return client.request(method, path, json=body)
    return client.request(method, path, content=body, headers={"content-type": "application/json"})


@pytest.mark.parametrize("name,method,path,body,status", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_structured_4xx(client, name, method, path, body, status):
    r = send(client, method, path, body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(err, str) and err  # Ollama's shape
    else:
        assert isinstance(err["message"], str) and err["message"]  # OpenAI's shape
        assert isinstance(err["type"], str) and "param" in err and "code" in err


def test_server_still_serves_after_bad_input(server, client):
    for _, method, path, body, _ in CASES:
        send(client, method, path, body)
    assert wait_idle(server.url)["active"] == 0
    r = client.post(CHAT, json={**OK_CHAT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    r = client.post("/api/chat", json=OK_OLLAMA)
    assert r.status_code == 200 and r.json()["done"] is True
