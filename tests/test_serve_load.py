"""Concurrency, disconnects and the bounded queue, with real clients on loopback."""

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from test_serve_common import server, MODEL, base_state, serve, wait_idle  # noqa: F401 (fixtures)

openai = pytest.importorskip("openai")

LONG = 2000  # tokens: a stream that is never read to the end (~30 s if nobody cancels it)


def chat_body(prompt, max_tokens, stream, **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, **kw}


def test_16_concurrent_clients(server):
    prompts = [f"def function_{i}(x):" for i in range(8)]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    ref = {p: client.chat.completions.create(**chat_body(p, 12, False)).choices[0].message.content for p in prompts}
    served0 = httpx.get(f"{server.url}/health").json()["served"]
    start = threading.Barrier(16)

    def one(i):
        p, stream = prompts[i % 8], i >= 8
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        start.wait(timeout=30)
        r = c.chat.completions.create(**chat_body(p, 12, stream))
        if stream:
            return p, "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices)
        return p, r.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len(results) == 16
    for p, text in results:
        assert text == ref[p]
    health = wait_idle(server.url)
    assert health["active"] == 0 and health["served"] == served0 + 16


def _disconnect_after(url, body, path, chunks, opened):
    """Opens a stream, reads `chunks` lines, then drops the connection."""
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{url}{path}", json=body) as r:
            assert r.status_code == 200
            opened.release()
            seen = 0
            for line in r.iter_lines():
                if line:
                    seen += 1
                if seen >= chunks:
                    break
    return seen


def test_20_random_disconnects_cancel_generation(server):
    rng = random.Random(7)
    plans = []
    for i in range(20):
        if rng.random() < 0.5:
            plans.append(("/v1/chat/completions", chat_body(f"import module_{i}", LONG, True), rng.randint(1, 6)))
        else:
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"class C{i}:"}],
                    "options": {"num_predict": LONG, "temperature": 0.7}}
            plans.append(("/api/chat", body, rng.randint(1, 6)))
    opened = threading.Semaphore(0)
    t0 = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(_disconnect_after, server.url, body, path, n, opened) for path, body, n in plans]
        seen = [f.result(timeout=120) for f in futures]
    assert seen == [n for _, _, n in plans]
    health = wait_idle(server.url, timeout=15)
    assert health["active"] == 0, health
    # 20 x 2000 tokens would take minutes: the server stopped each generation early.
    assert time.monotonic() - t0 < 60
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body("x = 1", 3, False), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_non_streaming_client_that_gives_up_cancels(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=chat_body("def f():", LONG, False), timeout=1.0)
    assert wait_idle(server.url, timeout=10)["active"] == 0


def test_full_queue_answers_503_with_retry_after(server, base_state):
    engine = base_state.engine
    old = engine.max_queue
    engine.max_queue = 1
    try:
        with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b:
            with a.stream("POST", f"{server.url}/v1/chat/completions", json=chat_body("import a", LONG, True)) as ra:
                lines = ra.iter_lines()
                next(x for x in lines if '"content"' in x and '"role"' not in x)  # A is generating
                with b.stream("POST", f"{server.url}/v1/chat/completions", json=chat_body("import b", LONG, True)) as rb:
                    assert rb.status_code == 200
                    deadline = time.monotonic() + 10
                    while httpx.get(f"{server.url}/health").json()["waiting"] < 1:
                        assert time.monotonic() < deadline
                        time.sleep(0.02)
                    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body("import c", 4, False))
                    assert r.status_code == 503
                    assert int(r.headers["retry-after"]) >= 1
                    assert r.json()["error"]["code"] == "queue_full"
                    r = httpx.post(f"{server.url}/api/generate", json={"model": MODEL, "prompt": "x"})
                    assert r.status_code == 503 and "queue" in r.json()["error"]
                    assert "retry-after" in r.headers
    finally:
        engine.max_queue = old
    assert wait_idle(server.url, timeout=15)["active"] == 0
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat_body("import d", 3, False), timeout=60)
    assert r.status_code == 200
    data = json.loads(r.text)
    assert data["choices"][0]["finish_reason"] == "length"
